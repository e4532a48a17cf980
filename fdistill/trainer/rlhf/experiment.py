"""RLHF experiments on the synthetic task of :mod:`.task`: ``python -m fdistill rlhf --method M``.

One function per method family, sharing cached stages (``out/checkpoints/*.safetensors``):

- **oracle** (random, peaked TinyLM) and **sft** (the base policy: likelihood training on fresh oracle
  samples) — see :mod:`.task`;
- **reward models**: :class:`~.reward.RewardModel` s initialised from the SFT policy and trained with
  Bradley–Terry on noisy preference pairs of SFT samples (:meth:`.task.RewardTask.preferences`). A
  learned RM is used through an affine **calibration** to the true reward's units (mean and standard
  deviation on SFT samples; order-preserving, so it changes nothing but the scale): "proxy" and "true"
  rewards are then on one axis and the same β means the same thing for both.

Methods (``run_rlhf(method, ...)``):

- ``rl``: KL-regularised REINFORCE with a leave-one-out baseline (:func:`.rl.rl_step`: reward
  ``r − β log(π/π_sft)``) at a few β against the true reward, and against the learned RM: true reward,
  proxy reward and KL(π ‖ π_sft) along training.
- ``warp``: WARP — per iteration, M = 2 RL runs from the iteration's init with an EMA anchor
  (``r − β log(π/π_ema)``, ``θ_ema ← (1−μ) θ_ema + μ θ``) that differ in prompt order; SLERP of their
  task vectors (λ); LITI ``θ_η = (1−η) θ_init + η θ_slerp`` is the next init. Each iteration's front is
  the LITI sweep η ∈ [0, 1]. Baseline: plain RL with the fixed SFT anchor at several β (points along
  training), with at least WARP's total number of RL steps.
- ``bond``: J-BOND — per prompt two samples of an EMA anchor and two of the policy; the forward term is
  the likelihood of the better anchor sample, the backward term a policy gradient with reward
  ``jbond_reward − log(π/π_anchor)``, plus ``ref_kl · KL(π ‖ π_sft)``; anchor
  ``θ_a ← (1−γ) θ_a + γ θ``. Baseline: plain RL as for WARP.
- ``warm``: M RMs from one shared init (the SFT policy + a zero head), diversified by data order and
  learning rate; single RMs vs prediction ensemble vs WARM (weight average): preference accuracy on
  held-out SFT pairs and on pairs from a shifted policy (RL'd on the true reward), agreement with the
  wrong training labels (memorisation), then best-of-N and RL against the best single RM, the ensemble
  and WARM: true vs proxy reward.
- ``irl``: TD-regularised MLE (inverse soft-Q) with several λ (λ = 0 is MLE) on a fixed dataset of
  oracle (expert) sequences, from one random init: held-out KL(oracle ‖ model), diversity of samples,
  and the correlation of the extracted rewards ``Q(s,a) − γ v(s')`` with the oracle's log-likelihood.

Every stage checkpoints (atomic safetensors; long loops every ``ckpt_every`` steps) and a rerun resumes
where it stopped; an output directory that holds another configuration is refused. Outputs:
``curves.json``, ``summary.md`` (the table printed at the end) and PNG plots.

Under ``torchrun`` every method is data parallel as teacher-hacking is
(:mod:`~fdistill.trainer.distributed`), and a run matches the 1-process run up to floating-point
summation order (~1e-7 relative):

- every rank draws the same global batches (same seeds, same generators) and trains on its contiguous
  slice, with the gradients and the reported training metrics averaged over ranks before each
  optimizer step, so every rank takes the same step. The slices: SFT sequences, Bradley–Terry pairs,
  IRL expert sequences, and for RL (:func:`.rl.rl_step`) and J-BOND the prompts with all their samples
  (whole RLOO groups). Every loss is a mean over rows of equal token counts on equal slices, so the
  mean of the slice losses is the global-batch loss; the batch sizes must divide by the world size;
- the sampling itself (RL, J-BOND, evaluation) runs on the whole global batch on every rank (it draws
  from the shared generator); the evaluations then score their part of the held-out samples and
  all-reduce row-count-weighted means;
- the cheap one-off stages run redundantly on every rank with identical results and no collective:
  preference pairs, RM calibration, preference accuracies, best-of-N and IRL's reward correlations;
- rank 0 alone writes checkpoints and outputs and logs.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import distributed
from ..checkpoint import load_checkpoint, save_checkpoint
from ..distill import SamplePool, sequence_kl, sft_loss
from ..extras import require_for_run
from ..files import write_atomic
from ..loop import run_loop
from ..model import LMConfig, TinyLM
from ..rundir import claim_out_dir, jsonable, slug
from . import merge
from .bond import best_of_n, jbond_reward, jeffreys_loss
from .irl import extracted_rewards, td_regularised_mle_loss
from .reward import RewardFn, RewardModel, bradley_terry_loss, check_rewards, warm
from .rl import kl_to_anchor, rl_step
from .task import RewardTask

METHODS = ("rl", "warp", "bond", "warm", "irl")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RLConfig:
    """``rl``: REINFORCE runs of ``steps`` steps at each β of ``betas`` against the true reward and
    of ``proxy_betas`` against the (calibrated) learned RM."""

    steps: int = 300
    betas: tuple = (0.003, 0.01, 0.03)
    proxy_betas: tuple = (0.0, 0.01)


@dataclass(frozen=True)
class WARPConfig:
    """``warp``: ``iterations`` x ``policies`` RL runs of ``steps`` steps (β, EMA rate μ), SLERP at
    ``lam``, LITI at ``eta``; ``front_etas`` draw each iteration's front. Paper: β = 0.1, μ = 0.01,
    λ = 0.5, η = 0.3, I = 5, with thousands of steps per run; μ is larger here for 100-step runs.
    The tiny preset's β = 0.1, μ = 0.1 came closest to the RL frontier of the settings tried
    (β, μ) ∈ {(0.01, 0.05), (0.03, 0.05), (0.01, 0.01), (0.1, 0.1)}; none reached it."""

    beta: float = 0.1
    mu: float = 0.1
    steps: int = 100
    policies: int = 2
    lam: float = 0.5
    eta: float = 0.3
    iterations: int = 3
    front_etas: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    baseline_betas: tuple = (0.003, 0.01, 0.03, 0.1)
    baseline_steps: int = 600


@dataclass(frozen=True)
class BONDConfig:
    """``bond``: J-BOND for ``steps`` steps: Jeffreys mix ``jeffreys_beta`` (forward weight
    ``1 − β``), anchor EMA rate ``gamma``, loss-to-both penalty (log 16, check), ``ref_kl`` weight of
    KL(π ‖ π_sft); ``samples`` policy samples per prompt (RLOO baseline among them). γ is not in
    our notes on the paper: 0.02 and 0.1 were also tried (slower / faster along a similar curve,
    neither above the RL frontier)."""

    steps: int = 600
    jeffreys_beta: float = 0.5
    gamma: float = 0.05
    penalty: float = math.log(16)
    ref_kl: float = 0.0
    samples: int = 2
    baseline_betas: tuple = (0.003, 0.01, 0.03, 0.1)
    baseline_steps: int = 600


@dataclass(frozen=True)
class WARMConfig:
    """``warm``: ``models`` RMs (learning rate ``rm_lr · lr_scales[i % len]``, data order seed i);
    a shifted distribution from ``shift_steps`` of RL on the true reward at ``shift_beta``;
    best-of-N for each N of ``bon`` on ``bon_prompts`` prompts; RL of ``rl_steps`` at ``rl_beta``
    against the best single RM, the ensemble and WARM, ``rl_seeds`` runs each (the same seeds for
    each RM)."""

    models: int = 4
    lr_scales: tuple = (1.0, 0.5, 2.0, 1.0)
    shift_steps: int = 150
    shift_beta: float = 0.01
    shift_pairs: int = 512
    bon: tuple = (1, 2, 4, 8, 16, 32, 64)
    bon_prompts: int = 128
    rl_steps: int = 300
    rl_beta: float = 0.0
    rl_seeds: int = 2


@dataclass(frozen=True)
class IRLConfig:
    """``irl``: one model per λ of ``lambdas`` trained ``steps`` steps (batch ``batch``, Adam ``lr``)
    on ``dataset`` oracle sequences, discount ``gamma``. With γ = 1 a sequence's extracted rewards
    sum (telescope) to ``log π(y|x) + v(s_0)``: per sequence they correlate with the oracle's
    log-likelihood through the model's, plus the prompt value ``v(s_0)``, which MLE leaves free."""

    lambdas: tuple = (0.0, 0.1, 1.0)
    gamma: float = 1.0
    dataset: int = 256
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    eval_every: int = 25


@dataclass(frozen=True)
class RLHFPreset:
    """The task and models, the shared stages (SFT; ``pairs`` Bradley–Terry pairs at label
    temperature τ; RM training; ``calibration`` SFT samples), the RL settings shared by every method
    (``rl_prompts`` prompts x ``group`` samples per step, Adam ``rl_lr``), the evaluation
    (``eval_prompts`` held-out prompts every ``eval_every`` steps), checkpoints every ``ckpt_every``
    steps, and each method's settings. The models' vocab and context come from the task."""

    task: RewardTask = RewardTask()
    oracle: LMConfig = LMConfig(width=32, depth=2, heads=4, head_scale=3.0, attn_gain=6.0)
    policy: LMConfig = LMConfig(width=32, depth=2, heads=4)
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 64
    pairs: int = 2048
    label_temperature: float = 0.1
    heldout_pairs: int = 512
    rm_epochs: int = 6
    rm_lr: float = 1e-3
    rm_batch: int = 64
    calibration: int = 1024
    rl_prompts: int = 16
    group: int = 4
    rl_lr: float = 1e-3
    temperature: float = 1.0
    eval_prompts: int = 512
    eval_every: int = 25
    ckpt_every: int = 100
    rl: RLConfig = RLConfig()
    warp: WARPConfig = WARPConfig()
    bond: BONDConfig = BONDConfig()
    warm: WARMConfig = WARMConfig()
    irl: IRLConfig = IRLConfig()


PRESETS = {
    "tiny": RLHFPreset(),
    "smoke": RLHFPreset(
        sft_steps=15,
        pairs=128,
        heldout_pairs=64,
        rm_epochs=1,
        calibration=64,
        rl_prompts=4,
        eval_prompts=32,
        eval_every=4,
        ckpt_every=4,
        rl=RLConfig(steps=8, betas=(0.01,), proxy_betas=(0.0,)),
        warp=WARPConfig(
            steps=4, iterations=2, front_etas=(0.0, 0.5, 1.0), baseline_betas=(0.01,), baseline_steps=8
        ),
        bond=BONDConfig(steps=8, baseline_betas=(0.01,), baseline_steps=8),
        warm=WARMConfig(
            models=2, shift_steps=4, shift_pairs=32, bon=(1, 4), bon_prompts=8, rl_steps=8, rl_seeds=1
        ),
        irl=IRLConfig(lambdas=(0.0, 0.5), dataset=32, steps=8, batch=8, eval_every=4),
    ),
}


def preset_config(name: str) -> RLHFPreset:
    """The preset ``name`` with the models' vocab and context set from its task."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return _complete(PRESETS[name])


def _complete(cfg: RLHFPreset) -> RLHFPreset:
    task = cfg.task
    context = task.prompt_len + task.length
    return replace(
        cfg,
        oracle=replace(cfg.oracle, vocab=task.vocab, context=context),
        policy=replace(cfg.policy, vocab=task.vocab, context=context),
    )


def _check_config(method: str, cfg: RLHFPreset) -> None:
    if cfg.group < 2:
        raise ValueError(f"group must be >= 2 (the leave-one-out baseline), got {cfg.group}")
    if method == "warp" and cfg.warp.policies != 2:
        raise ValueError(f"WARP's SLERP merges exactly 2 policies, got policies={cfg.warp.policies}")
    if method == "bond" and cfg.bond.samples < 2:
        raise ValueError(f"bond.samples must be >= 2 (the leave-one-out baseline), got {cfg.bond.samples}")
    if method == "warm" and cfg.warm.models < 2:
        raise ValueError(f"warm.models must be >= 2 to merge, got {cfg.warm.models}")
    if method == "irl" and any(not lam >= 0 for lam in cfg.irl.lambdas):
        raise ValueError(f"irl.lambdas must be >= 0, got {cfg.irl.lambdas}")


def _check_divisible(method: str, cfg: RLHFPreset) -> None:
    """Under ``torchrun`` each training batch splits into equal slices, one per rank."""
    if method == "irl":
        distributed.check_divisible(cfg.irl.batch, "irl.batch")
        return
    distributed.check_divisible(cfg.sft_batch, "sft_batch")
    distributed.check_divisible(cfg.rl_prompts, "rl_prompts")
    if method in ("rl", "warm"):
        distributed.check_divisible(cfg.rm_batch, "rm_batch")


# ----------------------------------------------------------------------------- training loop


class _Order:
    """Batches of indices into ``n`` items, a fresh permutation every epoch; resumable."""

    def __init__(self, n: int):
        self.n, self.order, self.cursor = n, None, 0

    def batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        picked, left = [], size
        while left > 0:
            if self.order is None or self.cursor >= self.n:
                self.order, self.cursor = torch.randperm(self.n, generator=generator), 0
            take = self.order[self.cursor : self.cursor + left]
            self.cursor += take.numel()
            left -= take.numel()
            picked.append(take)
        return torch.cat(picked)

    def state(self) -> dict:
        return {"cursor": self.cursor, "order": None if self.order is None else self.order.tolist()}

    def load_state(self, state: dict) -> None:
        self.cursor = state["cursor"]
        self.order = None if state["order"] is None else torch.tensor(state["order"])


def _frozen(model: TinyLM | RewardModel):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _trainable(model):
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _row_mean(values: dict, rows: int) -> dict:
    """Per-row means of this rank's part of an evaluation set, averaged over ranks weighted by the
    row counts (every row holds the same number of tokens): the whole set's means, in ``values``' order."""
    mean = distributed.weighted_mean(values, rows)
    return {k: mean[k] for k in values}


def _save_on_main(path: Path, **kwargs) -> None:
    """Rank 0 writes the checkpoint, after every rank has looked for it and before any reads it."""
    distributed.barrier()
    if distributed.is_main():
        save_checkpoint(path, **kwargs)
    distributed.barrier()


def _series(record: dict, *keys: str) -> dict:
    """``{"steps": [...], key: [...]}`` from a record's evaluations."""
    out = {"steps": [e["step"] for e in record["eval"]]}
    for key in keys:
        out[key] = [e[key] for e in record["eval"]]
    return out


# ----------------------------------------------------------------------------- shared stages


class _Calibrated:
    """A reward function ``a · score(cat(x, y)) + b`` (no grad), ``a > 0``."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], a: float, b: float):
        self.score, self.a, self.b = score, a, b

    @torch.no_grad()
    def __call__(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return self.a * self.score(torch.cat([prompts, completions], 1)).float() + self.b


class _Context:
    """The run's shared pieces: task, reward, oracle, base policy (cached), evaluation, RMs."""

    def __init__(self, cfg: RLHFPreset, out: Path, seed: int, reward_fn, progress: bool, log):
        self.cfg, self.out, self.seed, self.progress, self.log = cfg, out, seed, progress, log
        self.task = cfg.task
        self.P, self.L = self.task.prompt_len, self.task.length
        self.reward_fn = reward_fn or self.task.true_reward
        self.ckpts = out / "checkpoints"
        torch.manual_seed(seed)
        self.oracle = TinyLM(cfg.oracle)
        path = self.ckpts / "oracle.safetensors"
        if path.exists():
            load_checkpoint(path, models={"oracle": self.oracle})
        else:
            _save_on_main(path, models={"oracle": self.oracle}, meta={"stage": "oracle"})
        _frozen(self.oracle)
        gen = torch.Generator().manual_seed(seed + 10_000)  # held-out prompts: their own stream
        self.eval_prompts = self.task.prompts(cfg.eval_prompts, gen)
        self.eval_seed = seed + 10_001
        self._sft, self._calib = None, None

    def true(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return check_rewards(self.reward_fn(prompts, completions), prompts.shape[0]).float()

    @property
    def sft(self) -> TinyLM:
        """The base policy: likelihood training on fresh oracle samples (cached stage)."""
        if self._sft is None:
            cfg = self.cfg
            torch.manual_seed(self.seed + 1)
            model = _trainable(TinyLM(cfg.policy))
            opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
            gen = torch.Generator().manual_seed(self.seed + 1)
            pool = SamplePool(self.oracle, self.task, 512)

            def step():
                loss = sft_loss(model, distributed.shard(pool.take(cfg.sft_batch, gen)), self.P)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                (mean_loss,) = distributed.average_gradients(model.parameters(), loss.item())
                opt.step()
                return {"loss": mean_loss}

            self.log("stage: base policy (SFT on oracle samples)")
            run_loop(
                "sft",
                self.ckpts / "sft.safetensors",
                cfg.sft_steps,
                step,
                models={"policy": model},
                optimizers={"policy": opt},
                generators={"data": gen},
                data=pool,
                progress=self.progress,
                log=self.log,
            )
            self._sft = _frozen(model)
        return self._sft

    @torch.no_grad()
    def evaluate(self, policy: TinyLM, proxies: dict[str, RewardFn] | None = None) -> dict:
        """On the held-out prompts, one completion each (the same random stream every time): mean
        true reward, per-sequence KL(π ‖ π_sft) (exact per position, summed), repeat rate, and the
        mean of each proxy."""
        gen = torch.Generator().manual_seed(self.eval_seed)
        seqs = distributed.split(policy.sample(self.eval_prompts, self.L, generator=gen))
        x, y = seqs[:, : self.P], seqs[:, self.P :]
        out = {
            "true": float(self.true(x, y).mean()),
            "kl": float(kl_to_anchor(policy, self.sft, seqs, self.P).mean()),
            "repeat": self.task.repeat_rate(y),
        }
        for name, fn in (proxies or {}).items():
            out[name] = float(fn(x, y).mean())
        return _row_mean(out, seqs.shape[0])

    # --- preferences and reward models

    def preferences(self, which: str) -> dict:
        """``train`` (noisy Bradley–Terry labels) or ``heldout`` pairs of SFT samples (deterministic)."""
        n, offset = {"train": (self.cfg.pairs, 20_000), "heldout": (self.cfg.heldout_pairs, 20_001)}[which]
        gen = torch.Generator().manual_seed(self.seed + offset)
        return self.task.preferences(self.sft, n, gen, self.cfg.label_temperature, self.true)

    def reward_model(self, index: int, prefs: dict, lr_scale: float = 1.0) -> RewardModel:
        """RM number ``index`` (its data order), from the SFT policy, Bradley–Terry (cached stage)."""
        cfg = self.cfg
        rm = _trainable(RewardModel.from_lm(self.sft))
        opt = torch.optim.Adam(rm.parameters(), lr=cfg.rm_lr * lr_scale)
        gen = torch.Generator().manual_seed(self.seed + 30_000 + index)
        order = _Order(prefs["chosen"].shape[0])

        def step():
            idx = distributed.shard(order.batch(cfg.rm_batch, gen))  # this rank's pairs of the batch
            loss = bradley_terry_loss(rm(prefs["chosen"][idx]), rm(prefs["rejected"][idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (mean_loss,) = distributed.average_gradients(rm.parameters(), loss.item())
            opt.step()
            return {"loss": mean_loss}

        steps = cfg.rm_epochs * math.ceil(prefs["chosen"].shape[0] / cfg.rm_batch)
        run_loop(
            f"rm{index}",
            self.ckpts / f"rm{index}.safetensors",
            steps,
            step,
            models={"rm": rm},
            optimizers={"rm": opt},
            generators={"data": gen},
            data=order,
            progress=self.progress,
            log=self.log,
        )
        return _frozen(rm)

    @torch.no_grad()
    def calibrate(self, score: Callable[[torch.Tensor], torch.Tensor]) -> _Calibrated:
        """``score`` mapped affinely to the true reward's mean and std on SFT samples."""
        if self._calib is None:
            gen = torch.Generator().manual_seed(self.seed + 40_000)
            seqs = self.sft.sample(self.task.prompts(self.cfg.calibration, gen), self.L, generator=gen)
            self._calib = (seqs, self.true(seqs[:, : self.P], seqs[:, self.P :]))
        seqs, r = self._calib
        s = score(seqs).float()
        a = float(r.std() / s.std().clamp_min(1e-8))
        return _Calibrated(score, a, float(r.mean()) - a * float(s.mean()))

    # --- RL

    def rl_run(
        self,
        name: str,
        reward_fn: RewardFn,
        beta: float,
        steps: int,
        *,
        init: dict | None = None,
        ema: float | None = None,
        seed: int = 0,
        proxies: dict | None = None,
    ) -> tuple[dict, TinyLM]:
        """REINFORCE (RLOO) from ``init`` (default the SFT policy) against ``reward_fn``, with the
        fixed SFT anchor, or an EMA anchor (rate ``ema``) starting at ``init``; cached stage."""
        cfg = self.cfg
        policy = _trainable(copy.deepcopy(self.sft))
        if init is not None:
            policy.load_state_dict(init)
        anchor = self.sft if ema is None else _frozen(copy.deepcopy(policy))
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.rl_lr)
        gen = torch.Generator().manual_seed(self.seed + 50_000 + seed)

        def step():
            metrics = rl_step(
                policy,
                anchor,
                opt,
                self.task.prompts(cfg.rl_prompts, gen),
                reward_fn,
                length=self.L,
                beta=beta,
                group=cfg.group,
                temperature=cfg.temperature,
                generator=gen,
            )
            if ema is not None:
                merge.ema_update(anchor, policy, ema)
            return {k: metrics[k] for k in ("reward", "kl")}

        models = {"policy": policy} if ema is None else {"policy": policy, "anchor": anchor}
        record = run_loop(
            name,
            self.ckpts / f"{slug(name)}.safetensors",
            steps,
            step,
            models=models,
            optimizers={"policy": opt},
            generators={"rl": gen},
            evaluate=lambda: self.evaluate(policy, proxies),
            eval_every=cfg.eval_every,
            ckpt_every=cfg.ckpt_every,
            progress=self.progress,
            log=self.log,
        )
        return record, _frozen(policy)

    def baseline(self, betas, steps: int) -> dict:
        """Plain RL on the true reward with the fixed SFT anchor, one run per β."""
        runs = {}
        for i, beta in enumerate(betas):
            name = f"RL beta={beta:g}"
            self.log(f"stage: {name} ({steps} steps)")
            record, _ = self.rl_run(name, self.true, beta, steps, seed=100 + i)
            runs[name] = {"beta": beta, **_series(record, "true", "kl", "repeat")}
        return runs


# ----------------------------------------------------------------------------- the methods


def _method_rl(ctx: _Context) -> dict:
    cfg = ctx.cfg.rl
    prefs = ctx.preferences("train")
    ctx.log("stage: reward model")
    rm = ctx.reward_model(0, prefs)
    proxy = ctx.calibrate(rm)
    heldout = ctx.preferences("heldout")
    curves = {
        "sft": ctx.evaluate(ctx.sft, {"proxy": proxy}),
        "rm": {
            "train_label_agreement": _label_agreement(prefs),
            "heldout_accuracy": _accuracy(rm, heldout),
        },
        "runs": {},
    }
    runs = [("true", beta) for beta in cfg.betas] + [("proxy", beta) for beta in cfg.proxy_betas]
    for i, (source, beta) in enumerate(runs):
        name = f"{'true reward' if source == 'true' else 'learned RM'} beta={beta:g}"
        ctx.log(f"stage: RL on the {name} ({cfg.steps} steps)")
        fn = ctx.true if source == "true" else proxy
        record, _ = ctx.rl_run(name, fn, beta, cfg.steps, seed=i, proxies={"proxy": proxy})
        curves["runs"][name] = {
            "reward": source,
            "beta": beta,
            **_series(record, "true", "proxy", "kl", "repeat"),
        }
    return curves


def _method_warp(ctx: _Context) -> dict:
    cfg = ctx.cfg.warp
    curves = {"sft": ctx.evaluate(ctx.sft), "iterations": [], "baseline": {}}
    init = {k: v.clone() for k, v in ctx.sft.state_dict().items()}
    probe = _frozen(copy.deepcopy(ctx.sft))
    for it in range(cfg.iterations):
        path = ctx.ckpts / f"warp_iteration{it}.safetensors"
        if path.exists():
            meta = load_checkpoint(path, models={"next_init": probe})
            init = {k: v.clone() for k, v in probe.state_dict().items()}
            curves["iterations"].append(meta)
            continue
        runs, finals = [], []
        for m in range(cfg.policies):
            name = f"WARP it{it} policy{m}"
            ctx.log(f"stage: {name} ({cfg.steps} steps, EMA anchor)")
            record, policy = ctx.rl_run(
                name, ctx.true, cfg.beta, cfg.steps, init=init, ema=cfg.mu, seed=1000 + 10 * it + m
            )
            runs.append(_series(record, "true", "kl", "repeat"))
            finals.append(policy.state_dict())
        merged = merge.slerp(init, finals[0], finals[1], cfg.lam)
        cosine = _task_vector_cosine(init, finals[0], finals[1])
        front = []
        for eta in cfg.front_etas:
            probe.load_state_dict(merge.liti(init, merged, eta))
            front.append({"eta": eta, **ctx.evaluate(probe)})
        init = merge.liti(init, merged, cfg.eta)
        probe.load_state_dict(init)
        meta = {"runs": runs, "task_vector_cosine": cosine, "front": front,
                "liti": {"eta": cfg.eta, **ctx.evaluate(probe)}}  # fmt: skip
        _save_on_main(path, models={"next_init": probe}, meta=meta)
        curves["iterations"].append(meta)
        point = meta["liti"]
        ctx.log(f"  iteration {it}: task vectors' cosine {cosine:.3f}; LITI(η={cfg.eta}) true "
                f"{point['true']:.3f} at KL {point['kl']:.2f}")  # fmt: skip
    curves["baseline"] = ctx.baseline(cfg.baseline_betas, cfg.baseline_steps)
    return curves


def _task_vector_cosine(init: dict, a: dict, b: dict) -> float:
    """Cosine of the angle between the whole task vectors ``a − init`` and ``b − init``."""
    dot = na = nb = 0.0
    for key, base in init.items():
        if base.is_floating_point():
            d1, d2 = (a[key] - base).double(), (b[key] - base).double()
            dot += float((d1 * d2).sum())
            na += float(d1.square().sum())
            nb += float(d2.square().sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


def _method_bond(ctx: _Context) -> dict:
    cfg, top = ctx.cfg.bond, ctx.cfg
    policy = _trainable(copy.deepcopy(ctx.sft))
    anchor = _frozen(copy.deepcopy(ctx.sft))
    opt = torch.optim.Adam(policy.parameters(), lr=top.rl_lr)
    gen = torch.Generator().manual_seed(ctx.seed + 60_000)
    P, L, k = ctx.P, ctx.L, cfg.samples

    def step():
        x = ctx.task.prompts(top.rl_prompts, gen)
        with torch.no_grad():
            ys = policy.sample(x.repeat_interleave(k, 0), L, generator=gen)  # (B·k, P+L)
            ya = anchor.sample(x.repeat_interleave(2, 0), L, generator=gen)  # (B·2, P+L)
            r_pol = ctx.true(ys[:, :P], ys[:, P:])
            r_anc = ctx.true(ya[:, :P], ya[:, P:])
            better = ya[best_of_n(r_anc, 2)]  # (B, P+L): the better anchor sample of each prompt
            r_j = jbond_reward(r_pol, r_anc.view(-1, 2).repeat_interleave(k, 0), cfg.penalty)
            # this rank's prompts, each with its k policy samples (whole RLOO groups) and best anchor one
            mine = distributed.shard(ys.view(x.shape[0], k, -1)).flatten(0, 1)
            r_mine = distributed.shard(r_j.view(x.shape[0], k)).flatten()
            anchor_logp = anchor.sequence_logprobs(mine, P).sum(-1)
        logp = policy.sequence_logprobs(mine, P)
        backward = r_mine - (logp.detach().sum(-1) - anchor_logp)  # J-BOND reward − log(π/π_anchor)
        loss = jeffreys_loss(
            policy.sequence_logprobs(distributed.shard(better), P), logp, backward, cfg.jeffreys_beta,
            baseline="rloo", group=k,
        )  # fmt: skip
        if cfg.ref_kl > 0:
            loss = loss + cfg.ref_kl * kl_to_anchor(policy, ctx.sft, mine, P).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(policy.parameters())
        opt.step()
        merge.ema_update(anchor, policy, cfg.gamma)
        return {"reward": float(r_pol.mean()), "loses_to_both": float((r_j < 0).float().mean())}

    ctx.log(f"stage: J-BOND ({cfg.steps} steps)")
    record = run_loop(
        "J-BOND",
        ctx.ckpts / "jbond.safetensors",
        cfg.steps,
        step,
        models={"policy": policy, "anchor": anchor},
        optimizers={"policy": opt},
        generators={"rl": gen},
        evaluate=lambda: ctx.evaluate(policy),
        eval_every=top.eval_every,
        ckpt_every=top.ckpt_every,
        progress=ctx.progress,
        log=ctx.log,
    )
    jbond = _series(record, "true", "kl", "repeat")
    jbond["loses_to_both"] = [t["loses_to_both"] for t in record["train"]]
    return {
        "sft": ctx.evaluate(ctx.sft),
        "jbond": jbond,
        "baseline": ctx.baseline(cfg.baseline_betas, cfg.baseline_steps),
    }


def _method_warm(ctx: _Context) -> dict:
    cfg = ctx.cfg.warm
    prefs, heldout = ctx.preferences("train"), ctx.preferences("heldout")
    ctx.log(f"stage: {cfg.models} reward models from one init")
    rms = [ctx.reward_model(i, prefs, cfg.lr_scales[i % len(cfg.lr_scales)]) for i in range(cfg.models)]
    averaged = _frozen(warm(rms))

    def ensemble_score(seqs):
        return torch.stack([rm(seqs) for rm in rms]).mean(0)

    ctx.log(f"stage: shifted policy (RL on the true reward, {cfg.shift_steps} steps)")
    _, shifted = ctx.rl_run("shift policy", ctx.true, cfg.shift_beta, cfg.shift_steps, seed=2000)
    gen = torch.Generator().manual_seed(ctx.seed + 70_000)
    shift = ctx.task.preferences(shifted, cfg.shift_pairs, gen, ctx.cfg.label_temperature, ctx.true)
    scorers = {f"RM {i}": rm for i, rm in enumerate(rms)} | {"ensemble": ensemble_score, "WARM": averaged}
    accuracy = {
        name: {
            "heldout": _accuracy(score, heldout),
            "shifted": _accuracy(score, shift),
            "wrong_labels_fitted": _wrong_label_fit(score, prefs),
        }
        for name, score in scorers.items()
    }
    best = max((n for n in scorers if n.startswith("RM ")), key=lambda n: accuracy[n]["heldout"]["accuracy"])
    compared = {f"best single ({best})": scorers[best], "ensemble": ensemble_score, "WARM": averaged}
    proxies = {name: ctx.calibrate(score) for name, score in compared.items()}

    ctx.log("stage: best-of-N from the SFT policy")
    bon = _best_of_n(ctx, proxies, cfg.bon, cfg.bon_prompts)
    rl = {}
    for name, proxy in proxies.items():
        rl[name] = []
        for s in range(cfg.rl_seeds):
            ctx.log(f"stage: RL against {name}, seed {s} (beta={cfg.rl_beta:g}, {cfg.rl_steps} steps)")
            record, _ = ctx.rl_run(f"RL vs {name} seed {s}", proxy, cfg.rl_beta, cfg.rl_steps, seed=3000 + s,
                                   proxies={"proxy": proxy})  # fmt: skip
            rl[name].append(_series(record, "true", "proxy", "kl", "repeat"))
    return {
        "sft": ctx.evaluate(ctx.sft),
        "train_label_agreement": _label_agreement(prefs),
        "shift_policy": ctx.evaluate(shifted),
        "accuracy": accuracy,
        "best_single": best,
        "best_of_n": bon,
        "rl": rl,
    }


def _method_irl(ctx: _Context) -> dict:
    cfg, top = ctx.cfg.irl, ctx.cfg
    P, L = ctx.P, ctx.L
    gen = torch.Generator().manual_seed(ctx.seed + 80_000)
    expert = ctx.oracle.sample(ctx.task.prompts(cfg.dataset, gen), L, generator=gen)
    golden = ctx.oracle.sample(ctx.eval_prompts, L, generator=gen)  # held-out expert sequences
    with torch.no_grad():
        oracle_logp = ctx.oracle.sequence_logprobs(golden, P)  # (B, L)
    oracle_stats = _sample_stats(ctx, ctx.oracle)
    reference = {"oracle_entropy": oracle_stats["entropy"], "oracle_distinct2": oracle_stats["distinct2"]}

    def evaluate(model):
        with torch.no_grad():
            rewards = extracted_rewards(model.completion_logits(golden, P), golden[:, P:], cfg.gamma)
        part = distributed.split(golden)
        return {
            "kl": _row_mean({"kl": sequence_kl(ctx.oracle, model, part, P)}, part.shape[0])["kl"],
            **_sample_stats(ctx, model),
            "reward_corr_token": _pearson(rewards.flatten(), oracle_logp.flatten()),
            "reward_corr_seq": _pearson(rewards.sum(-1), oracle_logp.sum(-1)),
        }

    runs = {}
    for i, lam in enumerate(cfg.lambdas):
        torch.manual_seed(ctx.seed + 2)  # one init for every λ
        model = _trainable(TinyLM(top.policy))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(ctx.seed + 81_000)  # one data order for every λ
        order = _Order(cfg.dataset)

        def step(model=model, opt=opt, g=g, order=order, lam=lam):
            seqs = distributed.shard(expert[order.batch(cfg.batch, g)])
            loss = td_regularised_mle_loss(model.completion_logits(seqs, P), seqs[:, P:], lam, cfg.gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (mean_loss,) = distributed.average_gradients(model.parameters(), loss.item())
            opt.step()
            return {"loss": mean_loss}

        name = "MLE (lambda=0)" if lam == 0 else f"TD-regularised lambda={lam:g}"
        ctx.log(f"stage: {name} ({cfg.steps} steps)")
        record = run_loop(
            name,
            ctx.ckpts / f"irl_{i}.safetensors",
            cfg.steps,
            step,
            models={"model": model},
            optimizers={"model": opt},
            generators={"data": g},
            data=order,
            evaluate=lambda m=model: evaluate(m),
            eval_every=cfg.eval_every,
            ckpt_every=top.ckpt_every,
            progress=ctx.progress,
            log=ctx.log,
        )
        keys = [k for k in record["eval"][0] if k != "step"]
        runs[name] = {
            "lambda": lam,
            **_series(record, *keys),
            "train_loss": [t["loss"] for t in record["train"]],
        }
    return {"reference": reference, "runs": runs}


# ----------------------------------------------------------------------------- metrics


def _label_agreement(prefs: dict) -> dict:
    """How often the noisy training label agrees with the true ordering (ties excluded)."""
    strict = prefs["r_chosen"] != prefs["r_rejected"]
    right = (prefs["r_chosen"] > prefs["r_rejected"])[strict]
    return {
        "agreement": float(right.float().mean()) if strict.any() else float("nan"),
        "ties": float((~strict).float().mean()),
    }


@torch.no_grad()
def _accuracy(score, prefs: dict) -> dict:
    """Fraction of pairs (true ties excluded) that ``score`` orders as the true reward does."""
    strict = prefs["r_chosen"] != prefs["r_rejected"]
    truth = prefs["r_chosen"] > prefs["r_rejected"]
    pred = score(prefs["chosen"]) > score(prefs["rejected"])
    return {"accuracy": float((pred == truth)[strict].float().mean()), "pairs": int(strict.sum())}


@torch.no_grad()
def _wrong_label_fit(score, prefs: dict) -> float:
    """Among the training pairs whose label contradicts the true reward, the fraction ``score``
    agrees with (the wrong label): memorisation of label noise."""
    wrong = prefs["r_chosen"] < prefs["r_rejected"]
    if not wrong.any():
        return float("nan")
    pred = score(prefs["chosen"][wrong]) > score(prefs["rejected"][wrong])
    return float(pred.float().mean())


@torch.no_grad()
def _best_of_n(ctx: _Context, proxies: dict, ns, prompts: int) -> dict:
    """Best-of-N of the SFT policy selected by each proxy (and by the true reward): mean true and
    proxy reward of the selected completions, with the KL bound ``log N − (N−1)/N``."""
    gen = torch.Generator().manual_seed(ctx.seed + 90_000)
    n_max = max(ns)
    x = ctx.task.prompts(prompts, gen).repeat_interleave(n_max, 0)
    seqs = ctx.sft.sample(x, ctx.L, generator=gen)
    true = ctx.true(seqs[:, : ctx.P], seqs[:, ctx.P :]).view(prompts, n_max)
    scores = {
        name: fn(seqs[:, : ctx.P], seqs[:, ctx.P :]).view(prompts, n_max) for name, fn in proxies.items()
    }
    out = {"n": list(ns), "kl_bound": [math.log(n) - (n - 1) / n for n in ns], "true reward (oracle BoN)": {}}
    for n in ns:
        pick = best_of_n(true[:, :n].flatten(), n) % n
        out["true reward (oracle BoN)"].setdefault("true", []).append(
            float(true[:, :n].gather(1, pick[:, None]).mean())
        )
    for name, s in scores.items():
        entry = {"true": [], "proxy": []}
        for n in ns:
            pick = best_of_n(s[:, :n].flatten(), n) % n
            entry["true"].append(float(true[:, :n].gather(1, pick[:, None]).mean()))
            entry["proxy"].append(float(s[:, :n].gather(1, pick[:, None]).mean()))
        out[name] = entry
    return out


@torch.no_grad()
def _sample_stats(ctx: _Context, model: TinyLM) -> dict:
    """Diversity of ``model``'s samples on the held-out prompts: mean per-token entropy of its
    next-token distributions along them (nats) and the mean fraction of distinct bigrams per
    completion."""
    gen = torch.Generator().manual_seed(ctx.eval_seed)
    seqs = distributed.split(model.sample(ctx.eval_prompts, ctx.L, generator=gen))
    logp = model.completion_logits(seqs, ctx.P).float().log_softmax(-1)
    y = seqs[:, ctx.P :]
    pairs = y[:, :-1] * ctx.task.vocab + y[:, 1:]
    distinct = [len(set(row.tolist())) / row.numel() for row in pairs]
    stats = {
        "entropy": float(-(logp.exp() * logp).sum(-1).mean()),
        "distinct2": sum(distinct) / len(distinct),
    }
    return _row_mean(stats, seqs.shape[0])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def _envelope(points) -> Callable[[float], float]:
    """The baseline's reward frontier: the least concave majorant of the ``(kl, reward)`` points,
    made non-decreasing (flat after the best reward), as a function of the KL.

    A per-prompt mixture of two policies reaches the segment between their points or better (the
    reward is linear in the mixture, the KL convex), so this is what the baseline's policies attain
    at a given KL, not only at the KLs that were evaluated. NaN left of the smallest KL."""
    pts = sorted(set(points))
    hull: list = []
    for p in pts:  # upper hull, left to right (monotone chain)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] is on or below
                hull.pop()
            else:
                break
        hull.append(p)
    top = max(range(len(hull)), key=lambda i: hull[i][1])
    hull = hull[: top + 1]

    def best(k: float) -> float:
        if k < hull[0][0]:
            return float("nan")
        for (x1, y1), (x2, y2) in zip(hull[:-1], hull[1:], strict=True):
            if k <= x2:
                return y1 + (y2 - y1) * (k - x1) / (x2 - x1) if x2 > x1 else max(y1, y2)
        return hull[-1][1]

    return best


def _baseline_points(baseline: dict) -> list:
    return [(kl, r) for run in baseline.values() for kl, r in zip(run["kl"], run["true"], strict=True)]


def _versus_baseline(points, baseline: dict) -> dict:
    """How the method's ``(kl, reward)`` points compare with the best baseline reward at no more KL."""
    best = _envelope(_baseline_points(baseline))
    margins = [(r - best(kl), kl, r) for kl, r in points]
    top = max(margins)
    return {
        "points": len(margins),
        "above": sum(m > 0 for m, _, _ in margins),
        "best_margin": top[0],
        "at_kl": top[1],
        "worst_margin": min(margins)[0],
    }


# ----------------------------------------------------------------------------- tables


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head, rows) -> str:
    return "\n".join([_row(head), "|" + "|".join("---" for _ in head) + "|", *(_row(r) for r in rows)])


def _mean(values) -> float:
    return sum(values) / len(values)


def _best_index(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _best_at(c: dict) -> str:
    b = _best_index(c["true"])
    return f"{c['true'][b]:.3f} @ KL {c['kl'][b]:.2f}"


def _margin(v: dict) -> str:
    return f"{v['above']}/{v['points']}; best {v['best_margin']:+.3f} @ KL {v['at_kl']:.2f}"


def _summary_rl(curves: dict) -> str:
    sft, rm = curves["sft"], curves["rm"]
    rows = [
        [name, f"{sft['true']:.3f} → {_best_at(c)} → {c['true'][-1]:.3f}", f"{c['proxy'][-1]:.3f}",
         f"{c['kl'][-1]:.2f}", f"{c['repeat'][-1]:.2f}"]
        for name, c in curves["runs"].items()
    ]  # fmt: skip
    head = ["RL run (optimised reward, β)", "true: SFT → best @ KL → final", "proxy final", "KL final",
            "repeat final"]  # fmt: skip
    return (
        f"SFT: true {sft['true']:.3f}, proxy {sft['proxy']:.3f}, repeat rate {sft['repeat']:.2f}. "
        f"Learned RM: held-out accuracy {rm['heldout_accuracy']['accuracy']:.3f}; its training labels agree "
        f"with the true reward on {rm['train_label_agreement']['agreement']:.3f} of the non-tied pairs.\n\n"
        + _table(head, rows)
    )


def _summary_pareto(curves: dict) -> str:
    rows = [[name, f"{c['true'][-1]:.3f}", f"{c['kl'][-1]:.2f}", _best_at(c), "-"]
            for name, c in curves["baseline"].items()]  # fmt: skip
    if curves["run"]["method"] == "warp":
        for i, it in enumerate(curves["iterations"]):
            front, liti = it["front"], it["liti"]
            b = _best_index([p["true"] for p in front])
            rows.append([f"WARP iteration {i + 1} (task vectors' cosine {it['task_vector_cosine']:.2f}): "
                         f"LITI η={liti['eta']:g} → next init", f"{liti['true']:.3f}",
                         f"{liti['kl']:.2f}", f"front: {front[b]['true']:.3f} @ KL {front[b]['kl']:.2f}",
                         _margin(curves["versus_baseline"][i])])  # fmt: skip
    else:
        c = curves["jbond"]
        rows.append(["J-BOND", f"{c['true'][-1]:.3f}", f"{c['kl'][-1]:.2f}", _best_at(c),
                     _margin(curves["versus_baseline"])])  # fmt: skip
    head = ["run", "true final", "KL final", "best true @ KL", "points above the RL frontier; best margin"]
    return f"SFT: true {curves['sft']['true']:.3f}\n\n" + _table(head, rows)


def _summary_warm(curves: dict) -> str:
    rows = [[name, f"{a['heldout']['accuracy']:.3f}", f"{a['shifted']['accuracy']:.3f}",
             f"{a['wrong_labels_fitted']:.3f}"] for name, a in curves["accuracy"].items()]  # fmt: skip
    first = _table(["reward model", "held-out accuracy (SFT pairs)", "shifted accuracy (RL'd policy's pairs)",
                    "wrong training labels fitted"], rows)  # fmt: skip
    bon, n = curves["best_of_n"], curves["best_of_n"]["n"][-1]
    rows = []
    for name, runs in curves["rl"].items():
        best = _mean([max(c["true"]) for c in runs])
        along = _mean([_mean(c["true"][1:]) for c in runs])
        final = f"{_mean([c['true'][-1] for c in runs]):.3f} / {_mean([c['proxy'][-1] for c in runs]):.3f}"
        rows.append([name, f"{bon[name]['true'][-1]:.3f} / {bon[name]['proxy'][-1]:.3f}", f"{best:.3f}",
                     f"{along:.3f}", final, f"{_mean([c['kl'][-1] for c in runs]):.2f}"])  # fmt: skip
    k = len(next(iter(curves["rl"].values())))
    head = ["optimised against", f"best-of-{n}: true / proxy", f"RL: best true (mean of {k} seeds)",
            "RL: mean true along training", "RL final: true / proxy", "RL final KL"]  # fmt: skip
    second = _table(head, rows)
    oracle = bon["true reward (oracle BoN)"]["true"][-1]
    return (
        f"SFT: true {curves['sft']['true']:.3f}; best-of-{n} selected by the true reward: {oracle:.3f}\n\n"
        f"{first}\n\n{second}"
    )


def _summary_irl(curves: dict) -> str:
    rows = []
    for name, c in curves["runs"].items():
        b = min(range(len(c["kl"])), key=lambda i: c["kl"][i])
        rows.append([name, f"{c['kl'][b]:.4f} (step {c['steps'][b]}) → {c['kl'][-1]:.4f}",
                     f"{c['entropy'][-1]:.3f}", f"{c['distinct2'][-1]:.3f}",
                     f"{c['reward_corr_token'][-1]:.3f}", f"{c['reward_corr_seq'][-1]:.3f}"])  # fmt: skip
    ref = curves["reference"]
    head = ["objective", "held-out KL(oracle‖model): min (step) → final", "entropy", "distinct-2",
            "corr(extracted r_t, oracle log p) per token", "per sequence"]  # fmt: skip
    return (
        f"oracle's own samples: entropy {ref['oracle_entropy']:.3f}, distinct-2 {ref['oracle_distinct2']:.3f}"
        "\n\n" + _table(head, rows)
    )


def summary_table(curves: dict) -> str:
    """The markdown summary of a run's curves."""
    method = curves["run"]["method"]
    if method == "rl":
        return _summary_rl(curves)
    if method in ("warp", "bond"):
        return _summary_pareto(curves)
    if method == "warm":
        return _summary_warm(curves)
    return _summary_irl(curves)


# ----------------------------------------------------------------------------- plots


def plot_curves(curves: dict, out: Path) -> list[Path]:
    """The method's PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method, sft, paths = curves["run"]["method"], curves.get("sft"), []

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def baseline_lines(ax, baseline):
        for name, c in baseline.items():
            ax.plot(c["kl"], c["true"], marker=".", ms=4, lw=1, alpha=0.8, label=name)

    if method == "rl":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, c in curves["runs"].items():
            (line,) = axes[0].plot(c["kl"], c["true"], marker=".", label=f"{name}: true")
            if c["reward"] == "proxy":
                axes[0].plot(c["kl"], c["proxy"], ls="--", color=line.get_color(), label=f"{name}: proxy")
                axes[1].plot(c["steps"], c["true"], color=line.get_color(), label=f"{name}: true")
                axes[1].plot(c["steps"], c["proxy"], ls="--", color=line.get_color(), label=f"{name}: proxy")
        axes[0].set(xlabel="KL(π ‖ π_sft) per sequence (nats)", ylabel="reward", title="reward vs KL")
        axes[1].set(xlabel="RL step", ylabel="reward", title="RL against the learned RM: true vs proxy")
        for ax in axes:
            ax.axhline(sft["true"], color="k", ls=":", lw=1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "reward_vs_kl.png")
    elif method in ("warp", "bond"):
        fig, ax = plt.subplots(figsize=(7, 5))
        baseline_lines(ax, curves["baseline"])
        points = _baseline_points(curves["baseline"])
        frontier, top = _envelope(points), max(kl for kl, _ in points)
        grid = [top * i / 200 for i in range(201)]
        ax.plot(grid, [frontier(k) for k in grid], color="gray", ls="--", lw=1, label="RL frontier (concave)")
        if method == "warp":
            for i, it in enumerate(curves["iterations"]):
                f = it["front"]
                (line,) = ax.plot(
                    [p["kl"] for p in f],
                    [p["true"] for p in f],
                    marker="o",
                    ms=3,
                    lw=2,
                    label=f"WARP iteration {i + 1} (LITI η ∈ [0, 1])",
                )
                ax.plot(it["liti"]["kl"], it["liti"]["true"], marker="*", ms=14, color=line.get_color())
                for r in it["runs"]:
                    ax.plot(r["kl"][-1], r["true"][-1], marker="x", ms=8, color=line.get_color())
            title = "WARP fronts (★ LITI η → next init, × RL'd policies) vs RL"
        else:
            c = curves["jbond"]
            ax.plot(c["kl"], c["true"], marker="o", ms=3, lw=2, color="k", label="J-BOND (EMA anchor)")
            title = "J-BOND vs RL (points along training)"
        ax.plot([0], [sft["true"]], marker="s", color="k", ls="", label="SFT")
        ax.set(xlabel="KL(π ‖ π_sft) per sequence (nats)", ylabel="true reward", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "pareto.png")
    elif method == "warm":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        names = list(curves["accuracy"])
        xs = range(len(names))
        for j, (key, label) in enumerate(
            (("heldout", "held-out (SFT)"), ("shifted", "shifted (RL'd policy)"))
        ):
            axes[0].bar(
                [x + 0.4 * j for x in xs],
                [curves["accuracy"][n][key]["accuracy"] for n in names],
                width=0.4,
                label=label,
            )
        axes[0].set_xticks([x + 0.2 for x in xs], names, fontsize=7, rotation=20)
        lo = min(curves["accuracy"][n][k]["accuracy"] for n in names for k in ("heldout", "shifted"))
        axes[0].set(ylim=(max(0.0, lo - 0.1), 1.0), ylabel="pairwise accuracy", title="preference accuracy")
        axes[0].legend(fontsize=7)
        bon = curves["best_of_n"]
        axes[1].plot(
            bon["kl_bound"],
            bon["true reward (oracle BoN)"]["true"],
            color="k",
            marker=".",
            label="selected by the true reward",
        )
        for name, runs in curves["rl"].items():
            (line,) = axes[1].plot(bon["kl_bound"], bon[name]["true"], marker=".", label=f"{name}: true")
            color = line.get_color()
            axes[1].plot(bon["kl_bound"], bon[name]["proxy"], ls="--", color=color, label=f"{name}: proxy")
            for s, c in enumerate(runs):
                axes[2].plot(c["steps"], c["true"], color=color, label=f"{name}: true" if s == 0 else None)
                axes[2].plot(c["steps"], c["proxy"], ls="--", color=color, lw=1,
                             label=f"{name}: proxy" if s == 0 else None)  # fmt: skip
        axes[1].set(
            xlabel="KL bound log N − (N−1)/N", ylabel="reward", title=f"best-of-N (N ≤ {bon['n'][-1]})"
        )
        axes[2].set(
            xlabel="RL step", ylabel="reward", title="RL against each RM: true (—) vs proxy (--), all seeds"
        )
        for ax in axes[1:]:
            ax.axhline(sft["true"], color="k", ls=":", lw=1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "warm.png")
    elif method == "irl":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for name, c in curves["runs"].items():
            axes[0].plot(c["steps"], c["kl"], marker=".", label=name)
            axes[1].plot(c["steps"], c["entropy"], marker=".", label=name)
            axes[2].plot(c["steps"], c["reward_corr_token"], marker=".", label=f"{name}: per token")
            axes[2].plot(c["steps"], c["reward_corr_seq"], ls="--", label=f"{name}: per sequence")
        axes[1].axhline(curves["reference"]["oracle_entropy"], color="k", ls=":", lw=1, label="oracle")
        axes[0].set(xlabel="step", ylabel="nats per token", title="held-out KL(oracle ‖ model)", yscale="log")
        axes[1].set(xlabel="step", ylabel="nats", title="entropy along own samples")
        axes[2].set(xlabel="step", ylabel="Pearson r", title="extracted reward vs oracle log-likelihood")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "irl.png")
    return paths


# ----------------------------------------------------------------------------- entry point


_RUNNERS = {
    "rl": _method_rl,
    "warp": _method_warp,
    "bond": _method_bond,
    "warm": _method_warm,
    "irl": _method_irl,
}


def run_rlhf(
    method: str,
    preset: str | RLHFPreset = "tiny",
    out: str | Path | None = None,
    *,
    seed: int = 0,
    reward_fn: RewardFn | None = None,
    progress: bool = True,
    plots: bool = True,
    log=print,
) -> dict:
    """Run (or resume) one method's experiment; writes ``out/curves.json``, ``out/summary.md`` and
    PNG plots; returns the curves dict.

    ``reward_fn(prompts (B, P), completions (B, L)) -> (B,)`` replaces the task's true reward
    everywhere (labels, RL, metrics); it must return finite floats of that shape (ValueError
    otherwise). It is recorded in ``run.json`` by name only.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data parallel (see the module's docstring); the
    training batch sizes (``sft_batch``, ``rm_batch``, ``rl_prompts``, ``irl.batch``) must divide by
    the world size. Rank 0 writes the files and logs."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    cfg = _complete(preset) if isinstance(preset, RLHFPreset) else preset_config(preset)
    preset_name = "custom" if isinstance(preset, RLHFPreset) else preset
    _check_config(method, cfg)
    require_for_run(progress=progress, plots=plots)
    if reward_fn is not None:  # fail fast, before any training
        probe = torch.Generator().manual_seed(0)
        x = cfg.task.prompts(4, probe)
        y = torch.randint(0, cfg.task.vocab, (4, cfg.task.length), generator=probe)
        check_rewards(reward_fn(x, y), 4, "reward_fn")
    out = Path(out) if out is not None else Path(f"runs/rlhf-{method}-{preset_name}")
    run_config = {
        "method": method,
        "preset": preset_name,
        "seed": seed,
        "reward": "task.true_reward"
        if reward_fn is None
        else getattr(reward_fn, "__qualname__", repr(reward_fn)),
        "config": jsonable(cfg),
    }
    distributed.init_from_env()
    _check_divisible(method, cfg)  # the same error on every rank, before any collective
    main = distributed.is_main()
    if not main:
        log, progress, plots = (lambda *_: None), False, False
    claim_out_dir(out, run_config, "method/preset/seed/reward/sizes")
    ctx = _Context(cfg, out, seed, reward_fn, progress, log)
    curves = {"run": run_config, **_RUNNERS[method](ctx)}
    if method == "warp":
        curves["versus_baseline"] = [
            _versus_baseline([(p["kl"], p["true"]) for p in it["front"]], curves["baseline"])
            for it in curves["iterations"]
        ]
    elif method == "bond":
        c = curves["jbond"]
        curves["versus_baseline"] = _versus_baseline(
            list(zip(c["kl"], c["true"], strict=True)), curves["baseline"]
        )
    table = summary_table(curves)
    if main:
        write_atomic(out / "curves.json", json.dumps(jsonable(curves), indent=1))
        write_atomic(out / "summary.md", table + "\n")
    log(table)
    if plots:
        for path in plot_curves(curves, out):
            log(f"wrote {path}")
    return curves


__all__ = ["METHODS", "PRESETS", "RLHFPreset", "preset_config", "run_rlhf", "summary_table"]

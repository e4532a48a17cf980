"""The stages the RLHF methods share, cached as checkpoints in the run directory: the oracle, the SFT
base policy, preference pairs, Bradley–Terry reward models and their calibration, KL-regularised RL
runs and the plain-RL baseline, and the held-out evaluation (:class:`Context`); and the small helpers
the methods' loops use."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .. import distributed
from ..distill import SamplePool, sft_loss
from ..loop import HELDOUT_SEED, ORACLE_POOL, SEED_STRIDE, oracle_stage, run_loop
from ..model import TinyLM
from ..rundir import checkpoint_path, slug
from . import merge
from .config import RLHFPreset
from .reward import RewardFn, RewardModel, bradley_terry_loss, check_rewards
from .rl import kl_to_anchor, rl_step


class Order:
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


def frozen(model: TinyLM | RewardModel):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable(model):
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def row_mean(values: dict, rows: int) -> dict:
    """Per-row means of this rank's part of an evaluation set, averaged over ranks weighted by the
    row counts (every row holds the same number of tokens): the whole set's means, in ``values``' order."""
    mean = distributed.weighted_mean(values, rows)
    return {k: mean[k] for k in values}


def series(record: dict, *keys: str) -> dict:
    """``{"steps": [...], key: [...]}`` from a record's evaluations."""
    out = {"steps": [e["step"] for e in record["eval"]]}
    for key in keys:
        out[key] = [e[key] for e in record["eval"]]
    return out


class Calibrated:
    """A reward function ``a · score(cat(x, y)) + b`` (no grad), ``a > 0``."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], a: float, b: float):
        self.score, self.a, self.b = score, a, b

    @torch.no_grad()
    def __call__(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return self.a * self.score(torch.cat([prompts, completions], 1)).float() + self.b


class Context:
    """One seed's shared pieces: task, reward, oracle, base policy (cached), evaluation, RMs.

    ``run_seed`` is the seed; ``seed`` is the base of its random streams, ``run_seed · SEED_STRIDE``
    (every stage seeds its generator ``seed + offset``, offsets below the stride), so no two seeds share
    a stream and seed 0 draws what the single-seed runs drew. Its checkpoints lie under
    ``checkpoints/seed<run_seed>/``."""

    def __init__(self, cfg: RLHFPreset, out: Path, seed: int, reward_fn, progress: bool, log):
        self.cfg, self.out, self.progress, self.log = cfg, out, progress, log
        self.run_seed, self.seed = seed, seed * SEED_STRIDE
        self.task = cfg.task
        self.P, self.L = self.task.prompt_len, self.task.length
        self.reward_fn = reward_fn or self.task.true_reward
        self.oracle = oracle_stage(cfg.oracle, out, self.seed, f"seed{seed}/oracle")
        gen = torch.Generator().manual_seed(self.seed + HELDOUT_SEED)
        self.eval_prompts = self.task.prompts(cfg.eval_prompts, gen)
        self.eval_seed = self.seed + HELDOUT_SEED + 1  # the evaluation's completions: another stream
        self._sft, self._calib = None, None

    def checkpoint(self, name: str) -> Path:
        """The checkpoint file of this seed's stage ``name``."""
        return checkpoint_path(self.out, f"seed{self.run_seed}/{slug(name)}")

    def train(self, name: str, checkpoint: str, steps: int, step: Callable[[], dict], **kwargs) -> dict:
        """:func:`~fdistill.trainer.loop.run_loop` (its keyword arguments) with the run's progress bars
        and log, checkpointed as the stage ``checkpoint``; returns the record."""
        return run_loop(
            name, self.checkpoint(checkpoint), steps, step, progress=self.progress, log=self.log, **kwargs
        )

    def true(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return check_rewards(self.reward_fn(prompts, completions), prompts.shape[0]).float()

    @property
    def sft(self) -> TinyLM:
        """The base policy: likelihood training on fresh oracle samples (cached stage)."""
        if self._sft is None:
            cfg = self.cfg
            torch.manual_seed(self.seed + 1)
            model = trainable(TinyLM(cfg.policy))
            opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
            gen = torch.Generator().manual_seed(self.seed + 1)
            pool = SamplePool(self.oracle, self.task, ORACLE_POOL)

            def step():
                loss = sft_loss(model, distributed.shard(pool.take(cfg.sft_batch, gen)), self.P)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                (mean_loss,) = distributed.average_gradients(model.parameters(), loss.item())
                opt.step()
                return {"loss": mean_loss}

            self.log("stage: base policy (SFT on oracle samples)")
            self.train(
                "sft",
                "sft",
                cfg.sft_steps,
                step,
                models={"policy": model},
                optimizers={"policy": opt},
                generators={"data": gen},
                data=pool,
            )
            self._sft = frozen(model)
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
        return row_mean(out, seqs.shape[0])

    # --- preferences and reward models

    def preferences(self, which: str) -> dict:
        """``train`` (noisy Bradley–Terry labels) or ``heldout`` pairs of SFT samples (deterministic)."""
        n, offset = {"train": (self.cfg.pairs, 20_000), "heldout": (self.cfg.heldout_pairs, 20_001)}[which]
        gen = torch.Generator().manual_seed(self.seed + offset)
        return self.task.preferences(self.sft, n, gen, self.cfg.label_temperature, self.true)

    def reward_model(self, index: int, prefs: dict, lr_scale: float = 1.0) -> RewardModel:
        """RM number ``index`` (its data order), from the SFT policy, Bradley–Terry (cached stage)."""
        cfg = self.cfg
        rm = trainable(RewardModel.from_lm(self.sft))
        opt = torch.optim.Adam(rm.parameters(), lr=cfg.rm_lr * lr_scale)
        gen = torch.Generator().manual_seed(self.seed + 30_000 + index)
        order = Order(prefs["chosen"].shape[0])

        def step():
            idx = distributed.shard(order.batch(cfg.rm_batch, gen))  # this rank's pairs of the batch
            loss = bradley_terry_loss(rm(prefs["chosen"][idx]), rm(prefs["rejected"][idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (mean_loss,) = distributed.average_gradients(rm.parameters(), loss.item())
            opt.step()
            return {"loss": mean_loss}

        steps = cfg.rm_epochs * math.ceil(prefs["chosen"].shape[0] / cfg.rm_batch)
        self.train(
            f"rm{index}",
            f"rm{index}",
            steps,
            step,
            models={"rm": rm},
            optimizers={"rm": opt},
            generators={"data": gen},
            data=order,
        )
        return frozen(rm)

    @torch.no_grad()
    def calibrate(self, score: Callable[[torch.Tensor], torch.Tensor]) -> Calibrated:
        """``score`` mapped affinely to the true reward's mean and std on SFT samples."""
        if self._calib is None:
            gen = torch.Generator().manual_seed(self.seed + 40_000)
            seqs = self.sft.sample(self.task.prompts(self.cfg.calibration, gen), self.L, generator=gen)
            self._calib = (seqs, self.true(seqs[:, : self.P], seqs[:, self.P :]))
        seqs, r = self._calib
        s = score(seqs).float()
        a = float(r.std() / s.std().clamp_min(1e-8))
        return Calibrated(score, a, float(r.mean()) - a * float(s.mean()))

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
        prompts: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    ) -> tuple[dict, TinyLM]:
        """REINFORCE (RLOO) from ``init`` (default the SFT policy) against ``reward_fn``, with the
        fixed SFT anchor, or an EMA anchor (rate ``ema``) starting at ``init``, on prompts drawn by
        ``prompts(n, generator)`` (default the task's); cached stage."""
        draw = prompts or self.task.prompts
        cfg = self.cfg
        policy = trainable(copy.deepcopy(self.sft))
        if init is not None:
            policy.load_state_dict(init)
        anchor = self.sft if ema is None else frozen(copy.deepcopy(policy))
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.rl_lr)
        gen = torch.Generator().manual_seed(self.seed + 50_000 + seed)

        def step():
            metrics = rl_step(
                policy,
                anchor,
                opt,
                draw(cfg.rl_prompts, gen),
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
        record = self.train(
            name,
            name,
            steps,
            step,
            models=models,
            optimizers={"policy": opt},
            generators={"rl": gen},
            evaluate=lambda: self.evaluate(policy, proxies),
            eval_every=cfg.eval_every,
            ckpt_every=cfg.ckpt_every,
        )
        return record, frozen(policy)

    def baseline(self, betas, steps: int) -> dict:
        """Plain RL on the true reward with the fixed SFT anchor, one run per β."""
        runs = {}
        for i, beta in enumerate(betas):
            name = f"RL beta={beta:g}"
            self.log(f"stage: {name} ({steps} steps)")
            record, _ = self.rl_run(name, self.true, beta, steps, seed=100 + i)
            runs[name] = {"beta": beta, **series(record, "true", "kl", "repeat")}
        return runs

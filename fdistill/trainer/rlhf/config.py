"""The RLHF experiments' configuration: each method's settings, the shared preset, and the named
presets (``tiny``, ``smoke``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..model import LMConfig
from .task import RewardTask


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
    (β, μ) ∈ {(0.01, 0.05), (0.03, 0.05), (0.01, 0.01), (0.1, 0.1)}; none reached it.

    ``prompts`` (:data:`WARP_PROMPTS`) is what the M policies of an iteration train on. Every policy
    has its own generator (prompts and samples; seed ``1000 + 10 · iteration + m``), so with
    ``"shared"`` each draws its own fresh prompts from the whole prompt space, in its own order, and
    its own samples: the same prompt distribution, different data order and sampling seed — the
    paper's setup (one prompt dataset, policies that differ in seed and data order), which is why
    the presets use it. ``"disjoint"`` makes them more independent still: policy m only sees prompts
    whose second token is ≡ m (mod M), a disjoint share of the prompt space (each share holds both
    halves of the first token, which picks the good set). With ``cosine_probe`` the first iteration
    also trains its M policies under the other setting, from the same init, and reports their task
    vectors' cosine next to the run's (the merge still uses ``prompts``')."""

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
    prompts: str = "shared"
    cosine_probe: bool = True


WARP_PROMPTS = ("shared", "disjoint")


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
    steps, and each method's settings. The models' vocab and context come from the task. The whole
    pipeline (oracle, SFT, RMs, the method's runs) runs once per seed of ``seeds``, each from its own
    random streams."""

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
    seeds: tuple = (0,)


PRESETS = {
    "tiny": RLHFPreset(seeds=(0, 1, 2)),
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
    return complete(PRESETS[name])


def complete(cfg: RLHFPreset) -> RLHFPreset:
    """``cfg`` with the models' vocab and context set from its task."""
    task = cfg.task
    context = task.prompt_len + task.length
    return replace(
        cfg,
        oracle=replace(cfg.oracle, vocab=task.vocab, context=context),
        policy=replace(cfg.policy, vocab=task.vocab, context=context),
    )


def check_config(cfg: RLHFPreset) -> None:
    """The settings every method relies on (each method module checks its own: ``check``)."""
    if cfg.group < 2:
        raise ValueError(f"group must be >= 2 (the leave-one-out baseline), got {cfg.group}")


def rl_batches(cfg: RLHFPreset, *, reward_models: bool) -> dict:
    """The batch sizes of the SFT and RL stages (and of the reward models' training when
    ``reward_models``) by name: under ``torchrun`` each must divide by the world size."""
    sizes = {"sft_batch": cfg.sft_batch, "rl_prompts": cfg.rl_prompts}
    return sizes | ({"rm_batch": cfg.rm_batch} if reward_models else {})

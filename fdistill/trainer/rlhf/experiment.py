"""RLHF experiments on the synthetic task of :mod:`.task`: ``python -m fdistill rlhf --method M``.

The methods share cached stages (``out/checkpoints/*.safetensors``):

- **oracle** (random, peaked TinyLM) and **sft** (the base policy: likelihood training on fresh oracle
  samples) — see :mod:`.task`;
- **reward models**: :class:`~.reward.RewardModel` s initialised from the SFT policy and trained with
  Bradley–Terry on noisy preference pairs of SFT samples (:meth:`.task.RewardTask.preferences`). A
  learned RM is used through an affine **calibration** to the true reward's units (mean and standard
  deviation on SFT samples; order-preserving, so it changes nothing but the scale): "proxy" and "true"
  rewards are then on one axis and the same β means the same thing for both.

Methods (``run_rlhf(method, ...)``), one module each in :mod:`.methods` (training, table, plots):
``rl`` (KL-regularised REINFORCE against the true reward and the learned RM), ``warp`` (WARP: EMA
anchors, SLERP, LITI), ``bond`` (J-BOND), ``warm`` (weight-averaged reward models vs ensembles and
single RMs) and ``irl`` (TD-regularised MLE). The configuration is :mod:`.config`, the shared stages
:mod:`.stages`, and the tables, plots and ``curves.json`` are written with the teacher-hacking
experiment's :mod:`fdistill.trainer.report`.

The whole pipeline runs once per seed of ``RLHFPreset.seeds`` (or ``run_rlhf(seeds=...)``), each seed
from its own random streams (:class:`~.stages.Context`) with its checkpoints under
``checkpoints/seed<seed>/``, so a seed's curves are the same whether it runs alone or with others.
``curves.json`` holds every seed's curves (``per_seed``) and the method's aggregate over the seeds
(``aggregate(per_seed)``: each number's mean, std, min and max, :func:`~fdistill.trainer.report.seed_band`);
the tables give "mean (min–max over the seeds)" and the plots draw the mean with its min–max band (one
seed: just the numbers and lines).

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

import pickle
from dataclasses import replace
from pathlib import Path

import torch

from .. import distributed
from ..extras import require_for_run
from ..parallel import check_jobs, run_tasks, spawns
from ..report import check_seeds, publish
from ..rundir import claim_out_dir, jsonable
from .config import (
    PRESETS,
    BONDConfig,
    IRLConfig,
    RLConfig,
    RLHFPreset,
    WARMConfig,
    WARPConfig,
    check_config,
    complete,
    preset_config,
)
from .methods import REGISTRY
from .reward import RewardFn, check_rewards
from .stages import Context

METHODS = tuple(REGISTRY)


def run_rlhf(
    method: str,
    preset: str | RLHFPreset = "tiny",
    out: str | Path | None = None,
    *,
    seeds=None,
    reward_fn: RewardFn | None = None,
    jobs: int = 1,
    progress: bool = True,
    plots: bool = True,
    log=print,
) -> dict:
    """Run (or resume) one method's experiment; writes ``out/curves.json``, ``out/summary.md`` and
    PNG plots; returns the curves dict. ``seeds`` (distinct ints) overrides the preset's: one run of
    the whole pipeline per seed.

    ``reward_fn(prompts (B, P), completions (B, L)) -> (B,)`` replaces the task's true reward
    everywhere (labels, RL, metrics); it must return finite floats of that shape (ValueError
    otherwise). It is recorded in ``run.json`` by name only.

    ``jobs`` > 1 runs that many seeds at a time in worker processes, each on this process's torch
    thread count (:mod:`~fdistill.trainer.parallel`: the same bytes as ``jobs=1``, no progress bars,
    log lines prefixed with the seed); ``reward_fn`` must then be picklable (a module-level function),
    and a script must call it under ``if __name__ == "__main__":``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data parallel (see the module's docstring); the
    training batch sizes (``sft_batch``, ``rm_batch``, ``rl_prompts``, ``irl.batch``) must divide by
    the world size, and ``jobs`` must be 1. Rank 0 writes the files and logs."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    cfg = complete(preset) if isinstance(preset, RLHFPreset) else preset_config(preset)
    preset_name = "custom" if isinstance(preset, RLHFPreset) else preset
    cfg = replace(cfg, seeds=check_seeds(cfg.seeds if seeds is None else seeds))
    module = REGISTRY[method]
    check_config(cfg)
    module.check(cfg)
    parallel = spawns(check_jobs(jobs), len(cfg.seeds))
    if parallel and reward_fn is not None:
        try:
            pickle.dumps(reward_fn)
        except Exception as exc:  # lambdas, closures, bound methods of unpicklable objects
            raise ValueError(
                f"reward_fn must be picklable to run seeds in worker processes (jobs={jobs}): define it at "
                f"a module's top level, or use jobs=1 ({exc})"
            ) from None
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
        "reward": "task.true_reward"
        if reward_fn is None
        else getattr(reward_fn, "__qualname__", repr(reward_fn)),
        "config": jsonable(cfg),
    }
    distributed.init_from_env()
    if jobs > 1 and distributed.world() > 1:
        raise ValueError(f"jobs must be 1 under torchrun (each rank is already a process), got {jobs}")
    for name, size in module.batches(cfg).items():  # the same error on every rank, before any collective
        distributed.check_divisible(size, name)
    main = distributed.is_main()
    if not main:
        log, progress, plots = (lambda *_: None), False, False
    claim_out_dir(out, run_config, "method/preset/seeds/reward/sizes")
    tasks = [(method, cfg, out, seed, reward_fn, progress and not parallel) for seed in cfg.seeds]
    runs = run_tasks(_run_seed, tasks, [f"seed {seed}" for seed in cfg.seeds], jobs=jobs, log=log)
    per_seed = {str(seed): run for seed, run in zip(cfg.seeds, runs, strict=True)}
    curves = {"run": run_config, "seeds": list(cfg.seeds), **module.aggregate(per_seed), "per_seed": per_seed}
    publish(out, curves, module.summary(curves), module.plot, main=main, plots=plots, log=log)
    return curves


def _run_seed(method: str, cfg: RLHFPreset, out: Path, seed: int, reward_fn, progress: bool, *, log) -> dict:
    """One seed's whole pipeline for ``method``; returns its curves."""
    return REGISTRY[method].run(Context(cfg, out, seed, reward_fn, progress, log))


def summary_table(curves: dict) -> str:
    """The Markdown summary of a run's curves."""
    return REGISTRY[curves["run"]["method"]].summary(curves)


def plot_curves(curves: dict, out: Path) -> list[Path]:
    """The method's PNG plots; returns their paths."""
    return REGISTRY[curves["run"]["method"]].plot(curves, out)


__all__ = [
    "METHODS",
    "PRESETS",
    "BONDConfig",
    "IRLConfig",
    "RLConfig",
    "RLHFPreset",
    "WARMConfig",
    "WARPConfig",
    "plot_curves",
    "preset_config",
    "run_rlhf",
    "summary_table",
]

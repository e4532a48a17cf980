"""The teacher-hacking experiment: oracle -> teacher -> student, offline vs online distillation data.

Setup (Tiapkin et al., 2025, at toy scale; see docs/algorithms.md#teacher-hacking):

- **oracle**: a randomly initialised transformer with a sharpened LM head (``head_scale``). Its
  next-token distributions are the ground truth: peaked, context-dependent through attention over
  the whole sequence, exactly computable, and free to sample — a synthetic language with known
  probabilities, so golden metrics are exact expectations rather than estimates against a corpus.
- **teacher**: a larger model than the student, distilled (forward KL, fresh oracle samples) from the
  oracle, with a fixed random **tilt** of scale ``teacher_tilt``
  (:class:`~fdistill.trainer.model.TiltedLM`, keyed on ``tilt_key``) either on its training target
  (``tilt_on="target"``) or added to the trained teacher (``"teacher"``, the tiny preset: an exactly
  known error keyed on (position, token)): good on the oracle's contextual structure, with a
  systematic error that a student can learn — the imperfect teacher a student can hack. (An attention
  window, ``LMConfig.attn_window``, is the other structured error on offer; at this scale it did not make
  the student hack: see the README.)
- **student**: smaller; starts from ``sft_steps`` of likelihood training (SFT) on fresh oracle samples
  (tiny: none, a random student), then is distilled from the teacher, once per data source, from the
  same start: ``offline`` fixed datasets of ``prompts x generations`` teacher completions generated
  once, and ``online`` fresh completions every step, from the teacher or on-policy from the student
  (GKD's lambda).
- **metrics** on held-out prompts every ``eval_every`` steps: proxy = per-token KL(teacher || student)
  on completions sampled from the teacher, golden = per-token KL(oracle || student) on completions
  sampled from the oracle (each the sequence-level KL per token, by the chain rule). A
  :class:`~fdistill.trainer.monitor.TeacherHackingMonitor` per run fits the early golden-vs-proxy
  power law and flags departures and "golden up while proxy down".

The whole pipeline runs once per seed (``Preset.seeds``); the report gives every seed's curves and their
mean and min–max band. Every stage checkpoints (safetensors, atomic) and a rerun resumes where it stopped.

Under ``torchrun --nproc_per_node N`` (gloo, CPU) the stages are data parallel
(:mod:`~fdistill.trainer.distributed`): every rank draws the same global batches and trains on its
slice, gradients and metrics are averaged over ranks, rank 0 writes; the run matches the 1-process run
up to floating-point summation order and resumes on any world size.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import distributed
from .checkpoint import CheckpointError
from .distill import (
    LOSSES,
    OfflineData,
    OnlineData,
    SamplePool,
    Task,
    check_compatible,
    distillation_loss,
    sequence_kl,
    sft_loss,
)
from .extras import require_for_run
from .loop import HELDOUT_SEED, ORACLE_POOL, SEED_STRIDE, oracle_stage, run_loop
from .model import TILT_KEYS, LMConfig, TiltedLM, TinyLM
from .monitor import TeacherHackingMonitor
from .parallel import check_jobs, run_tasks, spawns
from .report import (
    TEACHER_HACKING_DPI,
    argmin,
    band_cell,
    check_seeds,
    markdown_table,
    mean,
    plot_band,
    publish,
    pyplot,
    save_figure,
    scalar_band,
    seed_band,
)
from .rundir import checkpoint_path, claim_out_dir, jsonable, slug


@dataclass(frozen=True)
class Source:
    """One student data source: ``offline`` (``prompts`` x ``generations`` teacher completions, fixed)
    or ``online`` (fresh each step; ``lmbda`` = probability of an on-policy, student-sampled batch)."""

    name: str
    kind: str
    prompts: int = 0
    generations: int = 1
    lmbda: float = 0.0


TILT_ON = ("target", "teacher")


@dataclass(frozen=True)
class Preset:
    vocab: int = 32
    prompt_len: int = 8
    length: int = 16
    oracle: LMConfig = LMConfig(width=64, depth=2, heads=4, context=24, head_scale=8.0, attn_gain=6.0)
    teacher: LMConfig = LMConfig(width=64, depth=2, heads=4, context=24)
    student: LMConfig = LMConfig(width=32, depth=1, heads=2, context=24)
    teacher_tilt: float = 0.7  # scale of the tilt of the teacher's target (0: the oracle itself)
    tilt_key: str = "token"  # what the tilt is keyed on: TiltedLM's key (model.TILT_KEYS)
    tilt_on: str = "target"  # TILT_ON: tilt the teacher's training target, or the trained teacher itself
    teacher_steps: int = 300
    sft_steps: int = 300
    distill_steps: int = 600
    batch: int = 32
    lr: float = 1e-3
    distill_lr: float = 1e-3
    eval_every: int = 30
    eval_prompts: int = 256
    ckpt_every: int = 150
    sources: tuple = (
        Source("offline 32x1", "offline", prompts=32, generations=1),
        Source("offline 128x1", "offline", prompts=128, generations=1),
        Source("online teacher", "online", lmbda=0.0),
    )
    monitor: dict = field(default_factory=lambda: {"fit_points": 5, "tolerance": 0.1, "patience": 2})
    seeds: tuple = (0,)  # one run per seed (oracle, teacher, student and data all drawn from it)


# the tiny preset's teacher error and student schedule (the smoke preset shares them; README)
USHAPE = {
    "teacher_tilt": 1.0,
    "tilt_key": "token_position",
    "tilt_on": "teacher",
    "teacher_steps": 200,
    "sft_steps": 0,
    "distill_lr": 3e-3,
}

PRESETS = {
    "tiny": Preset(
        **USHAPE,
        distill_steps=300,
        eval_every=20,
        eval_prompts=128,
        ckpt_every=100,
        sources=(
            Source("offline 32x4", "offline", prompts=32, generations=4),
            Source("offline 128x4", "offline", prompts=128, generations=4),
            Source("offline 32x16", "offline", prompts=32, generations=16),
            Source("online teacher", "online", lmbda=0.0),
            Source("online mixed (lambda 0.5)", "online", lmbda=0.5),
        ),
        monitor={"law": "golden_vs_step", "fit_points": 4, "skip": 1, "tolerance": 0.075, "patience": 3},
        seeds=(0, 1, 2, 3),  # 4, not 3: two rounds of two workers on 2 cores either way
    ),
    "small": Preset(
        vocab=64,
        length=24,
        oracle=LMConfig(vocab=64, width=128, depth=3, heads=4, context=32, head_scale=8.0, attn_gain=6.0),
        teacher=LMConfig(vocab=64, width=96, depth=2, heads=4, context=32),
        student=LMConfig(vocab=64, width=48, depth=1, heads=2, context=32),
        teacher_steps=1500,
        sft_steps=1500,
        distill_steps=4000,
        eval_every=100,
        sources=(
            Source("offline 64x1", "offline", prompts=64),
            Source("offline 16x4", "offline", prompts=16, generations=4),
            Source("offline 1024x1", "offline", prompts=1024),
            Source("online teacher", "online"),
            Source("online mixed (lambda 0.5)", "online", lmbda=0.5),
        ),
    ),
    "smoke": Preset(
        **{**USHAPE, "teacher_steps": 20, "sft_steps": 20},
        distill_steps=40,
        eval_every=10,
        eval_prompts=32,
        ckpt_every=20,
        sources=(Source("offline 8x1", "offline", prompts=8), Source("online teacher", "online")),
        monitor={"fit_points": 2, "tolerance": 0.1, "patience": 1},
    ),
}


def preset_config(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    return replace(
        preset,
        oracle=replace(preset.oracle, vocab=preset.vocab),
        teacher=replace(preset.teacher, vocab=preset.vocab),
        student=replace(preset.student, vocab=preset.vocab),
    )


def _train(
    model,
    name,
    ckpt,
    steps,
    batch_fn,
    loss_fn,
    lr,
    generator,
    *,
    evaluate=None,
    eval_every=0,
    ckpt_every=0,
    data=None,
    progress=True,
    log=None,
):
    """Adam on ``loss_fn(batch_fn())`` for ``steps`` steps, resumable (:func:`~.loop.run_loop`).

    Returns the run's record: ``{"train": [{"loss"}, ...], "eval": [{"step", ...metrics}], "done"}``.

    ``batch_fn`` gives the global batch; under ``torchrun`` each rank takes its slice, and the gradients
    and the loss are averaged over ranks before Adam's step (the same step on every rank)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step():
        loss = loss_fn(distributed.shard(batch_fn()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        (mean_loss,) = distributed.average_gradients(model.parameters(), loss.item())
        opt.step()
        return {"loss": mean_loss}

    return run_loop(name, ckpt, steps, step, models={name: model}, optimizers={name: opt},
                    generators={"data": generator}, data=data, evaluate=evaluate, eval_every=eval_every,
                    ckpt_every=ckpt_every, progress=progress, log=log)  # fmt: skip


def _train_on_oracle(oracle, model, name, ckpt, steps, loss_fn, task, cfg, seed, progress, log):
    """A cached stage: ``loss_fn`` on fresh oracle samples, checkpointed at ``ckpt``."""
    gen = torch.Generator().manual_seed(seed)
    pool = SamplePool(oracle, task, ORACLE_POOL)
    _train(model, name, ckpt, steps, lambda: pool.take(cfg.batch, gen), loss_fn, cfg.lr, gen, data=pool,
           progress=progress, log=log)  # fmt: skip


def run_teacher_hacking(
    preset: str | Preset = "tiny",
    out: str | Path = "runs/teacher-hacking",
    *,
    seeds=None,
    divergence: str = "forward_kl",
    fused: bool = False,
    jobs: int = 1,
    progress: bool = True,
    plots: bool = True,
    log=print,
) -> dict:
    """Run (or resume) the experiment once per seed (``seeds``, default the preset's); writes
    ``out/curves.json`` (every seed's curves and, per data source, their mean and min/max band),
    ``out/summary.md`` and PNG plots; returns the curves dict.

    ``jobs`` > 1 runs that many seeds at a time in worker processes, each on this process's torch
    thread count (:mod:`~.parallel`; the same bytes as ``jobs=1``; no progress bars, log lines
    prefixed with the seed; a script must call it under ``if __name__ == "__main__":``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group and trains data parallel;
    ``batch`` must divide by the world size, and ``jobs`` must be 1. Rank 0 writes the files and
    logs."""
    cfg = preset if isinstance(preset, Preset) else preset_config(preset)
    preset = "custom" if isinstance(preset, Preset) else preset
    cfg = replace(cfg, seeds=check_seeds(cfg.seeds if seeds is None else seeds))
    if cfg.tilt_on not in TILT_ON:
        raise ValueError(f"Preset.tilt_on must be one of {list(TILT_ON)}, got {cfg.tilt_on!r}")
    if cfg.tilt_key not in TILT_KEYS:
        raise ValueError(f"Preset.tilt_key must be one of {list(TILT_KEYS)}, got {cfg.tilt_key!r}")
    if divergence not in LOSSES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {list(LOSSES)}")
    check_jobs(jobs)
    require_for_run(progress=progress, plots=plots)
    distributed.init_from_env()
    distributed.check_divisible(cfg.batch, "the preset's batch")
    if jobs > 1 and distributed.world() > 1:
        raise ValueError(f"jobs must be 1 under torchrun (each rank is already a process), got {jobs}")
    main = distributed.is_main()
    if not main:
        log, progress, plots = (lambda *_: None), False, False
    out = Path(out)
    run_config = {"preset": preset, "divergence": divergence, "fused": fused, "config": jsonable(cfg)}
    claim_out_dir(out, run_config, "preset/seeds/divergence/sizes")
    bars = progress and not spawns(jobs, len(cfg.seeds))
    tasks = [(cfg, out, seed, divergence, fused, bars) for seed in cfg.seeds]
    labels = [f"seed {seed}" for seed in cfg.seeds]
    runs = run_tasks(_run_seed, tasks, labels, jobs=jobs, log=log)
    per_seed = {str(seed): run for seed, run in zip(cfg.seeds, runs, strict=True)}
    curves = {"run": run_config, **aggregate_seeds(per_seed, cfg.monitor), "per_seed": per_seed}
    publish(out, curves, summary_table(curves), plot_curves, main=main, plots=plots, log=log)
    return curves


def _run_seed(cfg: Preset, out: Path, seed: int, divergence, fused, progress, *, log) -> dict:
    """One seed's oracle, teacher, student start and distillation runs (checkpoints under
    ``checkpoints/seed<seed>/``); returns its curves. Its random streams start at
    ``seed · SEED_STRIDE``, so no two seeds share one."""
    base = seed * SEED_STRIDE

    def ckpt(stage):
        return checkpoint_path(out, f"seed{seed}/{stage}")

    task = Task(cfg.vocab, cfg.prompt_len, cfg.length)
    oracle = oracle_stage(cfg.oracle, out, base, f"seed{seed}/oracle")

    gen_eval = torch.Generator().manual_seed(base + HELDOUT_SEED)  # held-out prompts: their own stream
    eval_prompts = task.prompts(cfg.eval_prompts, gen_eval)
    golden_seqs = oracle.sample(eval_prompts, task.length, generator=gen_eval)

    # stage 1: the teacher, distilled from the (tilted) oracle on fresh oracle samples (cached)
    torch.manual_seed(base + 1)
    teacher = TinyLM(cfg.teacher)
    check_compatible(oracle, teacher, task)

    def tilted(model):  # the same table for either placement: its own generator
        gen = torch.Generator().manual_seed(base + 7)
        return TiltedLM(model, cfg.teacher_tilt, gen, cfg.tilt_key, cfg.prompt_len)

    target = tilted(oracle) if cfg.tilt_on == "target" else oracle
    log(f"stage 1: teacher <- oracle (tilt {cfg.teacher_tilt:g} on the {cfg.tilt_on}, key {cfg.tilt_key})")
    distill_from_oracle = lambda seqs: distillation_loss(teacher, target, seqs, task.prompt_len)  # noqa: E731
    _train_on_oracle(oracle, teacher, "teacher", ckpt("teacher"), cfg.teacher_steps,
                     distill_from_oracle, task, cfg, base + 1, progress, log)  # fmt: skip
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.tilt_on == "teacher":  # the trained teacher plus the tilt's table: an exactly known error
        teacher = tilted(teacher)
    proxy_seqs = teacher.sample(eval_prompts, task.length, generator=gen_eval)

    # stage 2: the student's start, likelihood training on fresh oracle samples (cached)
    torch.manual_seed(base + 2)
    student0 = TinyLM(cfg.student)
    check_compatible(teacher, student0, task)
    log(f"stage 2: student SFT on oracle samples ({cfg.sft_steps} steps)")
    sft_on_oracle = lambda seqs: sft_loss(student0, seqs, task.prompt_len)  # noqa: E731
    _train_on_oracle(oracle, student0, "student", ckpt("student_sft"), cfg.sft_steps,
                     sft_on_oracle, task, cfg, base + 2, progress, log)  # fmt: skip

    # each rank scores its part of the held-out set; count-weighted means over ranks
    proxy_part, golden_part = distributed.split(proxy_seqs), distributed.split(golden_seqs)

    def golden(model):
        return sequence_kl(oracle, model, golden_part, task.prompt_len)

    def metrics(model):
        local = {"proxy": sequence_kl(teacher, model, proxy_part, task.prompt_len), "golden": golden(model)}
        return distributed.weighted_mean(local, proxy_part.shape[0])

    teacher_golden = distributed.weighted_mean({"golden": golden(teacher)}, golden_part.shape[0])["golden"]
    curves = {"teacher_golden": teacher_golden, "student_start": metrics(student0), "sources": {}}
    start = curves["student_start"]
    log(
        f"teacher golden KL(oracle || teacher) = {teacher_golden:.4f}; "
        f"student start: proxy {start['proxy']:.4f}, golden {start['golden']:.4f}"
    )

    # stage 3: the student distilled from the teacher, once per data source
    for i, source in enumerate(cfg.sources):
        student = copy.deepcopy(student0).train()
        gen = torch.Generator().manual_seed(base + 100 + i)
        if source.kind == "offline":
            data = OfflineData(teacher, task, source.prompts, source.generations, gen)
        else:
            data = OnlineData(task, teacher, student, source.lmbda, cfg.batch)
        log(f"stage 3: student <- teacher, {source.name}")
        record = _train(
            student,
            "student",
            ckpt(f"distill_{slug(source.name)}"),
            cfg.distill_steps,
            lambda d=data, g=gen: d.batch(cfg.batch, g),
            lambda seqs, s=student: distillation_loss(s, teacher, seqs, task.prompt_len, divergence, fused),
            cfg.distill_lr,
            gen,
            evaluate=lambda s=student: metrics(s),
            eval_every=cfg.eval_every,
            ckpt_every=cfg.ckpt_every,
            data=data,
            progress=progress,
            log=log,
        )
        steps = [p["step"] for p in record["eval"]]
        proxy, gold = [p["proxy"] for p in record["eval"]], [p["golden"] for p in record["eval"]]
        monitor, events = watch(cfg.monitor, steps, proxy, gold)
        curves["sources"][source.name] = {
            "source": asdict(source),
            "steps": steps,
            "proxy": proxy,
            "golden": gold,
            "train_loss": [t["loss"] for t in record["train"]],
            "monitor": monitor,
            "events": events,
        }
    return curves


def watch(options: dict, steps, proxy, golden) -> tuple[dict, list]:
    """A :class:`~.monitor.TeacherHackingMonitor` (``options``) fed one curve; (its summary, events)."""
    monitor = TeacherHackingMonitor(**options)
    events = []
    for step, p, g in zip(steps, proxy, golden, strict=True):
        events += monitor.update(step, proxy=p, golden=g)
    return monitor.summary(), events


def aggregate_seeds(per_seed: dict, monitor: dict) -> dict:
    """Across the seeds' curves (``per_seed``: seed -> curves): the teacher's golden, the student's
    start and, per data source, the proxy and golden :func:`~.report.seed_band` (mean, std, min,
    max per evaluation), each seed's golden minimum and flags, and the monitor run on the mean curve."""
    runs = list(per_seed.values())
    sources = {}
    for name, first in runs[0]["sources"].items():
        each = [r["sources"][name] for r in runs]
        if any(c["steps"] != first["steps"] for c in each):
            raise ValueError(f"the seeds evaluated {name!r} at different steps")
        proxy, gold = seed_band(c["proxy"] for c in each), seed_band(c["golden"] for c in each)
        summary, events = watch(monitor, first["steps"], proxy["mean"], gold["mean"])
        sources[name] = {
            "source": first["source"],
            "steps": first["steps"],
            "proxy": proxy,
            "golden": gold,
            "monitor": summary,
            "events": events,
            "golden_min_step": [c["steps"][argmin(c["golden"])] for c in each],
            "departure_step": [c["monitor"]["departure_step"] for c in each],
            "hacking_step": [c["monitor"]["hacking_step"] for c in each],
        }
    return {
        "seeds": [int(s) for s in per_seed],
        "teacher_golden": scalar_band([r["teacher_golden"] for r in runs]),
        "student_start": {k: scalar_band([r["student_start"][k] for r in runs]) for k in ("proxy", "golden")},
        "sources": sources,
    }


def summary_table(curves: dict) -> str:
    """The Markdown summary: per data source, proxy and golden (mean over the seeds, their min–max in
    brackets) from start to end, the step of the mean golden's minimum and the monitor's flags on the
    mean curve, each seed's in brackets."""
    head = [
        "data source",
        "proxy start → end",
        "golden start → min → end",
        "golden-min step",
        "departure step",
        "hacking step",
    ]
    rows = []
    for name, c in curves["sources"].items():
        proxy, gold = c["proxy"], c["golden"]
        best, last = argmin(gold["mean"]), len(c["steps"]) - 1
        m = c["monitor"]
        rows.append([
            name,
            f"{band_cell(proxy, 0)} → {band_cell(proxy, last)}",
            f"{band_cell(gold, 0)} → {band_cell(gold, best)} → {band_cell(gold, last)}",
            _steps_cell(c["steps"][best], c["golden_min_step"]),
            _steps_cell(m["departure_step"], c["departure_step"]),
            _steps_cell(m["hacking_step"], c["hacking_step"]),
        ])  # fmt: skip
    seeds = ", ".join(str(s) for s in curves["seeds"])
    return (
        f"Seeds {seeds}: mean (min–max over the seeds); steps: of the mean curve (each seed's).\n\n"
        + markdown_table(head, rows)
    )


def _steps_cell(on_mean, per_seed) -> str:
    show = lambda step: "-" if step is None else str(step)  # noqa: E731
    return f"{show(on_mean)} ({', '.join(show(s) for s in per_seed)})" if len(per_seed) > 1 else show(on_mean)


def plot_curves(curves: dict, out: Path) -> list[Path]:
    """``curves.png`` (proxy and golden vs step, per data source: the mean over the seeds and their
    min–max band; with ``law="golden_vs_step"`` the monitor's early power law and flags on the golden
    panel) and ``golden_vs_proxy.png`` (log-log mean curves with the golden band, with
    ``law="golden_vs_proxy"`` the fitted law; and the late part, where a U shows, on linear axes), the
    flagged steps marked (o departure, x hacking)."""
    plt = pyplot()
    sources = curves["sources"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in sources.items():
        steps = [max(s, 1) for s in c["steps"]]
        plot_band(axes[0], steps, c["proxy"], label=name)
        line = plot_band(axes[1], steps, c["golden"], label=name)
        if c["monitor"]["law"] == "golden_vs_step":
            _law(axes[1], c, steps, line.get_color())
            _flags(axes[1], c, steps, line.get_color())
    axes[1].axhline(mean(curves["teacher_golden"]["mean"]), color="k", ls=":", lw=1, label="teacher's golden")
    for ax, title in zip(
        axes, ("proxy: KL(teacher || student)", "golden: KL(oracle || student)"), strict=True
    ):
        ax.set(xscale="log", yscale="log", xlabel="step", title=f"{title}; band: min–max over seeds")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    first = save_figure(fig, out / "curves.png", TEACHER_HACKING_DPI)

    fig, (ax, late) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, c in sources.items():
        proxy, gold = c["proxy"]["mean"], c["golden"]["mean"]
        line = plot_band(ax, proxy, c["golden"], marker=".", label=name)
        if c["monitor"]["law"] == "golden_vs_proxy":
            _law(ax, c, proxy, line.get_color())
            _flags(ax, c, proxy, line.get_color())
        keep = [i for i, s in enumerate(c["steps"]) if s >= LATE_FROM]
        late.plot([proxy[i] for i in keep], [gold[i] for i in keep], marker=".", color=line.get_color())
        _flags(late, c, proxy, line.get_color(), since=LATE_FROM)
    ax.set(xscale="log", yscale="log", xlabel="proxy (mean over seeds)", ylabel="golden",
           title="golden vs proxy, mean over seeds (band: golden min–max)")  # fmt: skip
    late.set(xlabel="proxy (mean over seeds)", ylabel="golden",
             title=f"from step {LATE_FROM} (linear axes; o departure, x hacking)")  # fmt: skip
    late.invert_xaxis()  # training runs left to right: proxy falls
    for a in (ax, late):
        a.title.set_fontsize(9)
        a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    second = save_figure(fig, out / "golden_vs_proxy.png", TEACHER_HACKING_DPI)
    return [first, second]


LATE_FROM = 100  # golden_vs_proxy.png's second panel: the evaluations from this step on


def _law(ax, c: dict, xs: list, color) -> None:
    """The monitor's fitted law ``golden = e^a x^b`` over the range of ``xs``, dashed."""
    fit = c["monitor"]["fit"]
    if fit is not None and min(xs) > 0:
        lo, hi = min(xs), max(xs)
        grid = [lo * (hi / lo) ** (i / 20) for i in range(21)]
        law = [math.exp(fit["log_a"]) * x ** fit["exponent"] for x in grid]
        ax.plot(grid, law, ls="--", lw=1, color=color)


def _flags(ax, c: dict, xs: list, color, since: int = 0) -> None:
    """The monitor's flagged steps from step ``since`` on (o departure, x hacking) at ``(xs, golden)``."""
    for key, marker in (("departure_step", "o"), ("hacking_step", "x")):
        step = c["monitor"][key]
        if step is not None and step >= since:
            i = c["steps"].index(step)
            ax.plot(xs[i], c["golden"]["mean"][i], marker=marker, ms=10, mfc="none", color=color)


__all__ = [
    "PRESETS",
    "Preset",
    "aggregate_seeds",
    "check_seeds",
    "Source",
    "CheckpointError",
    "plot_curves",
    "preset_config",
    "run_teacher_hacking",
    "summary_table",
]

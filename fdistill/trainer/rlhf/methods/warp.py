"""``warp``: WARP — per iteration, M = 2 RL runs from the iteration's init with an EMA anchor
(``r − β log(π/π_ema)``, ``θ_ema ← (1−μ) θ_ema + μ θ``) that differ in prompt order; SLERP of their
task vectors (λ); LITI ``θ_η = (1−η) θ_init + η θ_slerp`` is the next init. Each iteration's front is
the LITI sweep η ∈ [0, 1]. Baseline: plain RL with the fixed SFT anchor at several β (points along
training), with at least WARP's total number of RL steps."""

from __future__ import annotations

import copy
import math
from pathlib import Path

from ...checkpoint import load_checkpoint
from ...loop import save_on_main
from ...report import argmax
from .. import frontier, merge
from ..config import RLHFPreset, rl_batches
from ..frontier import versus_baseline
from ..stages import Context, frozen, series


def check(cfg: RLHFPreset) -> None:
    if cfg.warp.policies != 2:
        raise ValueError(f"WARP's SLERP merges exactly 2 policies, got policies={cfg.warp.policies}")


def batches(cfg: RLHFPreset) -> dict:
    """The training batches that split over ranks under ``torchrun``."""
    return rl_batches(cfg, reward_models=False)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.warp
    curves = {"sft": ctx.evaluate(ctx.sft), "iterations": [], "baseline": {}}
    init = {k: v.clone() for k, v in ctx.sft.state_dict().items()}
    probe = frozen(copy.deepcopy(ctx.sft))
    for it in range(cfg.iterations):
        path = ctx.checkpoint(f"warp_iteration{it}")
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
            runs.append(series(record, "true", "kl", "repeat"))
            finals.append(policy.state_dict())
        merged = merge.slerp(init, finals[0], finals[1], cfg.lam)
        cosine = task_vector_cosine(init, finals[0], finals[1])
        front = []
        for eta in cfg.front_etas:
            probe.load_state_dict(merge.liti(init, merged, eta))
            front.append({"eta": eta, **ctx.evaluate(probe)})
        init = merge.liti(init, merged, cfg.eta)
        probe.load_state_dict(init)
        meta = {"runs": runs, "task_vector_cosine": cosine, "front": front,
                "liti": {"eta": cfg.eta, **ctx.evaluate(probe)}}  # fmt: skip
        save_on_main(path, models={"next_init": probe}, meta=meta)
        curves["iterations"].append(meta)
        point = meta["liti"]
        ctx.log(f"  iteration {it}: task vectors' cosine {cosine:.3f}; LITI(η={cfg.eta}) true "
                f"{point['true']:.3f} at KL {point['kl']:.2f}")  # fmt: skip
    curves["baseline"] = ctx.baseline(cfg.baseline_betas, cfg.baseline_steps)
    curves["versus_baseline"] = [
        versus_baseline([(p["kl"], p["true"]) for p in it["front"]], curves["baseline"])
        for it in curves["iterations"]
    ]
    return curves


def task_vector_cosine(init: dict, a: dict, b: dict) -> float:
    """Cosine of the angle between the whole task vectors ``a − init`` and ``b − init``."""
    dot = na = nb = 0.0
    for key, base in init.items():
        if base.is_floating_point():
            d1, d2 = (a[key] - base).double(), (b[key] - base).double()
            dot += float((d1 * d2).sum())
            na += float(d1.square().sum())
            nb += float(d2.square().sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


def summary(curves: dict) -> str:
    rows = []
    for i, it in enumerate(curves["iterations"]):
        front, liti = it["front"], it["liti"]
        b = argmax([p["true"] for p in front])
        rows.append([f"WARP iteration {i + 1} (task vectors' cosine {it['task_vector_cosine']:.2f}): "
                     f"LITI η={liti['eta']:g} → next init", f"{liti['true']:.3f}",
                     f"{liti['kl']:.2f}", f"front: {front[b]['true']:.3f} @ KL {front[b]['kl']:.2f}",
                     frontier.margin(curves["versus_baseline"][i])])  # fmt: skip
    return frontier.summary(curves, rows)


def plot(curves: dict, out: Path) -> list[Path]:
    """``pareto.png``: each iteration's LITI front, its next init (★) and RL'd policies (×) vs RL."""

    def draw(ax):
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

    return frontier.plot(curves, out, draw, "WARP fronts (★ LITI η → next init, × RL'd policies) vs RL")

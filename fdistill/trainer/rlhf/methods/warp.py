"""``warp``: WARP — per iteration, M = 2 RL runs from the iteration's init with an EMA anchor
(``r − β log(π/π_ema)``, ``θ_ema ← (1−μ) θ_ema + μ θ``) that differ in their seed (prompts, their
order and the samples; ``WARPConfig.prompts = "disjoint"``: also in their share of the prompt space);
SLERP of their task vectors (λ); LITI ``θ_η = (1−η) θ_init + η θ_slerp`` is the next init. Each
iteration's front is the LITI sweep η ∈ [0, 1]. Baseline: plain RL with the fixed SFT anchor at several
β (points along training), with at least WARP's total number of RL steps. With
``WARPConfig.cosine_probe`` the first iteration's M policies are trained again under the other prompt
setting, for their task vectors' cosine."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ...checkpoint import load_checkpoint
from ...loop import save_on_main
from ...report import argmax, band_cell, plot_band, scalar_band, seed_band
from .. import frontier, merge
from ..bands import band_dict, same
from ..config import WARP_PROMPTS, RLHFPreset, rl_batches
from ..frontier import versus_baseline
from ..stages import Context, frozen, series

SHARED, DISJOINT = WARP_PROMPTS


def check(cfg: RLHFPreset) -> None:
    if cfg.warp.policies != 2:
        raise ValueError(f"WARP's SLERP merges exactly 2 policies, got policies={cfg.warp.policies}")
    if cfg.warp.prompts not in WARP_PROMPTS:
        raise ValueError(f"warp.prompts must be one of {list(WARP_PROMPTS)}, got {cfg.warp.prompts!r}")
    disjoint = cfg.warp.prompts == DISJOINT or cfg.warp.cosine_probe  # the probe runs the other setting
    if disjoint and (cfg.task.prompt_len < 2 or cfg.task.vocab < cfg.warp.policies):
        raise ValueError(
            "warp.prompts='disjoint' (or warp.cosine_probe) splits the prompts by their second token: it "
            f"needs prompt_len >= 2 and vocab >= policies, got {cfg.task.prompt_len} and {cfg.task.vocab}"
        )


def _other(setting: str) -> str:
    return next(p for p in WARP_PROMPTS if p != setting)


def prompt_share(ctx: Context, setting: str, m: int):
    """Policy ``m``'s prompts: the task's (``"shared"``), or the task's with the second token moved
    into the residue class ``m`` mod M (``"disjoint"``: the M policies see disjoint prompt sets)."""
    if setting == SHARED:
        return None
    M, vocab = ctx.cfg.warp.policies, ctx.task.vocab

    def prompts(n: int, generator: torch.Generator) -> torch.Tensor:
        x = ctx.task.prompts(n, generator)
        col = x[:, 1] - x[:, 1] % M + m
        x[:, 1] = torch.where(col >= vocab, col - M, col)
        return x

    return prompts


def _policies(ctx: Context, init: dict, it: int, setting: str, suffix: str = ""):
    """Iteration ``it``'s M RL runs from ``init`` on ``setting``'s prompts: (their series, final states)."""
    cfg = ctx.cfg.warp
    runs, finals = [], []
    for m in range(cfg.policies):
        name = f"WARP it{it} policy{m}{suffix}"
        ctx.log(f"stage: {name} ({cfg.steps} steps, EMA anchor, {setting} prompts)")
        share = prompt_share(ctx, setting, m)
        record, policy = ctx.rl_run(name, ctx.true, cfg.beta, cfg.steps, init=init, ema=cfg.mu,
                                    seed=1000 + 10 * it + m, prompts=share)  # fmt: skip
        runs.append(series(record, "true", "kl", "repeat"))
        finals.append(policy.state_dict())
    return runs, finals


def batches(cfg: RLHFPreset) -> dict:
    """The training batches that split over ranks under ``torchrun``."""
    return rl_batches(cfg, reward_models=False)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.warp
    curves = {"sft": ctx.evaluate(ctx.sft), "iterations": [], "baseline": {}}
    init = {k: v.clone() for k, v in ctx.sft.state_dict().items()}
    sft_state = dict(init)
    probe = frozen(copy.deepcopy(ctx.sft))
    for it in range(cfg.iterations):
        path = ctx.checkpoint(f"warp_iteration{it}")
        if path.exists():
            meta = load_checkpoint(path, models={"next_init": probe})
            init = {k: v.clone() for k, v in probe.state_dict().items()}
            curves["iterations"].append(meta)
            continue
        runs, finals = _policies(ctx, init, it, cfg.prompts)
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
    curves["cosine"] = {cfg.prompts: curves["iterations"][0]["task_vector_cosine"]}
    if cfg.cosine_probe:  # the first iteration again, from the SFT policy, under the other setting
        other = _other(cfg.prompts)
        _, finals = _policies(ctx, sft_state, 0, other, f" ({other} prompts)")
        curves["cosine"][other] = task_vector_cosine(sft_state, finals[0], finals[1])
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


def aggregate(per_seed: dict) -> dict:
    """Across the seeds: per iteration, the task vectors' cosine, the LITI front (true, KL and repeat
    rate at each η), the next init and the RL'd policies' final points, as bands; the baseline's bands;
    each seed's comparison with its own RL frontier (``versus_baseline[iteration]``, a list over the
    seeds) and the mean fronts' with the mean baseline curves' frontier (``mean_versus_baseline``);
    the first iteration's cosine under each prompt setting (``cosine``)."""
    runs = list(per_seed.values())
    iterations = []
    for i in range(same((len(r["iterations"]) for r in runs), "the number of iterations")):
        each = [r["iterations"][i] for r in runs]
        fronts = [e["front"] for e in each]
        iterations.append({
            "task_vector_cosine": scalar_band([e["task_vector_cosine"] for e in each]),
            "front": {"eta": same(([p["eta"] for p in f] for f in fronts), "the front's η")}
            | {k: seed_band([p[k] for p in f] for f in fronts) for k in ("true", "kl", "repeat")},
            "liti": band_dict([e["liti"] for e in each], scalars=("true", "kl", "repeat"), fixed=("eta",)),
            "policies": [
                {k: scalar_band([e["runs"][m][k][-1] for e in each]) for k in ("true", "kl")}
                for m in range(len(each[0]["runs"]))
            ],
        })  # fmt: skip
    baseline = frontier.aggregate_baseline(runs)
    mean_base = frontier.mean_baseline(baseline)
    return {
        "sft": band_dict([r["sft"] for r in runs], scalars=("true", "kl", "repeat")),
        "iterations": iterations,
        "baseline": baseline,
        "versus_baseline": [[r["versus_baseline"][i] for r in runs] for i in range(len(iterations))],
        "mean_versus_baseline": [
            versus_baseline(
                list(zip(it["front"]["kl"]["mean"], it["front"]["true"]["mean"], strict=True)), mean_base
            )
            for it in iterations
        ],  # fmt: skip
        "cosine": {k: scalar_band([r["cosine"][k] for r in runs]) for k in runs[0]["cosine"]},
    }


def summary(curves: dict) -> str:
    rows = []
    for i, it in enumerate(curves["iterations"]):
        front, liti = it["front"], it["liti"]
        b = argmax(front["true"]["mean"])
        cosine = band_cell(it["task_vector_cosine"], 0, 2)
        rows.append([f"WARP iteration {i + 1} (task vectors' cosine {cosine}): "
                     f"LITI η={liti['eta']:g} → next init", band_cell(liti["true"], 0),
                     band_cell(liti["kl"], 0, 2),
                     f"front: {band_cell(front['true'], b)} @ KL {band_cell(front['kl'], b, 2)}",
                     frontier.margins(curves["versus_baseline"][i])])  # fmt: skip
    if len(curves["seeds"]) > 1:
        for i, v in enumerate(curves["mean_versus_baseline"]):
            rows.append([f"WARP iteration {i + 1}, mean front vs the mean RL curves' frontier", "", "", "",
                         frontier.margin(v)])  # fmt: skip
    table = frontier.summary(curves, rows)
    cosines = "; ".join(f"{k} prompts {band_cell(b, 0, 3)}" for k, b in curves["cosine"].items())
    return f"{table}\n\nFirst iteration's task vectors' cosine by the policies' prompts: {cosines}"


def plot(curves: dict, out: Path) -> list[Path]:
    """``pareto.png``: each iteration's LITI front, its next init (★) and RL'd policies (×) vs RL."""

    def draw(ax):
        for i, it in enumerate(curves["iterations"]):
            f = it["front"]
            line = plot_band(ax, f["kl"]["mean"], f["true"], marker="o", ms=3, lw=2,
                             label=f"WARP iteration {i + 1} (LITI η ∈ [0, 1])")  # fmt: skip
            liti = it["liti"]
            ax.plot(liti["kl"]["mean"], liti["true"]["mean"], marker="*", ms=14, color=line.get_color())
            for r in it["policies"]:
                ax.plot(r["kl"]["mean"], r["true"]["mean"], marker="x", ms=8, color=line.get_color())

    return frontier.plot(curves, out, draw, "WARP fronts (★ LITI η → next init, × RL'd policies) vs RL")

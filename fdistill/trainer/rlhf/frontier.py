"""The plain-RL baseline's reward–KL frontier, and the comparison of a method's (KL, reward) points
with it (WARP's fronts, J-BOND's curve): the numbers, the aggregate over seeds, the Markdown table
and the plot. The table and the plot take the aggregated curves (bands over the seeds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..report import RLHF_DPI, argmax, band_cell, markdown_table, plot_band, pyplot, save_figure, scalar_band
from .bands import curve_bands, means, named, seeds_line

KL_AXIS = "KL(π ‖ π_sft) per sequence (nats)"


def envelope(points) -> Callable[[float], float]:
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


def baseline_points(baseline: dict) -> list:
    return [(kl, r) for run in baseline.values() for kl, r in zip(run["kl"], run["true"], strict=True)]


def versus_baseline(points, baseline: dict) -> dict:
    """How the method's ``(kl, reward)`` points compare with the best baseline reward at no more KL."""
    best = envelope(baseline_points(baseline))
    margins = [(r - best(kl), kl, r) for kl, r in points]
    top = max(margins)
    return {
        "points": len(margins),
        "above": sum(m > 0 for m, _, _ in margins),
        "best_margin": top[0],
        "at_kl": top[1],
        "worst_margin": min(margins)[0],
    }


def best_at(c: dict) -> str:
    """An aggregated run's best mean true reward and the KL it was reached at (bands over seeds)."""
    b = argmax(c["true"]["mean"])
    return f"{band_cell(c['true'], b)} @ KL {band_cell(c['kl'], b, 2)}"


def margin(v: dict) -> str:
    """:func:`versus_baseline`'s result in a table cell."""
    return f"{v['above']}/{v['points']}; best {v['best_margin']:+.3f} @ KL {v['at_kl']:.2f}"


def margins(per_seed: list[dict]) -> str:
    """Each seed's :func:`versus_baseline` in a table cell: one seed as :func:`margin`; several as the
    points above per seed and the best margin's mean (min–max)."""
    if len(per_seed) == 1:
        return margin(per_seed[0])
    above = ", ".join(str(v["above"]) for v in per_seed)
    best = band_cell(scalar_band([v["best_margin"] for v in per_seed]), 0)
    return f"{above} of {per_seed[0]['points']} per seed; best {best}"


def aggregate_baseline(per_seed: list[dict]) -> dict:
    """The seeds' baseline runs: per run, β, steps and the bands of true, KL and repeat rate."""

    def make(runs):
        return {"beta": runs[0]["beta"], **curve_bands(runs, ("true", "kl", "repeat"))}

    return named(per_seed, "baseline", make)


def mean_baseline(baseline: dict) -> dict:
    """The aggregated baseline's mean curves (for :func:`versus_baseline` and :func:`envelope`)."""
    return {name: means(c, "true", "kl") for name, c in baseline.items()}


def summary(curves: dict, rows: list) -> str:
    """The baseline's runs, then the method's ``rows`` (five cells each: run, true final, KL final,
    best true @ KL, :func:`margins`), in one table under the SFT policy's reward; the cells are the
    mean (min–max over the seeds)."""
    base = [[name, band_cell(c["true"], -1), band_cell(c["kl"], -1, 2), best_at(c), "-"]
            for name, c in curves["baseline"].items()]  # fmt: skip
    head = ["run", "true final", "KL final", "best true @ KL", "points above the RL frontier; best margin"]
    return f"{seeds_line(curves)}SFT: true {band_cell(curves['sft']['true'], 0)}\n\n" + markdown_table(
        head, base + rows
    )


def plot(curves: dict, out: Path, draw: Callable, title: str) -> list[Path]:
    """``pareto.png``: true reward vs KL of the baseline's runs (mean over the seeds, with the true
    reward's min–max band) and the frontier of the mean curves, the method's points (``draw(ax)``)
    and the SFT policy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, c in curves["baseline"].items():
        plot_band(ax, c["kl"]["mean"], c["true"], marker=".", ms=4, lw=1, alpha=0.8, label=name)
    points = baseline_points(mean_baseline(curves["baseline"]))
    best, top = envelope(points), max(kl for kl, _ in points)
    grid = [top * i / 200 for i in range(201)]
    ax.plot(grid, [best(k) for k in grid], color="gray", ls="--", lw=1, label="RL frontier (concave)")
    draw(ax)
    ax.plot([0], curves["sft"]["true"]["mean"], marker="s", color="k", ls="", label="SFT")
    ax.set(xlabel=KL_AXIS, ylabel="true reward", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [save_figure(fig, out / "pareto.png", RLHF_DPI)]

"""The experiments' reports, one module for all of them: Markdown tables, matplotlib figures (Agg
backend) and the run's outputs — ``curves.json``, ``summary.md`` and the PNG plots — written
atomically by rank 0 once the run has finished."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .files import write_atomic
from .rundir import jsonable

CURVES_JSON = "curves.json"
SUMMARY_MD = "summary.md"
# figure resolutions as each experiment first wrote them (kept, so that their PNGs stay byte-identical)
TEACHER_HACKING_DPI = 120
RLHF_DPI = 110


def markdown_table(head, rows) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with ``str``."""
    return "\n".join([_row(head), "|" + "|".join("---" for _ in head) + "|", *(_row(r) for r in rows)])


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def mean(values) -> float:
    return sum(values) / len(values)


def seed_band(runs) -> dict:
    """Across seeds, point by point: ``runs`` is one equally long list of numbers per seed; returns
    ``{"mean", "std", "min", "max"}``, each a list (``std`` is the population one, over the seeds)."""
    runs = [list(r) for r in runs]
    if not runs or any(len(r) != len(runs[0]) for r in runs):
        raise ValueError(f"runs must be one or more equally long series, got {[len(r) for r in runs]}")
    columns = list(zip(*runs, strict=True))
    means = [mean(c) for c in columns]
    return {
        "mean": means,
        "std": [mean([(v - m) ** 2 for v in c]) ** 0.5 for c, m in zip(columns, means, strict=True)],
        "min": [min(c) for c in columns],
        "max": [max(c) for c in columns],
    }


def check_seeds(seeds) -> tuple:
    """``seeds`` as a tuple of distinct ints (at least one)."""
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be one or more ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    return seeds


def scalar_band(values) -> dict:
    """A :func:`seed_band` of one number per seed (lists of length 1: ``band_cell(band, 0)``)."""
    return seed_band([[v] for v in values])


def band_cell(band: dict, i: int, digits: int = 3) -> str:
    """Point ``i`` of a :func:`seed_band` as ``mean (min–max)``; just the mean for one seed."""
    m, lo, hi = band["mean"][i], band["min"][i], band["max"][i]
    return f"{m:.{digits}f}" if lo == hi else f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def plot_band(ax, x, band: dict, **line) -> object:
    """The mean of a :func:`seed_band` as a line over ``x`` and its min–max as a shaded band of the
    same colour; returns the line."""
    (drawn,) = ax.plot(x, band["mean"], **line)
    ax.fill_between(x, band["min"], band["max"], color=drawn.get_color(), alpha=0.2, lw=0)
    return drawn


def argmax(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def argmin(values) -> int:
    return min(range(len(values)), key=lambda i: values[i])


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay out, write and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def finish_axes(axes, hline: float | None = None) -> None:
    """A light grid and a small legend on each of ``axes``, after a dotted reference line at ``hline``."""
    for ax in axes:
        if hline is not None:
            ax.axhline(hline, color="k", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def publish(
    out: Path,
    curves: dict,
    table: str,
    plot: Callable[[dict, Path], list[Path]],
    *,
    main: bool,
    plots: bool,
    log,
) -> None:
    """Write ``curves.json`` and ``summary.md`` (rank 0: ``main``), log the table, then draw the plots
    (``plot(curves, out)`` returns the files it wrote) when ``plots``."""
    if main:
        write_atomic(out / CURVES_JSON, json.dumps(jsonable(curves), indent=1))
        write_atomic(out / SUMMARY_MD, table + "\n")
    log(table)
    if plots:
        for path in plot(curves, out):
            log(f"wrote {path}")

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

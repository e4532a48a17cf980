"""PNG plots of a teacher-hacking run (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path


def plot_curves(curves: dict, out: Path) -> list[Path]:
    """``curves.png`` (proxy and golden vs step, per data source) and ``golden_vs_proxy.png``
    (log-log, with each run's fitted early power law and its flagged steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = curves["sources"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in sources.items():
        steps = [max(s, 1) for s in c["steps"]]
        axes[0].plot(steps, c["proxy"], label=name)
        axes[1].plot(steps, c["golden"], label=name)
    axes[1].axhline(curves["teacher_golden"], color="k", ls=":", lw=1, label="teacher's golden")
    for ax, title in zip(
        axes, ("proxy: KL(teacher || student)", "golden: KL(oracle || student)"), strict=True
    ):
        ax.set(xscale="log", yscale="log", xlabel="step", title=title)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    first = out / "curves.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, c in sources.items():
        (line,) = ax.plot(c["proxy"], c["golden"], marker=".", label=name)
        fit = c["monitor"]["fit"]
        if fit is not None:
            lo, hi = min(c["proxy"]), max(c["proxy"])
            xs = [lo * (hi / lo) ** (i / 20) for i in range(21)] if lo > 0 else []
            ax.plot(
                xs,
                [math.exp(fit["log_a"]) * x ** fit["exponent"] for x in xs],
                ls="--",
                lw=1,
                color=line.get_color(),
            )
        for key, marker in (("departure_step", "o"), ("hacking_step", "x")):
            step = c["monitor"][key]
            if step is not None:
                i = c["steps"].index(step)
                ax.plot(
                    c["proxy"][i], c["golden"][i], marker=marker, ms=10, mfc="none", color=line.get_color()
                )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="proxy",
        ylabel="golden",
        title="golden vs proxy (dashed: early power-law fit; o departure, x hacking)",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    second = out / "golden_vs_proxy.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]

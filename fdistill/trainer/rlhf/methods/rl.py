"""``rl``: KL-regularised REINFORCE (RLOO) at a few β against the true reward, and against the
calibrated learned RM: true reward, proxy reward and KL(π ‖ π_sft) along training."""

from __future__ import annotations

from pathlib import Path

from ...report import RLHF_DPI, band_cell, finish_axes, markdown_table, plot_band, pyplot, save_figure
from ..bands import band_dict, curve_bands, named, seeds_line
from ..config import RLHFPreset, rl_batches
from ..frontier import KL_AXIS, best_at
from ..metrics import accuracy, label_agreement
from ..stages import Context, series


def check(cfg: RLHFPreset) -> None:
    """Nothing beyond the shared settings."""


def batches(cfg: RLHFPreset) -> dict:
    """The training batches that split over ranks under ``torchrun``."""
    return rl_batches(cfg, reward_models=True)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.rl
    prefs = ctx.preferences("train")
    ctx.log("stage: reward model")
    rm = ctx.reward_model(0, prefs)
    proxy = ctx.calibrate(rm)
    heldout = ctx.preferences("heldout")
    curves = {
        "sft": ctx.evaluate(ctx.sft, {"proxy": proxy}),
        "rm": {
            "train_label_agreement": label_agreement(prefs),
            "heldout_accuracy": accuracy(rm, heldout),
        },
        "runs": {},
    }
    runs = [("true", beta) for beta in cfg.betas] + [("proxy", beta) for beta in cfg.proxy_betas]
    for i, (source, beta) in enumerate(runs):
        name = f"{'true reward' if source == 'true' else 'learned RM'} beta={beta:g}"
        ctx.log(f"stage: RL on the {name} ({cfg.steps} steps)")
        fn = ctx.true if source == "true" else proxy
        record, _ = ctx.rl_run(name, fn, beta, cfg.steps, seed=i, proxies={"proxy": proxy})
        curves["runs"][name] = {
            "reward": source,
            "beta": beta,
            **series(record, "true", "proxy", "kl", "repeat"),
        }
    return curves


def aggregate(per_seed: dict) -> dict:
    """Across the seeds: bands of the SFT policy's numbers, the RM's accuracy and label agreement, and
    per run the true reward, proxy, KL and repeat rate along training."""
    runs = list(per_seed.values())

    def make(each):
        return {"reward": each[0]["reward"], "beta": each[0]["beta"],
                **curve_bands(each, ("true", "proxy", "kl", "repeat"))}  # fmt: skip

    rm = [{"heldout_accuracy": r["rm"]["heldout_accuracy"]["accuracy"],
           "train_label_agreement": r["rm"]["train_label_agreement"]["agreement"]} for r in runs]  # fmt: skip
    return {
        "sft": band_dict([r["sft"] for r in runs], scalars=("true", "proxy", "kl", "repeat")),
        "rm": band_dict(rm, scalars=("heldout_accuracy", "train_label_agreement")),
        "runs": named(runs, "runs", make),
    }


def summary(curves: dict) -> str:
    sft, rm = curves["sft"], curves["rm"]
    rows = [
        [name, f"{band_cell(sft['true'], 0)} → {best_at(c)} → {band_cell(c['true'], -1)}",
         band_cell(c["proxy"], -1), band_cell(c["kl"], -1, 2), band_cell(c["repeat"], -1, 2)]
        for name, c in curves["runs"].items()
    ]  # fmt: skip
    head = ["RL run (optimised reward, β)", "true: SFT → best @ KL → final", "proxy final", "KL final",
            "repeat final"]  # fmt: skip
    return (
        f"{seeds_line(curves)}SFT: true {band_cell(sft['true'], 0)}, proxy {band_cell(sft['proxy'], 0)}, "
        f"repeat rate {band_cell(sft['repeat'], 0, 2)}. Learned RM: held-out accuracy "
        f"{band_cell(rm['heldout_accuracy'], 0)}; its training labels agree with the true reward on "
        f"{band_cell(rm['train_label_agreement'], 0)} of the non-tied pairs.\n\n" + markdown_table(head, rows)
    )


def plot(curves: dict, out: Path) -> list[Path]:
    """``reward_vs_kl.png``: true (and proxy) reward vs KL; true vs proxy along RL against the RM."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for name, c in curves["runs"].items():  # means over the seeds, min–max bands
        kl = c["kl"]["mean"]
        line = plot_band(axes[0], kl, c["true"], marker=".", label=f"{name}: true")
        if c["reward"] == "proxy":
            color = line.get_color()
            plot_band(axes[0], kl, c["proxy"], ls="--", color=color, label=f"{name}: proxy")
            plot_band(axes[1], c["steps"], c["true"], color=color, label=f"{name}: true")
            plot_band(axes[1], c["steps"], c["proxy"], ls="--", color=color, label=f"{name}: proxy")
    axes[0].set(xlabel=KL_AXIS, ylabel="reward", title="reward vs KL")
    axes[1].set(xlabel="RL step", ylabel="reward", title="RL against the learned RM: true vs proxy")
    finish_axes(axes, hline=curves["sft"]["true"]["mean"][0])
    return [save_figure(fig, out / "reward_vs_kl.png", RLHF_DPI)]

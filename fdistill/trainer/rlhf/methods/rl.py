"""``rl``: KL-regularised REINFORCE (RLOO) at a few β against the true reward, and against the
calibrated learned RM: true reward, proxy reward and KL(π ‖ π_sft) along training."""

from __future__ import annotations

from pathlib import Path

from ...report import RLHF_DPI, finish_axes, markdown_table, pyplot, save_figure
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


def summary(curves: dict) -> str:
    sft, rm = curves["sft"], curves["rm"]
    rows = [
        [name, f"{sft['true']:.3f} → {best_at(c)} → {c['true'][-1]:.3f}", f"{c['proxy'][-1]:.3f}",
         f"{c['kl'][-1]:.2f}", f"{c['repeat'][-1]:.2f}"]
        for name, c in curves["runs"].items()
    ]  # fmt: skip
    head = ["RL run (optimised reward, β)", "true: SFT → best @ KL → final", "proxy final", "KL final",
            "repeat final"]  # fmt: skip
    return (
        f"SFT: true {sft['true']:.3f}, proxy {sft['proxy']:.3f}, repeat rate {sft['repeat']:.2f}. "
        f"Learned RM: held-out accuracy {rm['heldout_accuracy']['accuracy']:.3f}; its training labels agree "
        f"with the true reward on {rm['train_label_agreement']['agreement']:.3f} of the non-tied pairs.\n\n"
        + markdown_table(head, rows)
    )


def plot(curves: dict, out: Path) -> list[Path]:
    """``reward_vs_kl.png``: true (and proxy) reward vs KL; true vs proxy along RL against the RM."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for name, c in curves["runs"].items():
        (line,) = axes[0].plot(c["kl"], c["true"], marker=".", label=f"{name}: true")
        if c["reward"] == "proxy":
            axes[0].plot(c["kl"], c["proxy"], ls="--", color=line.get_color(), label=f"{name}: proxy")
            axes[1].plot(c["steps"], c["true"], color=line.get_color(), label=f"{name}: true")
            axes[1].plot(c["steps"], c["proxy"], ls="--", color=line.get_color(), label=f"{name}: proxy")
    axes[0].set(xlabel=KL_AXIS, ylabel="reward", title="reward vs KL")
    axes[1].set(xlabel="RL step", ylabel="reward", title="RL against the learned RM: true vs proxy")
    finish_axes(axes, hline=curves["sft"]["true"])
    return [save_figure(fig, out / "reward_vs_kl.png", RLHF_DPI)]

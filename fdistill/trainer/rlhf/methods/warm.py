"""``warm``: M RMs from one shared init (the SFT policy + a zero head), diversified by data order and
learning rate; single RMs vs prediction ensemble vs WARM (weight average): preference accuracy on
held-out SFT pairs and on pairs from a shifted policy (RL'd on the true reward), agreement with the
wrong training labels (memorisation), then best-of-N and RL against the best single RM, the ensemble
and WARM: true vs proxy reward."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...report import RLHF_DPI, finish_axes, markdown_table, mean, pyplot, save_figure
from .. import metrics
from ..bond import best_of_n
from ..config import RLHFPreset, rl_batches
from ..reward import warm
from ..stages import Context, frozen, series


def check(cfg: RLHFPreset) -> None:
    if cfg.warm.models < 2:
        raise ValueError(f"warm.models must be >= 2 to merge, got {cfg.warm.models}")


def batches(cfg: RLHFPreset) -> dict:
    """The training batches that split over ranks under ``torchrun``."""
    return rl_batches(cfg, reward_models=True)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.warm
    prefs, heldout = ctx.preferences("train"), ctx.preferences("heldout")
    ctx.log(f"stage: {cfg.models} reward models from one init")
    rms = [ctx.reward_model(i, prefs, cfg.lr_scales[i % len(cfg.lr_scales)]) for i in range(cfg.models)]
    averaged = frozen(warm(rms))

    def ensemble_score(seqs):
        return torch.stack([rm(seqs) for rm in rms]).mean(0)

    ctx.log(f"stage: shifted policy (RL on the true reward, {cfg.shift_steps} steps)")
    _, shifted = ctx.rl_run("shift policy", ctx.true, cfg.shift_beta, cfg.shift_steps, seed=2000)
    gen = torch.Generator().manual_seed(ctx.seed + 70_000)
    shift = ctx.task.preferences(shifted, cfg.shift_pairs, gen, ctx.cfg.label_temperature, ctx.true)
    scorers = {f"RM {i}": rm for i, rm in enumerate(rms)} | {"ensemble": ensemble_score, "WARM": averaged}
    accuracy = {
        name: {
            "heldout": metrics.accuracy(score, heldout),
            "shifted": metrics.accuracy(score, shift),
            "wrong_labels_fitted": metrics.wrong_label_fit(score, prefs),
        }
        for name, score in scorers.items()
    }
    best = max((n for n in scorers if n.startswith("RM ")), key=lambda n: accuracy[n]["heldout"]["accuracy"])
    compared = {f"best single ({best})": scorers[best], "ensemble": ensemble_score, "WARM": averaged}
    proxies = {name: ctx.calibrate(score) for name, score in compared.items()}

    ctx.log("stage: best-of-N from the SFT policy")
    bon = best_of_n_curves(ctx, proxies, cfg.bon, cfg.bon_prompts)
    rl = {}
    for name, proxy in proxies.items():
        rl[name] = []
        for s in range(cfg.rl_seeds):
            ctx.log(f"stage: RL against {name}, seed {s} (beta={cfg.rl_beta:g}, {cfg.rl_steps} steps)")
            record, _ = ctx.rl_run(f"RL vs {name} seed {s}", proxy, cfg.rl_beta, cfg.rl_steps, seed=3000 + s,
                                   proxies={"proxy": proxy})  # fmt: skip
            rl[name].append(series(record, "true", "proxy", "kl", "repeat"))
    return {
        "sft": ctx.evaluate(ctx.sft),
        "train_label_agreement": metrics.label_agreement(prefs),
        "shift_policy": ctx.evaluate(shifted),
        "accuracy": accuracy,
        "best_single": best,
        "best_of_n": bon,
        "rl": rl,
    }


@torch.no_grad()
def best_of_n_curves(ctx: Context, proxies: dict, ns, prompts: int) -> dict:
    """Best-of-N of the SFT policy selected by each proxy (and by the true reward): mean true and
    proxy reward of the selected completions, with the KL bound ``log N − (N−1)/N``."""
    gen = torch.Generator().manual_seed(ctx.seed + 90_000)
    n_max = max(ns)
    x = ctx.task.prompts(prompts, gen).repeat_interleave(n_max, 0)
    seqs = ctx.sft.sample(x, ctx.L, generator=gen)
    true = ctx.true(seqs[:, : ctx.P], seqs[:, ctx.P :]).view(prompts, n_max)
    scores = {
        name: fn(seqs[:, : ctx.P], seqs[:, ctx.P :]).view(prompts, n_max) for name, fn in proxies.items()
    }
    out = {"n": list(ns), "kl_bound": [math.log(n) - (n - 1) / n for n in ns], "true reward (oracle BoN)": {}}
    for n in ns:
        pick = best_of_n(true[:, :n].flatten(), n) % n
        out["true reward (oracle BoN)"].setdefault("true", []).append(
            float(true[:, :n].gather(1, pick[:, None]).mean())
        )
    for name, s in scores.items():
        entry = {"true": [], "proxy": []}
        for n in ns:
            pick = best_of_n(s[:, :n].flatten(), n) % n
            entry["true"].append(float(true[:, :n].gather(1, pick[:, None]).mean()))
            entry["proxy"].append(float(s[:, :n].gather(1, pick[:, None]).mean()))
        out[name] = entry
    return out


def summary(curves: dict) -> str:
    rows = [[name, f"{a['heldout']['accuracy']:.3f}", f"{a['shifted']['accuracy']:.3f}",
             f"{a['wrong_labels_fitted']:.3f}"] for name, a in curves["accuracy"].items()]  # fmt: skip
    first = markdown_table(["reward model", "held-out accuracy (SFT pairs)",
                            "shifted accuracy (RL'd policy's pairs)", "wrong training labels fitted"],
                           rows)  # fmt: skip
    bon, n = curves["best_of_n"], curves["best_of_n"]["n"][-1]
    rows = []
    for name, runs in curves["rl"].items():
        best = mean([max(c["true"]) for c in runs])
        along = mean([mean(c["true"][1:]) for c in runs])
        final = f"{mean([c['true'][-1] for c in runs]):.3f} / {mean([c['proxy'][-1] for c in runs]):.3f}"
        rows.append([name, f"{bon[name]['true'][-1]:.3f} / {bon[name]['proxy'][-1]:.3f}", f"{best:.3f}",
                     f"{along:.3f}", final, f"{mean([c['kl'][-1] for c in runs]):.2f}"])  # fmt: skip
    k = len(next(iter(curves["rl"].values())))
    head = ["optimised against", f"best-of-{n}: true / proxy", f"RL: best true (mean of {k} seeds)",
            "RL: mean true along training", "RL final: true / proxy", "RL final KL"]  # fmt: skip
    second = markdown_table(head, rows)
    oracle = bon["true reward (oracle BoN)"]["true"][-1]
    return (
        f"SFT: true {curves['sft']['true']:.3f}; best-of-{n} selected by the true reward: {oracle:.3f}\n\n"
        f"{first}\n\n{second}"
    )


def plot(curves: dict, out: Path) -> list[Path]:
    """``warm.png``: preference accuracies, best-of-N and RL against each RM (true vs proxy)."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    names = list(curves["accuracy"])
    xs = range(len(names))
    for j, (key, label) in enumerate((("heldout", "held-out (SFT)"), ("shifted", "shifted (RL'd policy)"))):
        axes[0].bar(
            [x + 0.4 * j for x in xs],
            [curves["accuracy"][n][key]["accuracy"] for n in names],
            width=0.4,
            label=label,
        )
    axes[0].set_xticks([x + 0.2 for x in xs], names, fontsize=7, rotation=20)
    lo = min(curves["accuracy"][n][k]["accuracy"] for n in names for k in ("heldout", "shifted"))
    axes[0].set(ylim=(max(0.0, lo - 0.1), 1.0), ylabel="pairwise accuracy", title="preference accuracy")
    axes[0].legend(fontsize=7)
    bon = curves["best_of_n"]
    axes[1].plot(
        bon["kl_bound"],
        bon["true reward (oracle BoN)"]["true"],
        color="k",
        marker=".",
        label="selected by the true reward",
    )
    for name, runs in curves["rl"].items():
        (line,) = axes[1].plot(bon["kl_bound"], bon[name]["true"], marker=".", label=f"{name}: true")
        color = line.get_color()
        axes[1].plot(bon["kl_bound"], bon[name]["proxy"], ls="--", color=color, label=f"{name}: proxy")
        for s, c in enumerate(runs):
            axes[2].plot(c["steps"], c["true"], color=color, label=f"{name}: true" if s == 0 else None)
            axes[2].plot(c["steps"], c["proxy"], ls="--", color=color, lw=1,
                         label=f"{name}: proxy" if s == 0 else None)  # fmt: skip
    axes[1].set(xlabel="KL bound log N − (N−1)/N", ylabel="reward", title=f"best-of-N (N ≤ {bon['n'][-1]})")
    axes[2].set(
        xlabel="RL step", ylabel="reward", title="RL against each RM: true (—) vs proxy (--), all seeds"
    )
    finish_axes(axes[1:], hline=curves["sft"]["true"])
    return [save_figure(fig, out / "warm.png", RLHF_DPI)]

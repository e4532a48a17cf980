"""``warm``: M RMs from one shared init (the SFT policy + a zero head), diversified by data order and
learning rate; single RMs vs prediction ensemble vs WARM (weight average): preference accuracy on
held-out SFT pairs and on pairs from a shifted policy (RL'd on the true reward), agreement with the
wrong training labels (memorisation), then best-of-N and RL against the best single RM, the ensemble
and WARM: true vs proxy reward."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...report import (
    RLHF_DPI,
    band_cell,
    finish_axes,
    markdown_table,
    mean,
    plot_band,
    pyplot,
    save_figure,
    scalar_band,
    seed_band,
)
from .. import metrics
from ..bands import band_dict, curve_bands, same, seeds_line
from ..bond import best_of_n
from ..config import RLHFPreset, rl_batches
from ..reward import warm
from ..stages import Context, frozen, series

BEST = "best single RM"  # the RM of best held-out accuracy: per seed its name is ``best_single``


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
    compared = {BEST: scorers[best], "ensemble": ensemble_score, "WARM": averaged}
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


def aggregate(per_seed: dict) -> dict:
    """Across the seeds, as bands: the SFT policy's and the shifted policy's numbers, the label
    agreement, each scorer's accuracies (``"best single RM"``: each seed's best RM, named in
    ``best_single``), best-of-N by each proxy, and per RM optimised against the RL curves (each seed's
    mean over its ``rl_seeds`` runs) and their best, along-training mean and final numbers (each seed's
    mean over its runs)."""
    runs = list(per_seed.values())
    accuracy = {}
    for name in same((list(r["accuracy"]) for r in runs), "the reward models"):
        accuracy[name] = _accuracy_bands([r["accuracy"][name] for r in runs])
    accuracy[BEST] = _accuracy_bands([r["accuracy"][r["best_single"]] for r in runs])
    bons = [r["best_of_n"] for r in runs]
    bon = {"n": same((b["n"] for b in bons), "best-of-N's N"), "kl_bound": bons[0]["kl_bound"]}
    for name in bons[0]:
        if name not in bon:
            bon[name] = {k: seed_band(b[name][k] for b in bons) for k in bons[0][name]}
    rl = {}
    for name in same((list(r["rl"]) for r in runs), "the RL runs"):
        keys = ("true", "proxy", "kl", "repeat")
        per = [{"steps": same((c["steps"] for c in r["rl"][name]), "the steps")}
               | {k: [mean(v) for v in zip(*(c[k] for c in r["rl"][name]), strict=True)] for k in keys}
               | {"best_true": mean([max(c["true"]) for c in r["rl"][name]]),
                  "mean_true": mean([mean(c["true"][1:]) for c in r["rl"][name]])}
               for r in runs]  # fmt: skip
        rl[name] = curve_bands(per, keys) | band_dict(per, scalars=("best_true", "mean_true"))
        rl[name]["runs_per_seed"] = same((len(r["rl"][name]) for r in runs), "the RL seeds")
    return {
        "sft": band_dict([r["sft"] for r in runs], scalars=("true", "kl", "repeat")),
        "train_label_agreement": scalar_band([r["train_label_agreement"]["agreement"] for r in runs]),
        "shift_policy": band_dict([r["shift_policy"] for r in runs], scalars=("true", "kl", "repeat")),
        "accuracy": accuracy,
        "best_single": [r["best_single"] for r in runs],
        "best_of_n": bon,
        "rl": rl,
    }


def _accuracy_bands(each: list[dict]) -> dict:
    return {
        "heldout": scalar_band([a["heldout"]["accuracy"] for a in each]),
        "shifted": scalar_band([a["shifted"]["accuracy"] for a in each]),
        "wrong_labels_fitted": scalar_band([a["wrong_labels_fitted"] for a in each]),
    }


def summary(curves: dict) -> str:
    keys = ("heldout", "shifted", "wrong_labels_fitted")
    rows = [[name, *(band_cell(a[k], 0) for k in keys)] for name, a in curves["accuracy"].items()]
    first = markdown_table(["reward model", "held-out accuracy (SFT pairs)",
                            "shifted accuracy (RL'd policy's pairs)", "wrong training labels fitted"],
                           rows)  # fmt: skip
    bon, n = curves["best_of_n"], curves["best_of_n"]["n"][-1]
    rows = []
    for name, c in curves["rl"].items():
        final = f"{band_cell(c['true'], -1)} / {band_cell(c['proxy'], -1)}"
        rows.append([name, f"{band_cell(bon[name]['true'], -1)} / {band_cell(bon[name]['proxy'], -1)}",
                     band_cell(c["best_true"], 0), band_cell(c["mean_true"], 0), final,
                     band_cell(c["kl"], -1, 2)])  # fmt: skip
    k = next(iter(curves["rl"].values()))["runs_per_seed"]
    head = ["optimised against", f"best-of-{n}: true / proxy", f"RL: best true (mean of {k} runs)",
            "RL: mean true along training", "RL final: true / proxy", "RL final KL"]  # fmt: skip
    second = markdown_table(head, rows)
    oracle = band_cell(bon["true reward (oracle BoN)"]["true"], -1)
    best = ", ".join(curves["best_single"])
    return (
        f"{seeds_line(curves)}SFT: true {band_cell(curves['sft']['true'], 0)}; best-of-{n} selected by the "
        f"true reward: {oracle}; best single RM (held-out accuracy), per seed: {best}\n\n"
        f"{first}\n\n{second}"
    )


def plot(curves: dict, out: Path) -> list[Path]:
    """``warm.png``: preference accuracies, best-of-N and RL against each RM (true vs proxy); means over
    the seeds with their min–max (error bars, bands)."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    names = list(curves["accuracy"])
    xs = range(len(names))
    for j, (key, label) in enumerate((("heldout", "held-out (SFT)"), ("shifted", "shifted (RL'd policy)"))):
        bands = [curves["accuracy"][n][key] for n in names]
        heights = [b["mean"][0] for b in bands]
        spread = [[h - b["min"][0] for h, b in zip(heights, bands, strict=True)],
                  [b["max"][0] - h for h, b in zip(heights, bands, strict=True)]]  # fmt: skip
        axes[0].bar([x + 0.4 * j for x in xs], heights, width=0.4, label=label, yerr=spread, capsize=2)
    axes[0].set_xticks([x + 0.2 for x in xs], names, fontsize=7, rotation=20)
    lo = min(curves["accuracy"][n][k]["min"][0] for n in names for k in ("heldout", "shifted"))
    axes[0].set(ylim=(max(0.0, lo - 0.1), 1.0), ylabel="pairwise accuracy", title="preference accuracy")
    axes[0].legend(fontsize=7)
    bon = curves["best_of_n"]
    plot_band(axes[1], bon["kl_bound"], bon["true reward (oracle BoN)"]["true"], color="k", marker=".",
              label="selected by the true reward")  # fmt: skip
    for name, c in curves["rl"].items():
        line = plot_band(axes[1], bon["kl_bound"], bon[name]["true"], marker=".", label=f"{name}: true")
        color = line.get_color()
        plot_band(axes[1], bon["kl_bound"], bon[name]["proxy"], ls="--", color=color, label=f"{name}: proxy")
        plot_band(axes[2], c["steps"], c["true"], color=color, label=f"{name}: true")
        plot_band(axes[2], c["steps"], c["proxy"], ls="--", color=color, lw=1, label=f"{name}: proxy")
    axes[1].set(xlabel="KL bound log N − (N−1)/N", ylabel="reward", title=f"best-of-N (N ≤ {bon['n'][-1]})")
    axes[2].set(xlabel="RL step", ylabel="reward", title="RL against each RM: true (—) vs proxy (--)")
    finish_axes(axes[1:], hline=curves["sft"]["true"]["mean"][0])
    return [save_figure(fig, out / "warm.png", RLHF_DPI)]

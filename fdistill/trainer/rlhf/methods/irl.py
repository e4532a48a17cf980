"""``irl``: TD-regularised MLE (inverse soft-Q) with several λ (λ = 0 is MLE) on a fixed dataset of
oracle (expert) sequences, from one random init: held-out KL(oracle ‖ model), diversity of samples,
and the correlation of the extracted rewards ``Q(s,a) − γ v(s')`` with the oracle's log-likelihood."""

from __future__ import annotations

from pathlib import Path

import torch

from ... import distributed
from ...distill import sequence_kl
from ...model import TinyLM
from ...report import (
    RLHF_DPI,
    argmin,
    band_cell,
    finish_axes,
    markdown_table,
    plot_band,
    pyplot,
    save_figure,
)
from ..bands import band_dict, curve_bands, named, seeds_line
from ..config import RLHFPreset
from ..irl import extracted_rewards, td_regularised_mle_loss
from ..stages import Context, Order, row_mean, series, trainable


def check(cfg: RLHFPreset) -> None:
    if any(not lam >= 0 for lam in cfg.irl.lambdas):
        raise ValueError(f"irl.lambdas must be >= 0, got {cfg.irl.lambdas}")


def batches(cfg: RLHFPreset) -> dict:
    """The training batches that split over ranks under ``torchrun`` (IRL trains no SFT policy)."""
    return {"irl.batch": cfg.irl.batch}


def run(ctx: Context) -> dict:
    cfg, top = ctx.cfg.irl, ctx.cfg
    P, L = ctx.P, ctx.L
    gen = torch.Generator().manual_seed(ctx.seed + 80_000)
    expert = ctx.oracle.sample(ctx.task.prompts(cfg.dataset, gen), L, generator=gen)
    golden = ctx.oracle.sample(ctx.eval_prompts, L, generator=gen)  # held-out expert sequences
    with torch.no_grad():
        oracle_logp = ctx.oracle.sequence_logprobs(golden, P)  # (B, L)
    oracle_stats = sample_stats(ctx, ctx.oracle)
    reference = {"oracle_entropy": oracle_stats["entropy"], "oracle_distinct2": oracle_stats["distinct2"]}

    def evaluate(model):
        with torch.no_grad():
            rewards = extracted_rewards(model.completion_logits(golden, P), golden[:, P:], cfg.gamma)
        part = distributed.split(golden)
        return {
            "kl": row_mean({"kl": sequence_kl(ctx.oracle, model, part, P)}, part.shape[0])["kl"],
            **sample_stats(ctx, model),
            "reward_corr_token": pearson(rewards.flatten(), oracle_logp.flatten()),
            "reward_corr_seq": pearson(rewards.sum(-1), oracle_logp.sum(-1)),
        }

    runs = {}
    for i, lam in enumerate(cfg.lambdas):
        torch.manual_seed(ctx.seed + 2)  # one init for every λ
        model = trainable(TinyLM(top.policy))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(ctx.seed + 81_000)  # one data order for every λ
        order = Order(cfg.dataset)

        def step(model=model, opt=opt, g=g, order=order, lam=lam):
            seqs = distributed.shard(expert[order.batch(cfg.batch, g)])
            loss = td_regularised_mle_loss(model.completion_logits(seqs, P), seqs[:, P:], lam, cfg.gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (mean_loss,) = distributed.average_gradients(model.parameters(), loss.item())
            opt.step()
            return {"loss": mean_loss}

        name = "MLE (lambda=0)" if lam == 0 else f"TD-regularised lambda={lam:g}"
        ctx.log(f"stage: {name} ({cfg.steps} steps)")
        record = ctx.train(
            name,
            f"irl_{i}",
            cfg.steps,
            step,
            models={"model": model},
            optimizers={"model": opt},
            generators={"data": g},
            data=order,
            evaluate=lambda m=model: evaluate(m),
            eval_every=cfg.eval_every,
            ckpt_every=top.ckpt_every,
        )
        keys = [k for k in record["eval"][0] if k != "step"]
        runs[name] = {
            "lambda": lam,
            **series(record, *keys),
            "train_loss": [t["loss"] for t in record["train"]],
        }
    return {"reference": reference, "runs": runs}


@torch.no_grad()
def sample_stats(ctx: Context, model: TinyLM) -> dict:
    """Diversity of ``model``'s samples on the held-out prompts: mean per-token entropy of its
    next-token distributions along them (nats) and the mean fraction of distinct bigrams per
    completion."""
    gen = torch.Generator().manual_seed(ctx.eval_seed)
    seqs = distributed.split(model.sample(ctx.eval_prompts, ctx.L, generator=gen))
    logp = model.completion_logits(seqs, ctx.P).float().log_softmax(-1)
    y = seqs[:, ctx.P :]
    pairs = y[:, :-1] * ctx.task.vocab + y[:, 1:]
    distinct = [len(set(row.tolist())) / row.numel() for row in pairs]
    stats = {
        "entropy": float(-(logp.exp() * logp).sum(-1).mean()),
        "distinct2": sum(distinct) / len(distinct),
    }
    return row_mean(stats, seqs.shape[0])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


KEYS = ("kl", "entropy", "distinct2", "reward_corr_token", "reward_corr_seq")


def aggregate(per_seed: dict) -> dict:
    """Across the seeds, as bands: the oracle's sample statistics and, per λ, every evaluated series
    and the training loss."""
    runs = list(per_seed.values())

    def make(each):
        losses = band_dict(each, series=("train_loss",))
        return {"lambda": each[0]["lambda"], **curve_bands(each, KEYS), **losses}

    return {
        "reference": band_dict([r["reference"] for r in runs], scalars=tuple(runs[0]["reference"])),
        "runs": named(runs, "runs", make),
    }


def summary(curves: dict) -> str:
    rows = []
    for name, c in curves["runs"].items():
        b = argmin(c["kl"]["mean"])
        rows.append([name, f"{band_cell(c['kl'], b, 4)} (step {c['steps'][b]}) → {band_cell(c['kl'], -1, 4)}",
                     band_cell(c["entropy"], -1), band_cell(c["distinct2"], -1),
                     band_cell(c["reward_corr_token"], -1), band_cell(c["reward_corr_seq"], -1)])  # fmt: skip
    ref = curves["reference"]
    head = ["objective", "held-out KL(oracle‖model): min of the mean (step) → final", "entropy", "distinct-2",
            "corr(extracted r_t, oracle log p) per token", "per sequence"]  # fmt: skip
    return (
        f"{seeds_line(curves)}oracle's own samples: entropy {band_cell(ref['oracle_entropy'], 0)}, "
        f"distinct-2 {band_cell(ref['oracle_distinct2'], 0)}\n\n" + markdown_table(head, rows)
    )


def plot(curves: dict, out: Path) -> list[Path]:
    """``irl.png``: held-out KL, entropy of the model's samples, and the extracted rewards' correlation
    (means over the seeds, min–max bands)."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    for name, c in curves["runs"].items():
        plot_band(axes[0], c["steps"], c["kl"], marker=".", label=name)
        plot_band(axes[1], c["steps"], c["entropy"], marker=".", label=name)
        plot_band(axes[2], c["steps"], c["reward_corr_token"], marker=".", label=f"{name}: per token")
        plot_band(axes[2], c["steps"], c["reward_corr_seq"], ls="--", label=f"{name}: per sequence")
    axes[1].axhline(curves["reference"]["oracle_entropy"]["mean"][0], color="k", ls=":", lw=1, label="oracle")
    axes[0].set(xlabel="step", ylabel="nats per token", title="held-out KL(oracle ‖ model)", yscale="log")
    axes[1].set(xlabel="step", ylabel="nats", title="entropy along own samples")
    axes[2].set(xlabel="step", ylabel="Pearson r", title="extracted reward vs oracle log-likelihood")
    finish_axes(axes)
    return [save_figure(fig, out / "irl.png", RLHF_DPI)]

"""``bond``: J-BOND — per prompt two samples of an EMA anchor and two of the policy; the forward term
is the likelihood of the better anchor sample, the backward term a policy gradient with reward
``jbond_reward − log(π/π_anchor)``, plus ``ref_kl · KL(π ‖ π_sft)``; anchor ``θ_a ← (1−γ) θ_a + γ θ``.
Baseline: plain RL as for WARP."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ... import distributed
from ...report import band_cell, plot_band
from .. import frontier, merge
from ..bands import band_dict
from ..bond import best_of_n, jbond_reward, jeffreys_loss
from ..config import RLHFPreset, rl_batches
from ..frontier import versus_baseline
from ..rl import kl_to_anchor
from ..stages import Context, frozen, series, trainable


def check(cfg: RLHFPreset) -> None:
    if cfg.bond.samples < 2:
        raise ValueError(f"bond.samples must be >= 2 (the leave-one-out baseline), got {cfg.bond.samples}")


def batches(cfg: RLHFPreset) -> dict:
    """The training batches that split over ranks under ``torchrun``."""
    return rl_batches(cfg, reward_models=False)


def run(ctx: Context) -> dict:
    cfg, top = ctx.cfg.bond, ctx.cfg
    policy = trainable(copy.deepcopy(ctx.sft))
    anchor = frozen(copy.deepcopy(ctx.sft))
    opt = torch.optim.Adam(policy.parameters(), lr=top.rl_lr)
    gen = torch.Generator().manual_seed(ctx.seed + 60_000)
    P, L, k = ctx.P, ctx.L, cfg.samples

    def step():
        x = ctx.task.prompts(top.rl_prompts, gen)
        with torch.no_grad():
            ys = policy.sample(x.repeat_interleave(k, 0), L, generator=gen)  # (B·k, P+L)
            ya = anchor.sample(x.repeat_interleave(2, 0), L, generator=gen)  # (B·2, P+L)
            r_pol = ctx.true(ys[:, :P], ys[:, P:])
            r_anc = ctx.true(ya[:, :P], ya[:, P:])
            better = ya[best_of_n(r_anc, 2)]  # (B, P+L): the better anchor sample of each prompt
            r_j = jbond_reward(r_pol, r_anc.view(-1, 2).repeat_interleave(k, 0), cfg.penalty)
            # this rank's prompts, each with its k policy samples (whole RLOO groups) and best anchor one
            mine = distributed.shard(ys.view(x.shape[0], k, -1)).flatten(0, 1)
            r_mine = distributed.shard(r_j.view(x.shape[0], k)).flatten()
            anchor_logp = anchor.sequence_logprobs(mine, P).sum(-1)
        logp = policy.sequence_logprobs(mine, P)
        backward = r_mine - (logp.detach().sum(-1) - anchor_logp)  # J-BOND reward − log(π/π_anchor)
        loss = jeffreys_loss(
            policy.sequence_logprobs(distributed.shard(better), P), logp, backward, cfg.jeffreys_beta,
            baseline="rloo", group=k,
        )  # fmt: skip
        if cfg.ref_kl > 0:
            loss = loss + cfg.ref_kl * kl_to_anchor(policy, ctx.sft, mine, P).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(policy.parameters())
        opt.step()
        merge.ema_update(anchor, policy, cfg.gamma)
        return {"reward": float(r_pol.mean()), "loses_to_both": float((r_j < 0).float().mean())}

    ctx.log(f"stage: J-BOND ({cfg.steps} steps)")
    record = ctx.train(
        "J-BOND",
        "jbond",
        cfg.steps,
        step,
        models={"policy": policy, "anchor": anchor},
        optimizers={"policy": opt},
        generators={"rl": gen},
        evaluate=lambda: ctx.evaluate(policy),
        eval_every=top.eval_every,
        ckpt_every=top.ckpt_every,
    )
    jbond = series(record, "true", "kl", "repeat")
    jbond["loses_to_both"] = [t["loses_to_both"] for t in record["train"]]
    curves = {
        "sft": ctx.evaluate(ctx.sft),
        "jbond": jbond,
        "baseline": ctx.baseline(cfg.baseline_betas, cfg.baseline_steps),
    }
    points = list(zip(jbond["kl"], jbond["true"], strict=True))
    curves["versus_baseline"] = versus_baseline(points, curves["baseline"])
    return curves


def aggregate(per_seed: dict) -> dict:
    """Across the seeds: the SFT policy's and J-BOND's bands, the baseline's, each seed's comparison
    with its own RL frontier (``versus_baseline``, a list) and the mean J-BOND curve's with the mean
    baseline curves' frontier (``mean_versus_baseline``)."""
    runs = list(per_seed.values())
    jbond = band_dict([r["jbond"] for r in runs], series=("true", "kl", "repeat", "loses_to_both"),
                      fixed=("steps",))  # fmt: skip
    baseline = frontier.aggregate_baseline(runs)
    mean_points = list(zip(jbond["kl"]["mean"], jbond["true"]["mean"], strict=True))
    return {
        "sft": band_dict([r["sft"] for r in runs], scalars=("true", "kl", "repeat")),
        "jbond": jbond,
        "baseline": baseline,
        "versus_baseline": [r["versus_baseline"] for r in runs],
        "mean_versus_baseline": versus_baseline(mean_points, frontier.mean_baseline(baseline)),
    }


def summary(curves: dict) -> str:
    c = curves["jbond"]
    row = ["J-BOND", band_cell(c["true"], -1), band_cell(c["kl"], -1, 2), frontier.best_at(c),
           frontier.margins(curves["versus_baseline"])]  # fmt: skip
    rows = [row]
    if len(curves["seeds"]) > 1:
        rows.append(["J-BOND, mean curve vs the mean RL curves' frontier", "", "", "",
                     frontier.margin(curves["mean_versus_baseline"])])  # fmt: skip
    return frontier.summary(curves, rows)


def plot(curves: dict, out: Path) -> list[Path]:
    """``pareto.png``: J-BOND's points along training vs RL (means over the seeds, true reward's
    min–max band)."""

    def draw(ax):
        c = curves["jbond"]
        plot_band(ax, c["kl"]["mean"], c["true"], marker="o", ms=3, lw=2, color="k",
                  label="J-BOND (EMA anchor)")  # fmt: skip

    return frontier.plot(curves, out, draw, "J-BOND vs RL (points along training)")

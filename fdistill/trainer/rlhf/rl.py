"""KL-regularised REINFORCE (WARP's RL stage; RL from textual-entailment feedback).

On completions ``y ~ π(·|x)`` the policy maximises ``E[r(x, y)] − β KL(π ‖ π_anchor)`` with WARP's
shaped reward

    R(x, y) = r(x, y) − β (log π(y|x) − log π_anchor(y|x)),

the log ratio summed over the completion tokens and detached (a constant in the reward), and the
REINFORCE loss

    loss = −mean_i (R_i − b_i) log π(y_i | x_i)

with baseline ``b_i``: ``rloo`` (the mean reward of the other ``k − 1`` samples of the same prompt),
``mean`` (the batch mean, including the sample itself: slightly biased) or ``none``. The anchor is
fixed (the SFT model) or an EMA of the policy (:func:`merge.ema_update` after each step).

The sampled log ratio has mean KL(π ‖ π_anchor) and its score-function gradient is the KL's gradient.
:func:`kl_to_anchor`, the exact per-position KL summed along the completion
(``Σ_n KL(π(·|x, y_<n) ‖ π_anchor(·|x, y_<n))``: the same mean by the chain rule, lower variance), is
the ``kl`` metric and can be added to a loss as a differentiable penalty; it cannot replace the log
ratio inside a detached reward, which would drop the KL's direct dependence on the policy (all of it
for a one-token completion).

Under ``torchrun`` (:mod:`~fdistill.trainer.distributed`) :func:`rl_step` is data parallel: every
rank samples the same global batch (the same generator), keeps its contiguous slice of the prompts
with all their ``group`` samples (so the leave-one-out baseline sees whole groups), computes the loss
on it and averages the gradients and the metrics over ranks before the optimizer step.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fdistill

from .. import distributed
from ..model import TinyLM
from .reward import RewardFn, check_rewards

BASELINES = ("rloo", "mean", "none")


def token_kl(policy_logits: Tensor, anchor_logits: Tensor) -> Tensor:
    """``(..., V)`` logits -> ``(...)`` KL(π ‖ π_anchor) per position.

    ``fdistill.divergence_loss(student, teacher, "reverse_kl")`` is KL(q ‖ p) with ``q`` the student's
    and ``p`` the teacher's softmax: the policy is the student (it gets the gradient), the anchor the
    teacher (no gradient).
    """
    return fdistill.divergence_loss(policy_logits, anchor_logits.detach(), "reverse_kl", reduction="none")


def kl_to_anchor(policy: TinyLM, anchor: TinyLM, seqs: Tensor, prompt_len: int) -> Tensor:
    """``(B,)`` sum over the completion positions of KL(π ‖ π_anchor); differentiable in the policy."""
    with torch.no_grad():
        anchor_logits = anchor.completion_logits(seqs, prompt_len)
    return token_kl(policy.completion_logits(seqs, prompt_len), anchor_logits).sum(-1)


def _token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``(B, L, V)`` logits, ``(B, L)`` tokens -> ``(B, L)`` log-probs, in float32 or float64."""
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def _check_group(group: int, batch: int) -> None:
    if not isinstance(group, int) or group < 1 or batch % group:
        raise ValueError(f"group must be an int >= 1 dividing the batch ({batch}), got {group!r}")


def advantages(rewards: Tensor, baseline: str = "mean", group: int = 1) -> Tensor:
    """``rewards − baseline`` (detached); ``group`` consecutive samples share a prompt."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    _check_group(group, rewards.shape[0])
    r = rewards.detach()
    if baseline == "none":
        return r
    if baseline == "mean":
        return r - r.mean()
    if group < 2:
        raise ValueError("baseline='rloo' needs group >= 2 samples per prompt")
    grouped = r.view(-1, group)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group - 1)
    return (grouped - others).view(-1)


def policy_gradient_loss(logprobs: Tensor, rewards: Tensor, baseline: str = "mean", group: int = 1) -> Tensor:
    """REINFORCE: ``−mean_i A_i log π(y_i)`` with ``A = advantages(rewards, baseline, group)``.

    ``logprobs``: ``(B,)`` sequence log-probs, or ``(B, L)`` per-token log-probs (summed over L).
    ``rewards``: ``(B,)``, treated as constants. Samples ``i·group .. (i+1)·group − 1`` share a prompt.
    """
    if logprobs.dim() == 2:
        logprobs = logprobs.sum(-1)
    if logprobs.shape != rewards.shape or logprobs.dim() != 1:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} must be (B,) or (B, L) and rewards (B,), "
            f"got rewards {tuple(rewards.shape)}"
        )
    return -(advantages(rewards, baseline, group).to(logprobs.dtype) * logprobs).mean()


def rl_step(
    policy: TinyLM,
    anchor: TinyLM,
    optimizer: torch.optim.Optimizer,
    prompts: Tensor,
    reward_fn: RewardFn,
    *,
    length: int,
    beta: float,
    group: int = 4,
    baseline: str = "rloo",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One KL-regularised REINFORCE step; returns the batch means of ``reward`` (r), ``kl``
    (:func:`kl_to_anchor`), ``shaped_reward`` (R) and the ``loss``.

    Each of the ``B`` prompts gets ``group`` completions of ``length`` tokens sampled at
    ``temperature``; the log-probs are the policy's at temperature 1 (so ``temperature != 1``
    makes the update slightly off-policy, as in WARP's sampling at 0.9).
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    prompt_len = prompts.shape[1]
    distributed.check_divisible(prompts.shape[0], "the RL step's number of prompts")
    x = prompts.repeat_interleave(group, 0)
    seqs = policy.sample(x, length, temperature=temperature, generator=generator)
    # this rank's prompts with all their samples (rows are grouped by prompt): equal slices, so the
    # mean of the slice losses and metrics is the global batch's
    n = prompts.shape[0]
    x, seqs = (distributed.shard(rows.view(n, group, -1)).flatten(0, 1) for rows in (x, seqs))
    with torch.no_grad():
        rewards = check_rewards(reward_fn(x, seqs[:, prompt_len:]), x.shape[0])
        anchor_logits = anchor.completion_logits(seqs, prompt_len)

    logits = policy.completion_logits(seqs, prompt_len)
    logprobs = _token_logprobs(logits, seqs[:, prompt_len:])
    log_ratio = (logprobs.detach() - _token_logprobs(anchor_logits, seqs[:, prompt_len:])).sum(-1)
    shaped = rewards.to(log_ratio.dtype) - beta * log_ratio
    if baseline == "mean" and distributed.active():  # the global batch's mean, not the slice's
        (mean,) = distributed.weighted_mean({"m": float(shaped.mean())}, shaped.shape[0]).values()
        loss = policy_gradient_loss(logprobs, shaped - mean, "none", group)
    else:
        loss = policy_gradient_loss(logprobs, shaped, baseline, group)
    kl = token_kl(logits.detach(), anchor_logits).sum(-1)

    optimizer.zero_grad()
    loss.backward()
    means = (float(rewards.mean()), float(kl.mean()), float(shaped.mean()), float(loss.detach()))
    reward, kl, shaped, loss = distributed.average_gradients(policy.parameters(), *means)
    optimizer.step()
    return {"reward": reward, "kl": kl, "shaped_reward": shaped, "loss": loss}

"""BOND and J-BOND: distilling the best-of-N distribution into the policy.

Best-of-N of a reference policy is, up to ties, ``π_BoN(y) ∝ π_ref(y) · p≤(y)^(N−1)`` with the quantile
``p≤(y) = P_{y'∼π_ref}[r(y') ≤ r(y)]``: the optimum of KL-regularised RL with reward ``log p≤(y)`` and
``β = 1/(N−1)`` or, equivalently, with reward ``(N−1) log p≤(y)`` and ``β = 1``
(:func:`bond_log_ratio_reward`). ``p≤`` is estimated by the empirical quantile among ``k`` reference
samples of the same prompt (:func:`empirical_quantile`).

The policy is fitted with the Jeffreys divergence ``J_β = (1−β) KL(π_BoN ‖ π) + β KL(π ‖ π_BoN)``
(:func:`jeffreys_loss`): the forward part is the negative log-likelihood of best-of-N samples under
the policy, the backward part a policy gradient on the policy's samples with reward
``log π_BoN(y) − log π(y) = (N−1) log p≤(y) − (log π(y) − log π_ref(y)) + const``.

J-BOND draws two anchor samples per prompt: the forward part uses the better one (``best_of_n(·, 2)``),
the backward part the bounded reward :func:`jbond_reward`, the anchor is an EMA of the policy
(``merge.ema_update(anchor, policy, γ)``) and an extra KL to the reference policy is added
(``rl.kl_to_anchor``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .rl import policy_gradient_loss


def best_of_n(rewards: Tensor, n: int) -> Tensor:
    """Indices into ``rewards`` (``(B·n,)``, groups of ``n`` consecutive samples per prompt) of the
    best sample of each group: ``(B,)``. Ties go to the first sample of the group."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if rewards.dim() != 1 or rewards.shape[0] % n:
        raise ValueError(f"rewards must be (B * n,) with n = {n}, got {tuple(rewards.shape)}")
    groups = rewards.view(-1, n)
    start = torch.arange(groups.shape[0], device=rewards.device) * n
    return start + groups.argmax(-1)


def empirical_quantile(reward: Tensor, reference_rewards: Tensor) -> Tensor:
    """``p̂≤ = (1/k) #{j : r'_j ≤ r}`` per sample: ``(B,)``.

    ``reward``: ``(B,)``; ``reference_rewards``: ``(B, k)`` (``k`` reference samples per prompt) or
    ``(k,)`` (one reference set for all). Ties count as "not better" (``≤``, as in ``p≤``): a sample
    that ties with every reference sample has quantile 1.
    """
    if reward.dim() != 1:
        raise ValueError(f"reward must be (B,), got {tuple(reward.shape)}")
    if reference_rewards.dim() == 1:
        reference_rewards = reference_rewards.expand(reward.shape[0], -1)
    if reference_rewards.dim() != 2 or reference_rewards.shape[0] != reward.shape[0]:
        raise ValueError(
            f"reference_rewards must be (B, k) or (k,) with B = {reward.shape[0]}, "
            f"got {tuple(reference_rewards.shape)}"
        )
    if reference_rewards.shape[1] == 0:
        raise ValueError("reference_rewards has no samples (k = 0)")
    dtype = torch.promote_types(reward.dtype, torch.float32)
    return (reference_rewards <= reward[:, None]).to(dtype).mean(-1)


def bond_log_ratio_reward(quantile: Tensor, n: int) -> Tensor:
    """``(N−1) log p≤``: with it, KL-regularised RL at β = 1 targets best-of-N (equivalently
    ``log p≤`` at β = 1/(N−1)). A quantile of 0 gives ``−inf``: clamp it first if that can happen."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if n == 1:  # best-of-1 is the reference itself: no reward (and no 0 · log 0)
        return torch.zeros_like(quantile)
    return (n - 1) * quantile.log()


def jbond_reward(policy_reward: Tensor, anchor_rewards: Tensor, penalty: float = math.log(16)) -> Tensor:
    """J-BOND's bounded reward: ``−penalty`` where the policy sample loses (strictly) to both anchor
    samples of its prompt, 0 otherwise.

    ``policy_reward``: ``(B,)``; ``anchor_rewards``: ``(B, 2)``. The default ``penalty = log 16`` was
    recalled, not read from the paper (check).
    """
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    if policy_reward.dim() != 1 or anchor_rewards.shape != (policy_reward.shape[0], 2):
        raise ValueError(
            f"policy_reward must be (B,) and anchor_rewards (B, 2), got {tuple(policy_reward.shape)} "
            f"and {tuple(anchor_rewards.shape)}"
        )
    loses = (policy_reward[:, None] < anchor_rewards).all(-1)
    dtype = torch.promote_types(policy_reward.dtype, torch.float32)
    return torch.where(loses, -penalty, 0.0).to(dtype)


def jeffreys_loss(
    forward_logprobs: Tensor,
    policy_logprobs: Tensor,
    policy_rewards: Tensor,
    beta: float,
    baseline: str = "mean",
    group: int = 1,
) -> Tensor:
    """``(1−β) · NLL(best-of-N samples) + β · REINFORCE(policy samples)``.

    ``forward_logprobs``: log-probs under the policy of the best-of-N (J-BOND: the better anchor)
    samples, ``(B,)`` or ``(B, L)`` (summed). ``policy_logprobs`` and ``policy_rewards``: the policy's
    own samples and their backward reward, e.g. ``bond_log_ratio_reward(q, N) − (log π − log π_ref)``
    or ``jbond_reward(...) − (log π − log π_anchor)``, treated as constants; see
    :func:`rl.policy_gradient_loss` for ``baseline`` and ``group``.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if forward_logprobs.dim() == 2:
        forward_logprobs = forward_logprobs.sum(-1)
    nll = -forward_logprobs.mean()
    return (1 - beta) * nll + beta * policy_gradient_loss(policy_logprobs, policy_rewards, baseline, group)

"""Inverse RL as temporal-difference-regularised maximum likelihood (inverse soft-Q learning).

The logits are soft Q-values: ``Q(s_t, ·) = logits[:, t]`` with state ``s_t`` the prefix before token
``t``, ``v(s) = logsumexp_a Q(s, a)`` and ``log π(a|s) = Q(s, a) − v(s)``. On expert (dataset) actions

    J = mean_t [ λ (v(s_t) + log π(a_t|s_t) − γ v(s_{t+1}))² − log π(a_t|s_t) ]

where the TD residual ``v(s_t) + log π(a_t|s_t) − γ v(s_{t+1}) = Q(s_t, a_t) − γ v(s_{t+1})`` is the
reward the Q-values imply (:func:`extracted_rewards`). λ = 0 is plain MLE (token cross-entropy). The
gradient flows through both ``Q(s_t, a_t)`` and ``v(s_{t+1})``.

Terminal states: the sequence ends after its last position, or before a masked position; the state
after it is terminal with ``v = 0``, so the last valid residual is ``Q(s_t, a_t)`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _td_terms(logits: Tensor, actions: Tensor, gamma: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(log π(a_t|s_t), Q(s_t, a_t) − γ v(s_{t+1}))``, both ``(B, L)``, in float32 or float64."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating (B, L, V) tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    if actions.shape != logits.shape[:2] or actions.is_floating_point() or actions.dtype == torch.bool:
        raise ValueError(
            f"actions must be an integer (B, L) = {tuple(logits.shape[:2])} tensor, got "
            f"{tuple(actions.shape)} {actions.dtype}"
        )
    if mask is not None and (mask.shape != actions.shape or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool {tuple(actions.shape)} tensor, got {tuple(mask.shape)} {mask.dtype}"
        )
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    actions = actions.long() if mask is None else actions.long().masked_fill(~mask, 0)  # padding ids
    if ((actions < 0) | (actions >= logits.shape[-1])).any():
        raise ValueError(f"actions must be token ids in [0, {logits.shape[-1]}) at the valid positions")
    q = logits.to(torch.promote_types(logits.dtype, torch.float32))
    v = q.logsumexp(-1)  # (B, L)
    q_taken = q.gather(-1, actions[..., None]).squeeze(-1)
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)  # v(s_L) = 0
    if mask is not None:  # a masked next position ends the sequence
        v_next = v_next.where(torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1), 0.0)
    return q_taken - v, q_taken - gamma * v_next


def td_regularised_mle_loss(
    logits: Tensor, actions: Tensor, lam: float, gamma: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``J`` averaged over the valid positions (``mask`` True; all when None; 0 when none is valid).

    ``logits``: ``(B, L, V)`` soft-Q values; ``actions``: ``(B, L)`` expert token ids (any value, e.g.
    -100, at masked positions); ``mask``: ``(B, L)`` bool, True at valid positions; ``lam`` >= 0
    weighs the squared TD residual, ``gamma`` in [0, 1] discounts the next state's value.
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    logp, residual = _td_terms(logits, actions, gamma, mask)
    per_token = lam * residual.square() - logp
    if mask is None:
        return per_token.mean()
    return per_token.where(mask, 0.0).sum() / mask.sum().clamp_min(1)


def extracted_rewards(
    logits: Tensor, actions: Tensor, gamma: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``(B, L)`` rewards ``Q(s_t, a_t) − γ v(s_{t+1})`` implied by the soft-Q logits (0 where masked)."""
    _, residual = _td_terms(logits, actions, gamma, mask)
    return residual if mask is None else residual.where(mask, 0.0)

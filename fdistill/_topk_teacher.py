"""A teacher given by its stored top-k: ``(indices, logprobs)``, both ``(..., k)``, the token ids
of its k most likely next tokens and their log-probabilities. Shared by
:func:`fdistill.divergence_loss` (on logits) and :func:`fdistill.fused_linear_divergence_loss` (on
hidden states), which give it the same two meanings (``topk_tail``):

* ``"renormalize"``: the teacher is its top-k renormalised, every other token has probability 0 (a
  ``-inf`` logit); the student keeps its full distribution over the vocabulary. With a temperature T
  the teacher is ``p_i^(1/T)`` renormalised over the top-k (its log-probabilities are used as
  logits, divided by T like the student's).
* ``"bucket"``: the tail ``1 - sum_i p_i`` is one more outcome, matched by the student's total
  probability outside the top-k: the divergence is taken between two ``(k + 1)``-outcome
  distributions. Needs temperature 1 (a tempered tail cannot be known from the top-k).

Ids beyond the student's vocabulary (``vocab_mismatch="mask"`` of the fused-linear loss) are sent
to a dump column ``V`` that carries no mass on either side.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

TOPK_TAILS = ("renormalize", "bucket")
_NEG_INF = float("-inf")


def placeholder_for_ignored(indices, logprobs, keep):
    """[N, k] top-k ids (int64) and log-probabilities where ignored tokens (padding, whose stored
    top-k may be anything) hold a valid placeholder: ids 0..k-1 with log-probability -log k."""
    k = indices.shape[-1]
    idx, lp = indices.reshape(-1, k).long(), logprobs.reshape(-1, k)
    if keep is None:
        return idx, lp
    keep = keep.unsqueeze(1)
    placeholder = torch.arange(k, device=idx.device).expand_as(idx)
    return torch.where(keep, idx, placeholder), torch.where(keep, lp, torch.full_like(lp, -math.log(k)))


def clamp_to_dump(indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Ids ``>= vocab`` replaced by the dump column ``vocab`` (int64)."""
    return torch.where(indices < vocab, indices, vocab).long()


def dense_logits(indices, logprobs, vocab: int, dtype) -> torch.Tensor:
    """``[N, vocab]`` teacher logits: the top-k log-probabilities at their ids, ``-inf`` elsewhere
    (ids in the dump column ``vocab`` are dropped)."""
    dense = torch.full((indices.shape[0], vocab + 1), _NEG_INF, dtype=dtype, device=indices.device)
    return dense.scatter_(1, indices, logprobs.to(dtype))[:, :vocab]


def tail_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """``1 - sum(exp(logprobs))`` per row (in float64), 0 when below the rounding of the stored
    log-probabilities (4 eps of their dtype): such a tail is noise, and a student with no mass outside
    the top-k (k = V) must not make forward KL infinite over it."""
    tail = 1 - logprobs.double().exp().sum(1, keepdim=True)
    noise = 4 * torch.finfo(logprobs.dtype).eps
    return torch.where(tail > noise, tail, torch.zeros_like(tail)).to(logprobs.dtype)


def bucket_outcomes(z: torch.Tensor, indices, logprobs, acc_dtype):
    """(student, teacher) ``[N, k + 1]`` logits of the (k + 1)-outcome distributions: the student's
    are ``z_i`` at the top-k ids and ``logsumexp(z_j, j not in top-k)``, the teacher's ``logp_i`` and
    ``log(1 - sum exp(logp_i))``. Differentiable in ``z`` (``[N, V]``)."""
    lp = logprobs.to(acc_dtype)
    zf = F.pad(z.to(acc_dtype), (0, 1), value=_NEG_INF)  # the dump column for ids beyond V
    top = zf.gather(1, indices)
    tail = zf.scatter(1, indices, _NEG_INF).logsumexp(1, keepdim=True)
    teacher_tail = torch.log(tail_mass(logprobs)).to(acc_dtype)
    lp = lp.masked_fill(indices == zf.shape[1] - 1, _NEG_INF)  # dropped ids: no mass on either side
    return torch.cat([top, tail], 1), torch.cat([lp, teacher_tail], 1)

"""Temperature and the tail bucket on stored top-k log-probabilities, the way offline-distillation
pipelines (axolotl's KD plugin, DistillKit) apply them.

A teacher sampled at temperature ``T_gen`` stored ``log p_i`` for its k most likely tokens, with
``p = softmax(z / T_gen)`` over the whole vocabulary. At a distillation temperature ``T_kd`` the
teacher over its top-k is

    p_i^(T_gen / T_kd) / sum_j p_j^(T_gen / T_kd)      (i, j in the top-k)

which :func:`retemper` computes in log space: ``log_softmax(logprobs * (T_gen / T_kd))`` over the k
entries. The rest of the vocabulary is unknown; :func:`with_tail` keeps it as one (k + 1)-th outcome
holding ``1 - sum_i p_i`` (meaningful on the stored, untempered values: after :func:`retemper` the k
entries sum to 1 and the tail is 0).

With :func:`fdistill.divergence_loss` (which divides both sides by its ``temperature``), a teacher
stored at ``T_gen`` is distilled at ``T_kd`` as axolotl does it by
``teacher_topk=(ids, retemper(logprobs, T_gen, 1.0))`` and ``temperature=T_kd``: the teacher is then
``p^(T_gen / T_kd)`` renormalised and the student ``softmax(z / T_kd)``.
"""

from __future__ import annotations

import math

import torch

from ..validation import check_real


def retemper(
    logprobs: torch.Tensor, gen_temperature: float = 1.0, kd_temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logprobs * (gen_temperature / kd_temperature))`` over the last dimension (the k
    stored entries): the top-k at ``kd_temperature``, renormalised. ``-inf`` entries stay ``-inf``; a
    row of only ``-inf`` stays so (not NaN). Computed in float32 (float64 for float64 input), returned
    in the input's dtype."""
    if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
        raise TypeError("logprobs must be a floating torch.Tensor")
    for name, value in (("gen_temperature", gen_temperature), ("kd_temperature", kd_temperature)):
        check_real(name, value)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    x = logprobs.to(acc) * (float(gen_temperature) / float(kd_temperature))
    out = torch.log_softmax(x, dim=-1)
    empty = (x == -math.inf).all(-1, keepdim=True)  # log_softmax of all -inf is NaN
    return out.masked_fill(empty, -math.inf).to(logprobs.dtype)


def tail_logprob(logprobs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_i exp(logprobs_i))`` over the last dimension, shape ``(..., 1)``: the log of the
    mass outside the stored top-k. Computed stably in float64 from ``s = logsumexp(logprobs)`` as
    ``log(-expm1(s))`` (s close to 0) or ``log1p(-exp(s))`` (s below -log 2), and ``-inf`` where the
    tail is below 4 eps of the input dtype (rounding noise: the top-k hold all the mass) or the k
    entries sum to more than 1. Returned in the input's dtype; the loss's bucket uses the same rule."""
    if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
        raise TypeError("logprobs must be a floating torch.Tensor")
    s = torch.logsumexp(logprobs.double(), dim=-1, keepdim=True)
    near_one = s > -math.log(2)
    tail = torch.where(near_one, torch.log(-torch.expm1(s.clamp(max=0))), torch.log1p(-torch.exp(s)))
    floor = math.log(4 * torch.finfo(logprobs.dtype).eps)
    tail = torch.where((tail > floor) & (s < 0), tail, torch.full_like(tail, -math.inf))
    return tail.to(logprobs.dtype)


def with_tail(indices: torch.Tensor, logprobs: torch.Tensor, tail_id: int = -1):
    """``(indices, logprobs)`` with a (k + 1)-th entry appended: the tail bucket, id ``tail_id`` (by
    default -1, an id no token has) and log-probability :func:`tail_logprob`. For pipelines that
    store the bucket explicitly; :func:`fdistill.divergence_loss` and the fused-linear loss take the
    k stored entries and build the bucket themselves with ``topk_tail="bucket"``."""
    if indices.shape != logprobs.shape:
        raise ValueError(
            f"indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} differ in shape"
        )
    tail_ids = torch.full((*indices.shape[:-1], 1), tail_id, dtype=indices.dtype, device=indices.device)
    return torch.cat([indices, tail_ids], -1), torch.cat([logprobs, tail_logprob(logprobs)], -1)


def topk_from_logits(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """``(indices, logprobs)`` of the k most likely tokens of ``softmax(logits / temperature)`` over
    the last dimension (the log-softmax in float32, float64 for float64 logits; sorted, most likely
    first): what a teacher stores."""
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating torch.Tensor")
    check_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, V = {logits.shape[-1]}], got {k!r}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    top = torch.log_softmax(logits.detach().to(acc) / temperature, dim=-1).topk(k, dim=-1)
    return top.indices, top.values

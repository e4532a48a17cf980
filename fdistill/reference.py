"""Pure-PyTorch token-level divergences: the semantics every backend is tested against.

``divergence_rows_reference(s, t, ...)`` returns the per-row loss of ``[rows, V]`` logits,
differentiable by autograd (in both arguments). It computes in float32 for float32/bf16/fp16
inputs and in float64 for float64 inputs; tests call it on float64 copies as the ground truth.
It materialises several ``[rows, V]`` tensors: it is the readable version, not the fast one.

Conventions (shared with the kernels, see ``csrc/include/fdistill/divergence_math.h``):

* ``-inf`` entries contribute exactly 0 (never ``0 * inf``); where the teacher has mass and the
  student has none, forward KL is ``+inf`` (and symmetrically for the reverse direction).
* A row whose student and teacher logits are all ``-inf`` (padding) has loss 0 and gradient 0;
  a row where only one of them is all ``-inf``, or that holds a NaN or ``+inf`` logit, has a NaN
  loss and a NaN gradient.
* ``jsd`` and ``jeffreys`` with ``beta = 0`` / ``1`` are forward / reverse KL (for ``jsd`` this is
  TRL's and Liger's convention; it also keeps ``0 * inf`` out of the unused term); the skew
  divergences with ``skew = 0`` are the plain forward / reverse KL.
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jeffreys", "jsd", "skew_kl", "skew_reverse_kl", "tv", "alpha")


def resolve_divergence(divergence: str, param: float) -> str:
    """The kernel a (divergence, weight) pair runs: the endpoints of the mixtures are plain KLs."""
    if divergence in ("jsd", "jeffreys") and param == 0.0:
        return "forward_kl"
    if divergence in ("jsd", "jeffreys") and param == 1.0:
        return "reverse_kl"
    if divergence == "skew_kl" and param == 0.0:
        return "forward_kl"
    if divergence == "skew_reverse_kl" and param == 0.0:
        return "reverse_kl"
    return divergence


def _weighted(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w * (a - b), exactly 0 where w == 0 (with a finite gradient there too)."""
    positive = w > 0
    diff = torch.where(positive, a - b, torch.zeros_like(a))
    return torch.where(positive, w * diff, torch.zeros_like(w))


def _log_mixture(lt: torch.Tensor, ls: torch.Tensor, w_teacher: float, w_student: float) -> torch.Tensor:
    """log(w_t p + w_s q) in log space, finite wherever p or q is positive."""
    neg_inf = torch.tensor(-math.inf, dtype=lt.dtype, device=lt.device)
    a = lt + math.log(w_teacher) if w_teacher > 0 else neg_inf.expand_as(lt)
    b = ls + math.log(w_student) if w_student > 0 else neg_inf.expand_as(ls)
    both = torch.isneginf(a) & torch.isneginf(b)  # logaddexp's gradient is NaN there
    zero = torch.zeros((), dtype=lt.dtype, device=lt.device)
    mixed = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, neg_inf, mixed)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax whose all -inf rows give -inf (not NaN) and a zero gradient."""
    empty = torch.isneginf(x).all(dim=-1, keepdim=True)
    safe = torch.where(empty, torch.zeros_like(x), x)
    return torch.where(empty, x, torch.log_softmax(safe, dim=-1))


def divergence_rows_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    divergence: str = "forward_kl",
    param: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row divergence between ``softmax(teacher / T)`` (p) and ``softmax(student / T)`` (q).

    ``param`` is ``beta`` for ``jeffreys`` (weight of KL(q||p)) and ``jsd``, ``lambda`` for the skew
    divergences and ``alpha`` for ``alpha``. Returns a ``[rows]`` tensor in the compute dtype.
    """
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(compute) / temperature
    t = teacher.to(compute) / temperature
    kind = resolve_divergence(divergence, param)
    ls, lt = _log_softmax(s), _log_softmax(t)
    q, p = ls.exp(), lt.exp()

    def forward_kl():
        return _weighted(p, lt, ls).sum(-1)

    def reverse_kl():
        return _weighted(q, ls, lt).sum(-1)

    if kind == "forward_kl":
        loss = forward_kl()
    elif kind == "reverse_kl":
        loss = reverse_kl()
    elif kind == "jeffreys":
        loss = (1 - param) * forward_kl() + param * reverse_kl()
    elif kind == "jsd":
        lm = _log_mixture(lt, ls, param, 1 - param)
        loss = param * _weighted(p, lt, lm).sum(-1) + (1 - param) * _weighted(q, ls, lm).sum(-1)
    elif kind == "skew_kl":
        lm = _log_mixture(lt, ls, param, 1 - param)
        loss = _weighted(p, lt, lm).sum(-1)
    elif kind == "skew_reverse_kl":
        lm = _log_mixture(lt, ls, 1 - param, param)
        loss = _weighted(q, ls, lm).sum(-1)
    elif kind == "tv":
        loss = 0.5 * (p - q).abs().sum(-1)
    elif kind == "alpha":
        # log A = LSE(alpha t + (1-alpha) s) - alpha LSE(t) - (1-alpha) LSE(s); loss = (1 - A)/(a(1-a))
        both_masked = torch.isneginf(s) & torch.isneginf(t)
        z = torch.where(both_masked, torch.full_like(s, -math.inf), param * t + (1 - param) * s)
        log_a = _lse(z) - param * _lse(t) - (1 - param) * _lse(s)
        loss = -torch.expm1(log_a) / (param * (1 - param))
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    return _apply_row_conventions(loss, s, t)


def _lse(x: torch.Tensor) -> torch.Tensor:
    empty = torch.isneginf(x).all(dim=-1)
    safe = torch.where(empty.unsqueeze(-1), torch.zeros_like(x), x)
    return torch.where(empty, torch.full_like(empty, -math.inf, dtype=x.dtype), torch.logsumexp(safe, -1))


def _apply_row_conventions(loss: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Padding rows (all -inf in both) -> 0; rows with no distribution or a NaN/+inf logit -> NaN."""
    empty_s, empty_t = torch.isneginf(s).all(-1), torch.isneginf(t).all(-1)
    bad = (empty_s ^ empty_t) | torch.isnan(s).any(-1) | torch.isnan(t).any(-1)
    bad = bad | torch.isposinf(s).any(-1) | torch.isposinf(t).any(-1)
    loss = torch.where(empty_s & empty_t, torch.zeros_like(loss), loss)
    return torch.where(bad, torch.full_like(loss, math.nan), loss)

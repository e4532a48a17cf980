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


TERM_DIVERGENCES = ("forward_kl", "reverse_kl", "jeffreys", "jsd", "skew_kl", "skew_reverse_kl", "tv")


def divergence_terms(ls: torch.Tensor, lt: torch.Tensor, kind: str, param: float) -> torch.Tensor:
    """Per-entry terms of a divergence whose value is their sum over the vocabulary.

    ``ls`` and ``lt`` are the student's and the teacher's log-probabilities (normalised over the
    whole vocabulary: the terms of a vocabulary shard are the shard's partial sum); ``kind`` is one
    of :data:`TERM_DIVERGENCES` after :func:`resolve_divergence`, or ``alpha`` where
    :func:`alpha_form` is not ``"log"`` (there it is no sum of entries: see :func:`alpha_loss_from_log`).
    Differentiable in both, with finite gradients where a probability is 0.
    """
    if kind in ("forward_kl", "reverse_kl", "jeffreys"):
        fwd = _weighted(lt.exp(), lt, ls) if kind != "reverse_kl" else None
        rev = _weighted(ls.exp(), ls, lt) if kind != "forward_kl" else None
        if kind == "jeffreys":
            return (1 - param) * fwd + param * rev
        return fwd if rev is None else rev
    if kind == "jsd":
        lm = _log_mixture(lt, ls, param, 1 - param)
        return param * _weighted(lt.exp(), lt, lm) + (1 - param) * _weighted(ls.exp(), ls, lm)
    if kind == "skew_kl":
        return _weighted(lt.exp(), lt, _log_mixture(lt, ls, param, 1 - param))
    if kind == "skew_reverse_kl":
        return _weighted(ls.exp(), ls, _log_mixture(lt, ls, 1 - param, param))
    if kind == "tv":
        return 0.5 * (lt.exp() - ls.exp()).abs()
    if kind == "alpha" and alpha_form(param) != "log":  # -(terms of A - 1) / (alpha (1 - alpha))
        return alpha_terms(ls, lt, param) / (param * (param - 1))
    raise ValueError(f"no per-entry terms for divergence {kind!r}; expected one of {TERM_DIVERGENCES}")


def alpha_form(alpha: float) -> str:
    """How the alpha divergence forms ``A = sum p^alpha q^(1 - alpha)`` (docs/divergences.md, "Amari alpha"),
    ``X = lt - ls``: ``"student"`` (``|alpha| <= 1/2``): ``A - 1 = sum q expm1(alpha X)``; ``"teacher"``
    (``|1 - alpha| <= 1/2``): ``A - 1 = sum p expm1(-(1 - alpha) X)`` (no ``1 - A`` cancellation near 0 and
    1); ``"log"`` (elsewhere): ``log A`` from log-sum-exps and the loss in log space (a term can overflow
    there while the loss does not). The kernels switch at the same points."""
    if -0.5 <= alpha <= 0.5:
        return "student"
    return "teacher" if 0.5 < alpha <= 1.5 else "log"


def _weighted_expm1(w: torch.Tensor, lw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w expm1(x) for w = exp(lw), exactly 0 where w == 0; from x = 1/2 up as exp(lw + x) - w (finite
    wherever the term is). Unselected branches see 0, so their gradients are never NaN."""
    small = (w > 0) & (x < 0.5)
    large = (w > 0) & ~small
    zero = torch.zeros_like(x)
    term_small = w * torch.expm1(torch.where(small, x, zero))
    term_large = torch.exp(torch.where(large, lw + x, zero)) - w
    return torch.where(small, term_small, torch.where(large, term_large, zero))


def alpha_terms(ls: torch.Tensor, lt: torch.Tensor, alpha: float) -> torch.Tensor:
    """The terms of ``A - 1``: ``q expm1(alpha X)`` (Student form), ``p expm1(-(1 - alpha) X)`` (Teacher)."""
    x = lt - ls  # NaN only where both are -inf, where the weight is 0
    if alpha_form(alpha) == "student":
        return _weighted_expm1(ls.exp(), ls, alpha * x)
    return _weighted_expm1(lt.exp(), lt, (alpha - 1) * x)


def alpha_loss_from_log(log_a: torch.Tensor, alpha: float) -> torch.Tensor:
    """The alpha loss in the Log form (alpha outside [0, 1], where A >= 1) from ``log A``:
    ``(A - 1) / (alpha (alpha - 1)) = exp(log A - log(alpha (alpha - 1))) (1 - 1/A)``, finite wherever the
    loss is, even where A is not."""
    return torch.exp(log_a - math.log(alpha * (alpha - 1))) * -torch.expm1(-log_a)


def alpha_mixture_logits(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha t + (1 - alpha) s``, ``-inf`` where both are ``-inf`` (a masked entry). The alpha
    divergence's ``log sum p^alpha q^(1 - alpha)`` is its log-sum-exp minus ``alpha LSE(t)`` and
    ``(1 - alpha) LSE(s)``."""
    both_masked = torch.isneginf(s) & torch.isneginf(t)
    return torch.where(both_masked, torch.full_like(s, -math.inf), alpha * t + (1 - alpha) * s)


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
    if kind in TERM_DIVERGENCES:
        loss = divergence_terms(ls, lt, kind, param).sum(-1)
    elif kind == "alpha":
        log_a = _lse(alpha_mixture_logits(s, t, param)) - param * _lse(t) - (1 - param) * _lse(s)
        if alpha_form(param) == "log":
            loss = alpha_loss_from_log(log_a, param)
        else:  # the sum of A - 1 where A >= 1/2, log A below (A = 1 + (A - 1) would lose A's low bits, and
            # autograd's gradient, proportional to A, with them): the kernels' choice for their gradient
            a_minus_1 = alpha_terms(ls, lt, param).sum(-1)
            not_small = a_minus_1 >= -0.5
            small = -torch.expm1(torch.where(not_small, torch.zeros_like(log_a), log_a))
            loss = torch.where(not_small, -a_minus_1, small) / (param * (1 - param))
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

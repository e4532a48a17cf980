"""Public token-level divergence losses: validation (:mod:`fdistill.validation`), backend choice, the
row layer (:mod:`fdistill.rows`) and reduction."""

from __future__ import annotations

import torch
from torch import nn

from . import _topk_teacher as topk_teacher
from . import ops  # noqa: F401  (registers fake and autograd for the compiled ops)
from ._extension import BUILD_HINT
from ._topk_teacher import TOPK_TAILS
from ._value_checks import ValueChecks
from .ops import accumulate_dtype
from .reference import DIVERGENCES
from .rows import BACKENDS, DivergenceRows, as_rows, pick_backend, reduce_rows
from .validation import (
    REDUCTIONS,
    check_choice,
    check_ignore_index,
    check_labels,
    check_logits,
    check_logits_tensor,
    check_no_vocab_size,
    check_teacher_grad,
    check_temperature,
    check_topk,
    check_topk_values,
    divergence_param,
)


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    topk_tail: str = "renormalize",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_temperature_squared: bool = False,
    grad_teacher: bool = False,
    grad_in_place: bool = False,
    backend: str | None = None,
    vocab_parallel_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    r"""Token-level divergence between the teacher's and the student's next-token distributions.

    With ``q = softmax(student_logits / T)`` and ``p = softmax(teacher_logits / T)`` per token:

    ==================== =========================================================================
    ``forward_kl``       KL(p || q) (the usual distillation loss)
    ``reverse_kl``       KL(q || p) (mode seeking)
    ``jeffreys``         (1 - beta) KL(p || q) + beta KL(q || p)
    ``jsd``              beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; as TRL's
                         ``generalized_jsd_loss`` and Liger's ``LigerJSD``: beta = 0 is KL(p || q) and
                         beta = 1 is KL(q || p)
    ``skew_kl``          KL(p || skew p + (1 - skew) q) (DistiLLM); skew = 0 is KL(p || q)
    ``skew_reverse_kl``  KL(q || skew q + (1 - skew) p); skew = 0 is KL(q || p)
    ``tv``               total variation 1/2 sum |p - q|
    ``alpha``            Amari alpha divergence (1 - sum p^alpha q^(1 - alpha)) / (alpha (1 - alpha));
                         alpha -> 1 is KL(p || q), alpha -> 0 is KL(q || p), alpha = 1/2 is 2 x squared
                         Hellinger
    ==================== =========================================================================

    Args:
        student_logits: ``(..., V)`` float32, float64, bfloat16 or float16. Computation is in float32
            (float64 for float64 inputs) whatever the input dtype.
        teacher_logits: same shape, dtype and device. It gets no gradient: pass ``.detach()``, or
            ``grad_teacher=True`` to differentiate through it too (reference backend). None when the
            teacher is given as ``teacher_topk``.
        teacher_topk: instead of ``teacher_logits``, the teacher's stored top-k: ``(indices,
            logprobs)``, both ``(..., k)`` with ``...`` the student's token dimensions (integer ids,
            distinct within a token, in ``[0, V)``; float log-probabilities ``<= 0`` or ``-inf``, at
            least one finite per token). Tokens ignored through ``labels`` may hold anything (e.g.
            padding). The same representation and meaning as in
            :func:`fdistill.fused_linear_divergence_loss`; ``topk_tail`` says what the rest of the
            vocabulary gets (``docs/topk.md``):

            * ``"renormalize"`` (default): the teacher is its top-k renormalised (0 elsewhere, a
              ``-inf`` logit), compared with the student's full distribution: the top-k
              log-probabilities are the teacher's logits (rounded to the student's dtype). With a
              temperature T the teacher is ``p_i^(1/T)`` renormalised over the top-k. Reverse KL is
              then ``+inf`` wherever the student has mass outside the top-k, as on dense logits.
            * ``"bucket"``: the (k + 1)-outcome distributions (top-k ids, everything else); the
              teacher's tail is ``1 - sum(top-k p)``, the student's its total probability outside
              the top-k. Needs ``temperature=1`` and ``sum(top-k p) <= 1``; no ``grad_in_place``.

            Not supported with ``teacher_topk``: ``grad_teacher`` and ``vocab_parallel_group``.
        divergence: one of :data:`fdistill.DIVERGENCES`.
        beta: weight in [0, 1] for ``jeffreys`` (on KL(q || p)) and ``jsd``.
        skew: lambda in [0, 1] for ``skew_kl`` / ``skew_reverse_kl``.
        alpha: any real except 0 and 1, for ``alpha``.
        temperature: T > 0 divides both logits; the gradient includes the 1/T.
        labels: ``(...)`` integer tensor; tokens equal to ``ignore_index`` contribute 0 and get zero
            gradient.
        reduction: ``mean`` (over tokens that are not ignored; 0 when all are), ``sum`` or ``none``
            (per-token losses of shape ``(...)``).
        scale_by_temperature_squared: multiply the loss by T**2 (Hinton et al.), off by default.
        grad_teacher: allow a teacher that requires grad and differentiate through it.
        grad_in_place: write the student gradient over ``student_logits`` in the backward (halves the
            memory of the backward; the logits are gone afterwards, so only for callers that no
            longer need them). Fused backends only. Without it, when the student needs a gradient
            (and is not float16) the fused backends form the gradient in the forward, in the same
            pass over the logits as the loss (``docs/divergences.md``, "One pass"): its ``[..., V]``
            buffer exists from the forward on, and the backward only scales it by the upstream
            gradient where that differs from the reduction's own factor.
        backend: ``None`` (best for the device: the C++ kernel for CPU tensors, Triton for CUDA
            tensors), ``"cpu"`` (the fused C++ kernel), ``"triton"`` (CUDA tensors; CPU tensors too
            when ``TRITON_INTERPRET=1`` was set before triton was imported) or ``"reference"``
            (pure PyTorch).
        vocab_parallel_group: a ``torch.distributed`` process group over which the vocabulary is
            sharded (see :mod:`fdistill.vocab_parallel`): both logits are then this rank's contiguous
            shard ``(..., V_local)`` (rank order; shards may be uneven, the student's and the teacher's
            must be the same), every rank holds every token and passes the same labels and options.
            The loss (the same on every rank) is computed from all-reduced row statistics, and each
            rank gets the gradient of its own shard; ``(tokens x V)`` is never gathered. Everything
            above is supported (every divergence and parameter, temperature, labels, reductions,
            ``grad_teacher``, every backend: the fused kernels merge the shards' per-row partial
            statistics), except ``grad_in_place``. Bad layouts raise the same error on every rank.
        vocab_size: with ``vocab_parallel_group``, the full V, checked against the sum of the shards.

    Returns:
        The loss in float32 (float64 for float64 logits): a scalar, or ``(...)`` for ``reduction="none"``.

    Special rows: ``-inf`` logits (a masked vocabulary) contribute 0. A token whose student and
    teacher logits are all ``-inf`` has loss 0 and gradient 0; one where only one side is all
    ``-inf``, or with a NaN or ``+inf`` logit, has a NaN loss and NaN gradient (propagated, so that
    anomaly checks see it). A divergence that is infinite (teacher mass where the student has none,
    for forward KL) is ``+inf``.
    """
    if vocab_parallel_group is not None:
        from . import vocab_parallel

        if teacher_topk is not None:
            raise ValueError("teacher_topk cannot be combined with vocab_parallel_group: give the teacher's "
                             "logit shards")  # fmt: skip
        return vocab_parallel.divergence_loss(
            student_logits, teacher_logits, divergence, beta=beta, skew=skew, alpha=alpha,
            temperature=temperature, labels=labels, ignore_index=ignore_index, reduction=reduction,
            scale_by_temperature_squared=scale_by_temperature_squared, grad_teacher=grad_teacher,
            grad_in_place=grad_in_place, backend=backend, group=vocab_parallel_group, vocab_size=vocab_size,
        )  # fmt: skip
    check_no_vocab_size(vocab_size)
    if teacher_topk is not None or teacher_logits is None:
        return _topk_divergence_loss(
            student_logits, teacher_logits, teacher_topk, topk_tail, divergence, beta=beta, skew=skew,
            alpha=alpha, temperature=temperature, labels=labels, ignore_index=ignore_index,
            reduction=reduction, scale_by_temperature_squared=scale_by_temperature_squared,
            grad_teacher=grad_teacher, grad_in_place=grad_in_place, backend=backend,
        )  # fmt: skip
    check_logits(student_logits, teacher_logits)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    param = divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_teacher_grad(teacher_logits, grad_teacher)
    backend = pick_backend(backend, student_logits, grad_teacher)
    if grad_in_place and backend == "reference":
        raise ValueError("grad_in_place=True needs a fused backend ('cpu' or 'triton'), not 'reference'")

    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    student = as_rows(student_logits, vocab)
    if grad_in_place and student.shape[0] > 1 and student.stride(0) < vocab:
        student = student.contiguous()  # rows share memory (e.g. expand): each needs its own gradient
    teacher = as_rows(teacher_logits, vocab)
    flat_labels = None
    if labels is not None:
        flat_labels = check_labels(labels, student_logits).reshape(-1).long().contiguous()

    factor = temperature * temperature if scale_by_temperature_squared else 1.0
    spec = DivergenceRows(divergence, param, temperature, int(ignore_index), backend, factor)
    scale = _reduction_scale(reduction, student, flat_labels, ignore_index)
    rows = spec.loss(student, teacher, flat_labels, grad_in_place=grad_in_place, grad_scale=scale)
    return reduce_rows(rows, reduction, lead_shape, flat_labels, ignore_index)


def _topk_divergence_loss(student_logits, teacher_logits, teacher_topk, topk_tail, divergence, *, beta, skew,
                          alpha, temperature, labels, ignore_index, reduction, scale_by_temperature_squared,
                          grad_teacher, grad_in_place, backend) -> torch.Tensor:  # fmt: skip
    """:func:`divergence_loss` against a teacher given by its top-k (``_topk_teacher``)."""
    if teacher_logits is not None:
        raise ValueError("give the teacher as teacher_logits or as teacher_topk, not both")
    if teacher_topk is None:
        raise TypeError("teacher_logits must be a torch.Tensor, got None (or give the teacher as "
                        "teacher_topk=(indices, logprobs))")  # fmt: skip
    check_logits_tensor("student_logits", student_logits)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("topk_tail", topk_tail, TOPK_TAILS)
    param = divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    indices, logprobs = check_topk(teacher_topk, lead_shape, student_logits.device, other="student_logits")
    if grad_teacher:
        raise ValueError("grad_teacher=True is not supported with teacher_topk (stored top-k are constants)")
    check_teacher_grad(logprobs, False, name="teacher_topk logprobs")
    if topk_tail == "bucket" and temperature != 1:
        raise ValueError(
            f"topk_tail='bucket' needs temperature=1 (got {temperature}): the teacher's tempered "
            "tail mass cannot be known from its top-k"
        )
    if topk_tail == "bucket" and grad_in_place:
        raise ValueError("grad_in_place=True is not supported with topk_tail='bucket'")
    backend = pick_backend(backend, student_logits, False)
    if grad_in_place and backend == "reference":
        raise ValueError("grad_in_place=True needs a fused backend ('cpu' or 'triton'), not 'reference'")
    flat_labels = None
    if labels is not None:
        flat_labels = check_labels(labels, student_logits).reshape(-1).long().contiguous()
    keep = None if flat_labels is None else flat_labels != ignore_index
    checks = ValueChecks()  # one host sync for every value check
    idx, lp = topk_teacher.placeholder_for_ignored(indices, logprobs, keep)
    check_topk_values(idx, lp, vocab, "error", topk_tail, checks)
    checks.raise_first()

    student = as_rows(student_logits, vocab)
    factor = temperature * temperature if scale_by_temperature_squared else 1.0
    spec = DivergenceRows(divergence, param, temperature, int(ignore_index), backend, factor)
    if topk_tail == "bucket":
        s_rows, t_rows = topk_teacher.bucket_outcomes(student, idx, lp, accumulate_dtype(student.dtype))
        rows = spec.loss(s_rows, t_rows, flat_labels)
    else:
        if grad_in_place and student.shape[0] > 1 and student.stride(0) < vocab:
            student = student.contiguous()
        teacher = topk_teacher.dense_logits(idx, lp, vocab, student.dtype)
        scale = _reduction_scale(reduction, student, flat_labels, ignore_index)
        rows = spec.loss(student, teacher, flat_labels, grad_in_place=grad_in_place, grad_scale=scale)
    return reduce_rows(rows, reduction, lead_shape, flat_labels, ignore_index)


def _reduction_scale(reduction, student, labels, ignore_index) -> float:
    """The factor d loss / d loss_row of the reduction where it is known on the host (1 otherwise), so
    that the one-pass gradient needs no rescaling in the common case: the label count is read only
    where that is free (CPU tensors, not compiled; ``ops.host_reads_are_free``)."""
    if reduction != "mean" or torch.compiler.is_compiling():
        return 1.0
    if labels is None:
        return 1.0 / max(student.shape[0], 1)
    if not ops.host_reads_are_free(labels):
        return 1.0
    return 1.0 / max(int((labels != ignore_index).sum()), 1)


class DivergenceLoss(nn.Module):
    """``nn.Module`` form of :func:`divergence_loss`; keyword options are fixed at construction.

    ``forward(student_logits, teacher_logits=None, labels=None, teacher_topk=None)`` (a top-k teacher
    as ``teacher_topk=(indices, logprobs)``; ``topk_tail`` is a construction option).
    """

    def __init__(self, divergence: str = "forward_kl", **options):
        super().__init__()
        check_choice("divergence", divergence, DIVERGENCES)
        if "labels" in options:
            raise TypeError("labels are passed to forward(), not to the constructor")
        allowed = set(divergence_loss.__kwdefaults__) - {"labels", "teacher_topk"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; expected some of {sorted(allowed)}")
        self.divergence = divergence
        self.options = options

    def forward(self, student_logits, teacher_logits=None, labels=None, teacher_topk=None):
        return divergence_loss(student_logits, teacher_logits, self.divergence, labels=labels,
                               teacher_topk=teacher_topk, **self.options)  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join([repr(self.divergence)] + [f"{k}={v!r}" for k, v in self.options.items()])


# ----------------------------------------------------------------------------- helpers


__all__ = [
    "BACKENDS", "BUILD_HINT", "DIVERGENCES", "REDUCTIONS", "TOPK_TAILS", "DivergenceLoss", "divergence_loss",
]  # fmt: skip

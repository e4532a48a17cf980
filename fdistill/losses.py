"""Public token-level divergence losses: validation, backend choice and reduction."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import ops  # noqa: F401  (registers fake and autograd for the compiled ops)
from ._extension import BUILD_HINT, has_cpu_kernels, require_extension
from ._triton_dispatch import check_triton_device, triton_available, triton_forward_op
from .reference import DIVERGENCES, divergence_rows_reference

BACKENDS = ("reference", "cpu", "triton")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    *,
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
            ``grad_teacher=True`` to differentiate through it too (reference backend).
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
            longer need them). Fused backends only.
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

        return vocab_parallel.divergence_loss(
            student_logits, teacher_logits, divergence, beta=beta, skew=skew, alpha=alpha,
            temperature=temperature, labels=labels, ignore_index=ignore_index, reduction=reduction,
            scale_by_temperature_squared=scale_by_temperature_squared, grad_teacher=grad_teacher,
            grad_in_place=grad_in_place, backend=backend, group=vocab_parallel_group, vocab_size=vocab_size,
        )  # fmt: skip
    _check_no_vocab_size(vocab_size)
    _check_logits(student_logits, teacher_logits)
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    param = _divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
    _check_temperature(temperature)
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if teacher_logits.requires_grad and not grad_teacher:
        raise ValueError(
            "teacher_logits requires grad, but fdistill does not backpropagate into the teacher by "
            "default: pass teacher_logits.detach(), or grad_teacher=True to differentiate through it"
        )
    backend = _pick_backend(backend, student_logits, grad_teacher)
    if grad_in_place and backend == "reference":
        raise ValueError("grad_in_place=True needs a fused backend ('cpu' or 'triton'), not 'reference'")

    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    student = _as_rows(student_logits, vocab)
    if grad_in_place and student.shape[0] > 1 and student.stride(0) < vocab:
        student = student.contiguous()  # rows share memory (e.g. expand): each needs its own gradient
    teacher = _as_rows(teacher_logits, vocab)
    flat_labels = None
    if labels is not None:
        flat_labels = _check_labels(labels, student_logits).reshape(-1).long().contiguous()

    factor = temperature * temperature if scale_by_temperature_squared else 1.0
    if backend == "reference":
        rows = _reference_rows(student, teacher, flat_labels, divergence, param, temperature, ignore_index)
    else:
        options = (divergence, float(param), float(temperature), int(ignore_index))
        # float16 keeps the two-pass path: a gradient stored before the upstream factor is known (a
        # loss scale of 2**16, a weight < 1) could leave float16's range where the final one does not
        one_pass = student.requires_grad and torch.is_grad_enabled() and student.dtype != torch.float16
        if grad_in_place or not one_pass:
            fwd = torch.ops.fdistill.divergence_fwd if backend == "cpu" else triton_forward_op()
            rows, _ = fwd(student, teacher, flat_labels, *options, bool(grad_in_place))
        else:  # one pass: the gradient is formed with the loss, pre-scaled by what the reduction applies
            fwd = torch.ops.fdistill.divergence_fwd_grad if backend == "cpu" else triton_forward_op(True)
            scale = factor * _reduction_scale(reduction, student, flat_labels, ignore_index)
            rows, _, _ = fwd(student, teacher, flat_labels, *options, scale)

    if scale_by_temperature_squared:
        rows = rows * factor
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


def reduce_rows(rows, reduction, lead_shape, labels=None, ignore_index=-100):
    """Per-token losses -> the loss: ``none`` (shape ``lead_shape``), ``sum``, or ``mean`` over the
    tokens whose label is not ``ignore_index`` (all tokens without labels; 0 when all are ignored)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if labels is None:
        return total / max(rows.numel(), 1)
    return total / (labels != ignore_index).sum().clamp_min(1)


class DivergenceLoss(nn.Module):
    """``nn.Module`` form of :func:`divergence_loss`; keyword options are fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None)``.
    """

    def __init__(self, divergence: str = "forward_kl", **options):
        super().__init__()
        _check_choice("divergence", divergence, DIVERGENCES)
        if "labels" in options:
            raise TypeError("labels are passed to forward(), not to the constructor")
        allowed = set(divergence_loss.__kwdefaults__) - {"labels"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; expected some of {sorted(allowed)}")
        self.divergence = divergence
        self.options = options

    def forward(self, student_logits, teacher_logits, labels=None):
        return divergence_loss(student_logits, teacher_logits, self.divergence, labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.divergence)] + [f"{k}={v!r}" for k, v in self.options.items()])


# ----------------------------------------------------------------------------- helpers


def _reference_rows(student, teacher, labels, divergence, param, temperature, ignore_index):
    if labels is not None:  # ignored rows are replaced so that garbage there cannot leak NaN
        keep = (labels != ignore_index).unsqueeze(-1)
        student = torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))
        teacher = torch.where(keep, teacher, torch.zeros((), dtype=teacher.dtype, device=teacher.device))
    rows = divergence_rows_reference(student, teacher, divergence, param, temperature)
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    return rows


def _as_rows(x: torch.Tensor, vocab: int) -> torch.Tensor:
    rows = x.reshape(-1, vocab)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _pick_backend(
    backend: str | None, student: torch.Tensor, grad_teacher: bool, name="student_logits"
) -> str:
    device = student.device.type
    if backend is None:
        if grad_teacher:
            return "reference"
        if device == "cpu":
            return "cpu" if has_cpu_kernels() else "reference"
        return "triton" if device == "cuda" and triton_available() else "reference"
    _check_choice("backend", backend, BACKENDS)
    if backend != "reference" and grad_teacher:
        raise ValueError(f"grad_teacher=True needs backend='reference' ({backend!r} skips the teacher)")
    if backend == "cpu":
        if device != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {name} on {student.device}")
        require_extension()
    if backend == "triton":
        check_triton_device(student.device, name)
    return backend


def _check_logits_tensor(name: str, x, vocab: str = "V") -> None:
    """A floating tensor of shape ``(..., vocab)`` with at least one vocabulary entry."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., {vocab}) with {vocab} >= 1, got {tuple(x.shape)}")


def _check_logits(student, teacher) -> None:
    _check_logits_tensor("student_logits", student)
    _check_logits_tensor("teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} "
            "must have the same shape"
        )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"student_logits ({student.dtype}) and teacher_logits ({teacher.dtype}) must have the same dtype"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits ({student.device}) and teacher_logits ({teacher.device}) "
            "are on different devices"
        )


def _check_labels(labels, student) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' shape without the vocabulary "
            f"dimension, {tuple(student.shape[:-1])}"
        )
    if labels.device != student.device:
        raise ValueError(f"labels ({labels.device}) and logits ({student.device}) are on different devices")
    return labels


def _check_no_vocab_size(vocab_size) -> None:
    if vocab_size is not None:
        raise ValueError(
            "vocab_size is only used with vocab_parallel_group (the sum of the vocabulary shards)"
        )


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


# The kernels divide by T as a multiplication by 1/T in float32 (the accumulation dtype of every
# input dtype but float64): a smaller T would make 1/T infinite and every loss NaN.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def _check_temperature(temperature) -> None:
    _check_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.3g} (1/T must be finite in float32), got {temperature}"
        )


def _divergence_param(divergence: str, *, beta, skew, alpha) -> float:
    """The one scalar the divergence uses, validated."""
    for name, value in (("beta", beta), ("skew", skew), ("alpha", alpha)):
        _check_real(name, value)
    for name, value in (("beta", beta), ("skew", skew)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if alpha in (0, 1):
        raise ValueError(
            f"alpha must not be 0 or 1 (those limits are reverse_kl and forward_kl), got {alpha}"
        )
    if divergence in ("jeffreys", "jsd"):
        return float(beta)
    if divergence in ("skew_kl", "skew_reverse_kl"):
        return float(skew)
    if divergence == "alpha":
        return float(alpha)
    return 0.0


__all__ = ["BACKENDS", "BUILD_HINT", "DIVERGENCES", "REDUCTIONS", "DivergenceLoss", "divergence_loss"]

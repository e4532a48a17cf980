"""The row layer under every token-level divergence loss: validated options in, per-row losses out.

A :class:`DivergenceRows` holds one call's options (validated once by the public API) and maps
``[rows, V]`` student and teacher logits to per-row losses through one backend's ops (``fdistill/ops.py``):

- :meth:`DivergenceRows.loss` is differentiable in the student (autograd of the ops: the one-pass op
  when the student needs a gradient, the forward-only op otherwise);
- :meth:`DivergenceRows.loss_and_grad` returns the losses and ``d loss_row / d student`` directly,
  with no autograd: the one-pass op, writing the gradient over the student logits it is given (the
  caller owns them, e.g. a fused-linear chunk's logits), so a chunk costs one read of its logits.

``factor`` (``T**2`` with ``scale_by_temperature_squared``, else 1) scales the losses and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops  # noqa: F401  (registers fake and autograd for the compiled ops)
from ._extension import has_cpu_kernels, require_extension
from ._triton_dispatch import check_triton_device, triton_available, triton_forward_op
from .reference import divergence_rows_reference
from .validation import check_choice

BACKENDS = ("reference", "cpu", "triton")


@dataclass(frozen=True)
class DivergenceRows:
    divergence: str
    param: float
    temperature: float
    ignore_index: int
    backend: str  # "cpu", "triton" or "reference"
    factor: float = 1.0

    def _options(self):
        return (self.divergence, float(self.param), float(self.temperature), int(self.ignore_index))

    def loss(self, student, teacher, labels=None, *, grad_in_place=False, grad_scale=1.0) -> torch.Tensor:
        """Per-row losses ``[rows]``, differentiable in ``student``. ``grad_scale``: what the caller's
        reduction will multiply each row's loss by (e.g. 1/N for a mean), so that the one-pass
        gradient needs no rescaling in the backward (any value is correct; only speed differs)."""
        if self.backend == "reference":
            rows = _reference_rows(student, teacher, labels, *self._options())
        else:
            options = self._options()
            # float16 keeps the two-pass path: a gradient stored before the upstream factor is known
            # (a loss scale of 2**16, a weight < 1) could leave float16's range where the final one
            # does not
            one_pass = student.requires_grad and torch.is_grad_enabled() and student.dtype != torch.float16
            if grad_in_place or not one_pass:
                fwd = torch.ops.fdistill.divergence_fwd if self.backend == "cpu" else triton_forward_op()
                rows, _ = fwd(student, teacher, labels, *options, bool(grad_in_place))
            else:
                fwd = (
                    torch.ops.fdistill.divergence_fwd_grad
                    if self.backend == "cpu"
                    else triton_forward_op(True)
                )
                rows, _, _ = fwd(student, teacher, labels, *options, self.factor * grad_scale)
        return rows * self.factor if self.factor != 1.0 else rows

    def loss_and_grad(self, student, teacher, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row losses, their gradient in the student), no autograd. ``student`` (contiguous rows,
        owned by the caller) is overwritten by the gradient on the fused backends."""
        if self.backend == "reference":
            with torch.enable_grad():
                s = student.detach().requires_grad_(True)
                rows = _reference_rows(s, teacher, labels, *self._options()) * self.factor
                (grad,) = torch.autograd.grad(rows.sum(), s)
            return rows.detach(), grad
        fwd = torch.ops.fdistill.divergence_fwd_grad_
        if self.backend == "triton":
            fwd = triton_forward_op(True, in_place=True)
        rows, _ = fwd(student, teacher, labels, *self._options(), self.factor)
        return (rows * self.factor if self.factor != 1.0 else rows), student


def _reference_rows(student, teacher, labels, divergence, param, temperature, ignore_index):
    if labels is not None:  # ignored rows are replaced so that garbage there cannot leak NaN
        keep = (labels != ignore_index).unsqueeze(-1)
        student = torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))
        teacher = torch.where(keep, teacher, torch.zeros((), dtype=teacher.dtype, device=teacher.device))
    rows = divergence_rows_reference(student, teacher, divergence, param, temperature)
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    return rows


def as_rows(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """``x`` as ``[rows, vocab]`` with unit stride along the vocabulary (a view where possible)."""
    rows = x.reshape(-1, vocab)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


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


def pick_backend(
    backend: str | None, student: torch.Tensor, grad_teacher: bool, name="student_logits"
) -> str:
    """The divergence backend for ``student``'s device: ``backend`` checked, or the best one for None."""
    device = student.device.type
    if backend is None:
        if grad_teacher:
            return "reference"
        if device == "cpu":
            return "cpu" if has_cpu_kernels() else "reference"
        return "triton" if device == "cuda" and triton_available() else "reference"
    check_choice("backend", backend, BACKENDS)
    if backend != "reference" and grad_teacher:
        raise ValueError(f"grad_teacher=True needs backend='reference' ({backend!r} skips the teacher)")
    if backend == "cpu":
        if device != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {name} on {student.device}")
        require_extension()
    if backend == "triton":
        check_triton_device(student.device, name)
    return backend

"""Fake (meta) implementations and autograd for the registered ops ``torch.ops.fdistill.*``.

The op contract: ops take ``[rows, V]`` logits and return a per-row loss plus per-row statistics
(log-sum-exps and one or two scalars); the backward recomputes the probabilities from them, so
nothing of size ``[rows, V]`` is saved. Reductions happen in Python (``fdistill.losses``).
"""

from __future__ import annotations

import torch

from ._extension import _C

NUM_STATS = 6  # must match kNumStats in csrc/include/fdistill/divergence_math.h


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and statistics dtype: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:
    assert _C.num_stats == NUM_STATS, "fdistill._C is stale: rebuild the extension"

    @torch.library.register_fake("fdistill::divergence_fwd")
    def _divergence_fwd_fake(student, teacher, labels, divergence, param, temperature, ignore_index):
        torch._check(student.dim() == 2, lambda: "student must be [rows, vocab]")
        torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
        rows = student.shape[0]
        acc = accumulate_dtype(student.dtype)
        return student.new_empty(rows, dtype=acc), student.new_empty((rows, NUM_STATS), dtype=acc)

    @torch.library.register_fake("fdistill::divergence_bwd")
    def _divergence_bwd_fake(
        grad_loss, student, teacher, labels, stats, divergence, param, temperature, ignore_index
    ):
        torch._check(grad_loss.shape == (student.shape[0],), lambda: "grad_loss must be [rows]")
        return student.new_empty(student.shape)

    def _setup_context(ctx, inputs, output):
        student, teacher, labels, divergence, param, temperature, ignore_index = inputs
        _, stats = output
        ctx.save_for_backward(student, teacher, labels, stats)  # inputs (no copy) + O(rows)
        ctx.options = (divergence, param, temperature, ignore_index)

    def _backward(ctx, grad_loss, _grad_stats):
        student, teacher, labels, stats = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = torch.ops.fdistill.divergence_bwd(
                grad_loss, student, teacher, labels, stats, *ctx.options
            )
        return grad_student, None, None, None, None, None, None

    torch.library.register_autograd("fdistill::divergence_fwd", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, grad):
        raise NotImplementedError(
            "fdistill's fused kernels have no second derivative; use backend='reference' for double backward"
        )

    torch.library.register_autograd(
        "fdistill::divergence_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )

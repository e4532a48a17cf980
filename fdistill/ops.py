"""Fake (meta) implementations and autograd for the divergence ops, written once for every backend.

The op contract (C++ ops ``fdistill::divergence_fwd`` / ``_bwd`` / ``_bwd_``, and their Triton twins
``*_triton`` in ``fdistill/triton/divergence.py``): the forward takes ``[rows, V]`` logits and returns
a per-row loss plus per-row statistics (``NUM_STATS`` numbers: the log-sum-exps as (max, log-sum)
and one or two scalars); the backward recomputes the probabilities from them, so nothing of size
``[rows, V]`` is saved. ``divergence_bwd_`` writes the gradient over the student logits instead
of a new tensor (``grad_in_place=True`` in the forward selects it). Reductions happen in Python.
"""

from __future__ import annotations

import torch

from ._extension import _C

NUM_STATS = 6  # must match kNumStats in csrc/include/fdistill/divergence_math.h

FWD_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param, float temperature,"
    " int ignore_index, bool grad_in_place=False) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, str divergence,"
    " float param, float temperature, int ignore_index) -> Tensor"
)
BWD_INPLACE_SCHEMA = (
    "(Tensor grad_loss, Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor stats, str divergence,"
    " float param, float temperature, int ignore_index) -> ()"
)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and statistics dtype: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(student, teacher, labels, divergence, param, temperature, ignore_index, grad_in_place=False):
    torch._check(student.dim() == 2, lambda: "student must be [rows, vocab]")
    torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
    rows = student.shape[0]
    acc = accumulate_dtype(student.dtype)
    return student.new_empty(rows, dtype=acc), student.new_empty((rows, NUM_STATS), dtype=acc)


def _bwd_fake(grad_loss, student, teacher, labels, stats, divergence, param, temperature, ignore_index):
    torch._check(grad_loss.shape == (student.shape[0],), lambda: "grad_loss must be [rows]")
    return student.new_empty(student.shape)


def _bwd_inplace_fake(grad_loss, student, *args):
    return None


def _setup_context(ctx, inputs, output):
    student, teacher, labels, divergence, param, temperature, ignore_index, *rest = inputs
    _, stats = output
    ctx.save_for_backward(student, teacher, labels, stats)  # inputs (no copy) + O(rows)
    ctx.options = (divergence, param, temperature, ignore_index)
    ctx.grad_in_place = bool(rest[0]) if rest else False


def _no_double_backward(ctx, grad):
    raise NotImplementedError(
        "fdistill's fused kernels have no second derivative; use backend='reference' for double backward"
    )


def register_divergence_ops(fwd: str, bwd: str, bwd_inplace: str) -> None:
    """Fake kernels and autograd for one backend's (forward, backward, in-place backward) ops."""
    torch.library.register_fake(f"fdistill::{fwd}")(_fwd_fake)
    torch.library.register_fake(f"fdistill::{bwd}")(_bwd_fake)
    torch.library.register_fake(f"fdistill::{bwd_inplace}")(_bwd_inplace_fake)
    bwd_op = getattr(torch.ops.fdistill, bwd)
    bwd_inplace_op = getattr(torch.ops.fdistill, bwd_inplace)

    def backward(ctx, grad_loss, _grad_stats):
        student, teacher, labels, stats = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            if ctx.grad_in_place:
                if torch.is_grad_enabled():  # create_graph=True: the in-place gradient has no graph
                    _no_double_backward(ctx, grad_loss)
                bwd_inplace_op(grad_loss, student, teacher, labels, stats, *ctx.options)
                grad_student = student
            else:
                grad_student = bwd_op(grad_loss, student, teacher, labels, stats, *ctx.options)
        return grad_student, None, None, None, None, None, None, None

    torch.library.register_autograd(f"fdistill::{fwd}", backward, setup_context=_setup_context)
    torch.library.register_autograd(
        f"fdistill::{bwd}", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


if _C is not None:
    assert _C.num_stats == NUM_STATS, "fdistill._C is stale: rebuild the extension"
    register_divergence_ops("divergence_fwd", "divergence_bwd", "divergence_bwd_")

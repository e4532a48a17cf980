"""Fake (meta) implementations and autograd for the divergence ops, written once for every backend.

The op contract (C++ ops ``fdistill::divergence_fwd`` / ``_fwd_grad`` / ``_bwd`` / ``_bwd_``, and
their Triton twins ``*_triton`` in ``fdistill/triton/divergence.py``): the forward takes ``[rows, V]``
logits and returns a per-row loss plus per-row statistics (``NUM_STATS`` numbers: the log-sum-exps as
(max, log-sum) and one or two scalars).

- ``divergence_fwd_grad`` (the one-pass op, used whenever the student needs a gradient) also returns
  ``grad_scale * d loss_row / d student`` ``[rows, V]``, computed row by row right after the row's
  statistics, so forward+backward reads the logits once. Its backward scales that saved gradient in
  place by ``grad_loss / grad_scale`` (nothing at all when they are equal, e.g. the mean's ``1/N``),
  so any upstream gradient (``reduction="none"``) is exact.
- ``divergence_fwd_grad_`` is the same kernel writing the gradient over the student logits, for
  callers that own them and differentiate themselves (the fused-linear chunks): no autograd.
- ``divergence_fwd`` computes no gradient (no-grad forwards, and ``grad_in_place=True``); its
  backward recomputes the probabilities from the statistics (nothing of size ``[rows, V]`` saved),
  into a new tensor (``divergence_bwd``) or over the student logits (``divergence_bwd_``).

Vocabulary parallelism (``fdistill/vocab_parallel.py``) runs partial -> merge -> finish on three more
ops per backend, ``divergence_partial`` / ``_finish`` / ``_second`` (``*_triton``): the partial op
reduces each row of a vocabulary slice to ``NUM_PARTIALS`` mergeable float64 numbers (max and
sum-exp of s and t, the weighted sums, the alpha mixture's log-sum-exp; ``kNumPartials`` in
``csrc/include/fdistill/divergence_math.h``); the finish op merges the partials of every slice
``[parts, rows, NUM_PARTIALS]`` and returns the loss and ``NUM_STATS`` statistics exactly as the
unsharded forward writes them; for the divergences of ``TWO_PASS_DIVERGENCES`` the second op sums the
second pass over a slice from those statistics (``[rows, 2]``, float64), and the finish op, given the
sums of every slice, completes the loss. The backward is ``divergence_bwd`` with the statistics.

Reductions happen in Python.
"""

from __future__ import annotations

import torch

from ._extension import _C
from .reference import DIVERGENCES

NUM_STATS = 6  # must match kNumStats in csrc/include/fdistill/divergence_math.h
NUM_PARTIALS = 12  # must match kNumPartials there
# the divergences (after resolve_divergence) with a second pass: needs_second_pass there
TWO_PASS_DIVERGENCES = ("jsd", "skew_kl", "skew_reverse_kl", "tv", "alpha")

FWD_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param, float temperature,"
    " int ignore_index, bool grad_in_place=False) -> (Tensor, Tensor)"
)
FWD_GRAD_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param, float temperature,"
    " int ignore_index, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)"
)
FWD_GRAD_INPLACE_SCHEMA = (
    "(Tensor(a!) student, Tensor teacher, Tensor? labels, str divergence, float param, float temperature,"
    " int ignore_index, float grad_scale=1.0) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, str divergence,"
    " float param, float temperature, int ignore_index) -> Tensor"
)
BWD_INPLACE_SCHEMA = (
    "(Tensor grad_loss, Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor stats, str divergence,"
    " float param, float temperature, int ignore_index) -> ()"
)

PARTIAL_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param, float temperature,"
    " int ignore_index) -> Tensor"
)
FINISH_SCHEMA = (
    "(Tensor partials, Tensor? second, Tensor? labels, str divergence, float param, int ignore_index,"
    " ScalarType dtype) -> (Tensor, Tensor)"
)
SECOND_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, str divergence, float param,"
    " float temperature, int ignore_index) -> Tensor"
)


SKIP_RESCALE_TOLERANCE = 1e-6  # relative, float32 gradients


def tracing(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced (torch.compile, AOT autograd, make_fx) rather than run."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return True  # fake and functional tensors are Tensor subclasses
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None or torch._is_functional_tensor(x)


def host_reads_are_free(x: torch.Tensor) -> bool:
    """Whether reading ``x``'s values on the host costs nothing: CPU memory, and not traced. On a
    GPU it would be a device sync, which the hot path never makes."""
    return x.device.type == "cpu" and not tracing(x)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and statistics dtype: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(student, teacher, labels, divergence, param, temperature, ignore_index, grad_in_place=False):
    torch._check(student.dim() == 2, lambda: "student must be [rows, vocab]")
    torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
    rows = student.shape[0]
    acc = accumulate_dtype(student.dtype)
    return student.new_empty(rows, dtype=acc), student.new_empty((rows, NUM_STATS), dtype=acc)


def _fwd_grad_fake(student, teacher, labels, divergence, param, temperature, ignore_index, grad_scale=1.0):
    loss, stats = _fwd_fake(student, teacher, labels, divergence, param, temperature, ignore_index)
    return loss, stats, student.new_empty(student.shape)


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


def _fwd_grad_setup_context(ctx, inputs, output):
    student, teacher, labels, divergence, param, temperature, ignore_index, *rest = inputs
    _, stats, grad = output
    ctx.save_for_backward(student, teacher, labels, stats, grad)  # no copies
    ctx.options = (divergence, param, temperature, ignore_index)
    ctx.grad_scale = float(rest[0]) if rest else 1.0
    ctx.consumed = False
    ctx.mark_non_differentiable(stats, grad)
    ctx.set_materialize_grads(False)  # else autograd fills a [rows, V] zero "gradient" of the gradient


def _fwd_grad_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    """The first backward scales the one-pass gradient by grad_loss / grad_scale, in place (nothing
    to do when that is 1, e.g. the mean's 1/N, checked on CPU tensors), and hands it over; a repeated
    backward (retain_graph=True) recomputes it from the saved inputs and statistics."""
    none = (None,) * 7
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None, *none)
    if torch.is_grad_enabled():  # create_graph=True: the one-pass gradient has no graph
        _no_double_backward(ctx, grad_loss)
    student, teacher, labels, stats, grad = ctx.saved_tensors
    if ctx.consumed:
        return (ctx.bwd_op(grad_loss, student, teacher, labels, stats, *ctx.options), *none)
    ratio = grad_loss.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if ctx.grad_scale != 1.0:
        ratio = ratio / ctx.grad_scale
    ratio = ratio.unsqueeze(-1)
    if tracing(grad):
        return (grad * ratio, *none)  # a graph has no in-place ownership to exploit
    ctx.consumed = True
    # Skipped on CPU tensors when every ratio is 1 (to within float32 resolution for a float32 / bf16
    # gradient, which already carries a few float32 ulps); on a GPU always applied (no host sync).
    tol = 0.0 if grad.dtype == torch.float64 else SKIP_RESCALE_TOLERANCE
    if not host_reads_are_free(ratio) or not bool(((ratio - 1).abs() <= tol).all()):
        grad.data.mul_(ratio)  # .data: the saved buffer is consumed here, no version bump needed
    return (grad, *none)


def register_divergence_ops(fwd: str, bwd: str, bwd_inplace: str, fwd_grad: str) -> None:
    """Fake kernels and autograd for one backend's (forward, backward, in-place backward, one-pass
    forward) ops, and the fake of the in-place one-pass forward ``fwd_grad + "_"`` (no autograd: it
    is called on logits that need none, by callers that differentiate themselves)."""
    torch.library.register_fake(f"fdistill::{fwd}")(_fwd_fake)
    torch.library.register_fake(f"fdistill::{fwd_grad}_")(_fwd_fake)
    torch.library.register_fake(f"fdistill::{fwd_grad}")(_fwd_grad_fake)
    bwd_op_for_grad = getattr(torch.ops.fdistill, bwd)

    def fwd_grad_setup_context(ctx, inputs, output):
        _fwd_grad_setup_context(ctx, inputs, output)
        ctx.bwd_op = bwd_op_for_grad

    torch.library.register_autograd(
        f"fdistill::{fwd_grad}", _fwd_grad_backward, setup_context=fwd_grad_setup_context
    )
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


def _partial_fake(student, teacher, labels, divergence, param, temperature, ignore_index):
    torch._check(student.dim() == 2, lambda: "student must be [rows, vocab]")
    return student.new_empty((student.shape[0], NUM_PARTIALS), dtype=torch.float64)


def _finish_fake(partials, second, labels, divergence, param, ignore_index, dtype):
    shape_ok = partials.dim() == 3 and partials.shape[2] == NUM_PARTIALS
    torch._check(shape_ok, lambda: "partials must be [parts, rows, NUM_PARTIALS]")
    rows, acc = partials.shape[1], accumulate_dtype(dtype)
    return partials.new_empty(rows, dtype=acc), partials.new_empty((rows, NUM_STATS), dtype=acc)


def _second_fake(student, teacher, labels, stats, divergence, param, temperature, ignore_index):
    return student.new_empty((student.shape[0], 2), dtype=torch.float64)


def register_vocab_parallel_ops(partial: str, finish: str, second: str) -> None:
    """Fake kernels of one backend's vocabulary-parallel ops (called inside an autograd.Function:
    they need no autograd of their own)."""
    torch.library.register_fake(f"fdistill::{partial}")(_partial_fake)
    torch.library.register_fake(f"fdistill::{finish}")(_finish_fake)
    torch.library.register_fake(f"fdistill::{second}")(_second_fake)


if _C is not None:
    assert _C.num_stats == NUM_STATS and _C.num_partials == NUM_PARTIALS, "fdistill._C is stale: rebuild it"
    assert all(_C.needs_second_pass(d) == (d in TWO_PASS_DIVERGENCES) for d in DIVERGENCES)
    register_divergence_ops("divergence_fwd", "divergence_bwd", "divergence_bwd_", "divergence_fwd_grad")
    register_vocab_parallel_ops("divergence_partial", "divergence_finish", "divergence_second")

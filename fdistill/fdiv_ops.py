"""Fake (meta) implementations and autograd for the f-divergence ops, written once for every backend.

The op contract (C++ ``fdistill::fdiv_fwd`` / ``fdiv_bwd``, see csrc/include/fdistill/fdiv_args.h, and
their Triton twins ``*_triton``): the forward solves for tau on each row of ``[rows, V]`` logits and,
by ``mode``, returns p* ``[rows, V]`` (0), the Fenchel–Young loss per row (1) or the f-softmax value
per row (2), plus ``[rows, 3]`` statistics ``[max theta, t, S0]`` (t the search variable: tau, tau + the
pole of (f*)' for reverse_kl and js, log(1 - (alpha - 1) tau) for the other alphas:
csrc/include/fdistill/fdiv_math.h, kFDivStats) from which the backward of modes 1 and 2 (``fdiv_bwd``:
``grad_rows / T (p* - y)``) recomputes p*. Mode 0's backward is the Jacobian product
``w (g - <w, g> / sum w)``, ``w = q (f*)''(theta - tau)``, from the output p*: the fused
``fdiv_softargmax_bwd`` (C++ on CPU tensors, ``*_triton`` on CUDA tensors); whenever the backward itself
is differentiated (``create_graph=True``: the second derivative), composed here of PyTorch ops.
``fdiv_shard`` evaluates a vocabulary shard at given statistics (the vocabulary-parallel search).
"""

from __future__ import annotations

import torch

from ._extension import _C
from .fdiv_reference import softargmax_vjp_reference
from .ops import accumulate_dtype

NUM_FDIV_STATS = 3  # must match kFDivStats in csrc/include/fdistill/fdiv_math.h
MODE_SOFTARGMAX, MODE_FY, MODE_SOFTMAX = 0, 1, 2

FDIV_FWD_SCHEMA = (
    "(Tensor logits, Tensor? reference, Tensor? target, Tensor? labels, str f, float alpha,"
    " float reference_value, float temperature, int ignore_index, int max_sweeps, float tol, int mode)"
    " -> (Tensor, Tensor)"
)
SOFTARGMAX_BWD_OP = "fdiv_softargmax_bwd"  # C++ (csrc/cpu/fdiv_kernels.h) and Triton (*_triton)
SOFTARGMAX_BWD_SCHEMA = (
    "(Tensor grad, Tensor p, Tensor? reference, str f, float alpha, float reference_value, float temperature)"
    " -> Tensor"
)
FDIV_BWD_SCHEMA = (
    "(Tensor grad_rows, Tensor logits, Tensor? reference, Tensor? target, Tensor? labels, Tensor stats,"
    " str f, float alpha, float reference_value, float temperature, int ignore_index, int mode) -> Tensor"
)
# A vocabulary shard at given stats [max theta of the whole row, t, S0] (the vocabulary-parallel solver's
# sweeps): mode 0 -> the shard's [S0, S1] at t, [rows, 2] float64; mode 1 -> p [rows, V_local] (accumulation
# dtype). Not differentiable (fdistill/vocab_parallel.py's autograd functions wrap it).
FDIV_SHARD_SCHEMA = (
    "(Tensor logits, Tensor? reference, Tensor stats, str f, float alpha, float reference_value,"
    " float temperature, int mode) -> Tensor"
)
SHARD_SUMS, SHARD_PROBS = 0, 1


def _fwd_fake(logits, reference, target, labels, f, alpha, reference_value, temperature, ignore_index,
              max_sweeps, tol, mode):  # fmt: skip
    torch._check(logits.dim() == 2, lambda: "logits must be [rows, vocab]")
    rows = logits.shape[0]
    acc = accumulate_dtype(logits.dtype)
    out = logits.new_empty(logits.shape) if mode == MODE_SOFTARGMAX else logits.new_empty(rows, dtype=acc)
    return out, logits.new_empty((rows, NUM_FDIV_STATS), dtype=acc)


def _bwd_fake(grad_rows, logits, *args):
    torch._check(grad_rows.shape == (logits.shape[0],), lambda: "grad_rows must be [rows]")
    return logits.new_empty(logits.shape)


def _shard_fake(logits, reference, stats, f, alpha, reference_value, temperature, mode):
    torch._check(logits.dim() == 2, lambda: "logits must be [rows, vocab]")
    if mode == SHARD_SUMS:
        return logits.new_empty((logits.shape[0], 2), dtype=torch.float64)
    return logits.new_empty(logits.shape, dtype=accumulate_dtype(logits.dtype))


def register_shard_op(name: str) -> None:
    """The fake kernel of one backend's fdiv_shard op."""
    torch.library.register_fake(f"fdistill::{name}")(_shard_fake)


def register_softargmax_bwd_op(name: str) -> None:
    """The fake kernel of one backend's fused f-softargmax backward (no second derivative: the composed
    product serves create_graph=True)."""
    torch.library.register_fake(f"fdistill::{name}")(_softargmax_bwd_fake)
    torch.library.register_autograd(
        f"fdistill::{name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


def _softargmax_bwd_fake(grad, p, reference, f, alpha, reference_value, temperature):
    torch._check(grad.shape == p.shape, lambda: "grad must have p's shape")
    return p.new_empty(p.shape)


def _setup_context(ctx, inputs, output):
    logits, reference, target, labels, f, alpha, reference_value, temperature, ignore_index, _, _, mode = (
        inputs
    )
    out, stats = output
    ctx.mode = mode
    if mode == MODE_SOFTARGMAX:  # the Jacobian product needs p* (the output) and q
        ctx.save_for_backward(out, reference)
        ctx.options = (f, alpha, reference_value, temperature)
    else:  # p* is recomputed from the logits and O(rows) statistics
        ctx.save_for_backward(logits, reference, target, labels, stats)
        ctx.options = (f, alpha, reference_value, temperature, ignore_index, mode)


def _fused_softargmax_bwd(device: torch.device):
    """The fused f-softargmax backward op for tensors on ``device``: C++ on the CPU, Triton on CUDA; None
    where there is none (a stale build, no Triton)."""
    if device.type == "cpu":
        return getattr(torch.ops.fdistill, SOFTARGMAX_BWD_OP, None)
    if device.type == "cuda":  # registered once fdistill.triton.fdiv is loaded (no import here: no cycle)
        return getattr(torch.ops.fdistill, SOFTARGMAX_BWD_OP + "_triton", None)
    return None


def softargmax_vjp(p, reference, f, alpha, reference_value, temperature, grad):
    """w (g - <w, g> / sum w) / T with w = q (f*)''(theta - tau), in the accumulation dtype: the fused op
    where it applies (not when the backward is itself differentiated), else PyTorch ops (differentiable:
    the second derivative)."""
    op = None if torch.is_grad_enabled() else _fused_softargmax_bwd(p.device)
    if op is not None:
        grad = grad.to(p.dtype)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return op(grad, p, reference, f, alpha, reference_value, temperature)
    acc = accumulate_dtype(p.dtype)
    p = p.to(acc)
    q = reference if reference is not None else torch.full((), reference_value, dtype=acc, device=p.device)
    vjp = softargmax_vjp_reference(f, alpha, p, q.expand_as(p), grad.to(acc))
    return (vjp / temperature).to(grad.dtype)


def _no_double_backward(ctx, grad):
    raise NotImplementedError(
        "fdistill's fused f-divergence kernels have no second derivative; use backend='reference'"
    )


def register_fdiv_ops(fwd: str, bwd: str) -> None:
    """Fake kernels and autograd for one backend's (forward, backward) f-divergence ops."""
    torch.library.register_fake(f"fdistill::{fwd}")(_fwd_fake)
    torch.library.register_fake(f"fdistill::{bwd}")(_bwd_fake)
    bwd_op = getattr(torch.ops.fdistill, bwd)

    def backward(ctx, grad_out, _grad_stats):
        grad_logits = None
        if ctx.needs_input_grad[0]:
            if ctx.mode == MODE_SOFTARGMAX:
                p, reference = ctx.saved_tensors
                grad_logits = softargmax_vjp(p, reference, *ctx.options, grad_out)
            else:
                logits, reference, target, labels, stats = ctx.saved_tensors
                grad_logits = bwd_op(grad_out, logits, reference, target, labels, stats, *ctx.options)
        return (grad_logits,) + (None,) * 11

    torch.library.register_autograd(f"fdistill::{fwd}", backward, setup_context=_setup_context)
    torch.library.register_autograd(
        f"fdistill::{bwd}", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


if _C is not None:
    assert _C.num_fdiv_stats == NUM_FDIV_STATS, "fdistill._C is stale: rebuild the extension"
    register_fdiv_ops("fdiv_fwd", "fdiv_bwd")
    if hasattr(torch.ops.fdistill, "fdiv_shard"):  # (False for a stale build)
        register_shard_op("fdiv_shard")
    register_softargmax_bwd_op(SOFTARGMAX_BWD_OP)

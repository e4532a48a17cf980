"""Losses on an LM head's logits, computed chunk by chunk from the hidden states (never all at once).

For each chunk of ``C`` tokens: ``z = softcap(h W^T + b)`` (``C x V``), the per-token loss and its
gradient ``dz`` (by the fused row kernels of the loss), then ``dh = dz W``, ``dW += dz^T h``,
``db += sum dz``; the chunk's logits are dropped before the next chunk. Peak memory beyond the inputs
and the parameter gradients is a few ``C x V`` buffers, whatever the number of tokens.

With ``reduction`` ``mean`` or ``sum`` the gradient is computed in the forward pass (the scale of each
token's loss is known then) when any input requires grad, and the first backward hands it over,
multiplied in place by the incoming scalar: one matmul pass, no recomputation. With
``reduction="none"`` the backward needs the per-token weights of the incoming gradient, so it
recomputes the logits chunk by chunk; so does a second backward through a retained graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .ops import accumulate_dtype


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out=None) -> torch.Tensor:
    """``h @ weight.T + bias`` in the accumulation dtype (float32 for bf16 / fp16 operands): the
    matmul's float32 accumulator is kept, never rounded to bf16 before the loss (that rounding costs
    1-7% of the input gradient). CUDA: ``torch.mm(..., out_dtype=torch.float32)`` on the half operands;
    elsewhere the operands are given in float32 by the caller (CPUs have no such mixed matmul)."""
    acc = accumulate_dtype(h.dtype)
    if h.dtype != acc and h.is_cuda:
        z = torch.mm(h, weight.T, out_dtype=acc)
        return z if bias is None else z.add_(bias.to(acc))
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for the device, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class LMHead:
    """``softcap(hidden @ weight.T + bias)`` for slices of rows: the matmul in ``dtype`` (bf16 / fp16 on
    CUDA, with a float32 result; upcast to float32 on other devices), the logits in float32 (float64
    for float64 operands)."""

    def __init__(self, hidden, weight, bias, softcap, dtype):
        self.hidden = hidden  # [N, H], any float dtype (cast per chunk)
        self.weight = weight.to(dtype)  # [V, H] (a no-op without autocast)
        self.bias = None if bias is None else bias.to(dtype)
        self.softcap = softcap
        self.dtype = dtype
        self.logits_dtype = accumulate_dtype(dtype)
        # the matmul's operands: half on CUDA (float32 accumulator kept), float32 elsewhere (once per call)
        self.mm_dtype = dtype if hidden.is_cuda else self.logits_dtype
        self.mm_weight = self.weight.to(self.mm_dtype)
        self.mm_bias = None if self.bias is None else self.bias.to(self.mm_dtype)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def chunk_hidden(self, rows: slice) -> torch.Tensor:
        return self.hidden[rows].to(self.mm_dtype)

    def logits(self, rows: slice, out: torch.Tensor | None = None):
        """(z, pre) for the rows: z the (soft-capped) logits, pre the logits before the cap (None
        without a cap; it is needed by the cap's derivative)."""
        h = self.chunk_hidden(rows)
        if out is not None:
            out = out[: h.shape[0]]
        z = head_logits(h, self.mm_weight, self.mm_bias, out)
        if self.softcap is None:
            return z, None
        return (z / self.softcap).tanh_().mul_(self.softcap), z  # one (chunk x V) temporary, not two

    def softcap_backward(self, dz: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
        """d/dpre of c tanh(pre / c) is 1 - tanh(pre / c)^2; ``pre`` is overwritten."""
        if pre is None:
            return dz
        return dz.mul_(pre.div_(self.softcap).tanh_().square_().neg_().add_(1))


@dataclass
class ChunkedLoss:
    """What to compute: ``rows_fn(z, rows)`` is the per-token loss of a chunk of logits ``z``
    (differentiable in ``z``), plus ``hard_weight`` x cross-entropy of ``z`` on ``labels``. A
    ``rows_fn`` with a ``loss_and_grad(z, rows)`` method (losses and their gradient in ``z``, written
    over ``z``; None to decline) is used for the gradient instead of autograd, when there is no hard
    loss."""

    head: LMHead
    rows_fn: Callable[[torch.Tensor, slice], torch.Tensor]
    chunk_size: int
    reduction: str
    labels: torch.Tensor | None = None
    ignore_index: int = -100
    hard_weight: float = 0.0

    @property
    def tokens(self) -> int:
        return self.head.hidden.shape[0]

    @property
    def loss_dtype(self) -> torch.dtype:
        return accumulate_dtype(self.head.dtype)

    def chunks(self):
        for start in range(0, self.tokens, self.chunk_size):
            yield slice(start, min(start + self.chunk_size, self.tokens))

    @property
    def token_count(self) -> torch.Tensor | int:
        """The denominator of ``mean``: tokens whose label is not ``ignore_index`` (at least 1), a
        device tensor (never read on the host: no sync, traceable by torch.compile)."""
        if self.labels is None:
            return max(self.tokens, 1)
        return (self.labels != self.ignore_index).sum().clamp_min(1)

    def token_losses(self, z: torch.Tensor, rows: slice) -> torch.Tensor:
        loss = self.rows_fn(z, rows)
        if self.hard_weight:
            ce = F.cross_entropy(z.to(loss.dtype), self.labels[rows], ignore_index=self.ignore_index,
                                 reduction="none")  # fmt: skip
            loss = loss + self.hard_weight * ce
        return loss

    def chunk(self, rows: slice, grad_rows: torch.Tensor | None, buffer: torch.Tensor | None):
        """(per-token losses, d(sum grad_rows * losses)/d(pre-cap logits) or None) for one chunk."""
        z, pre = self.head.logits(rows, buffer)
        if grad_rows is None:
            return self.token_losses(z, rows), None
        direct = getattr(self.rows_fn, "loss_and_grad", None)
        if direct is not None and not self.hard_weight:
            # the row layer gives (losses, dz) in one pass over z, dz written over z: no autograd
            out = direct(z, rows)
            if out is not None:
                loss, dz = out
                return loss, self.head.softcap_backward(dz.mul_(grad_rows.to(dz.dtype).unsqueeze(1)), pre)
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            loss = self.token_losses(z, rows)
            if not loss.requires_grad:  # a loss constant in z (e.g. skew_kl with skew = 1)
                return loss, z.detach().zero_()
            (dz,) = torch.autograd.grad(loss, z, grad_rows)  # the fused kernels may return z itself
        return loss.detach(), self.head.softcap_backward(dz, pre)


class _Gradients:
    """Accumulates ``dh``, ``dW``, ``db`` chunk by chunk from the logits' gradient ``dz``.

    ``dW`` is accumulated in the weight's dtype (under autocast, fp32 weights get fp32 products of the
    upcast chunk), ``db`` in float32 or float64.
    """

    def __init__(self, head: LMHead, hidden, weight, bias, needs):
        self.head = head
        self.dh = torch.zeros_like(hidden) if needs[0] else None
        self.dW = torch.zeros_like(weight) if needs[1] else None
        self.db = torch.zeros(bias.shape, dtype=accumulate_dtype(bias.dtype), device=bias.device) if (
            bias is not None and needs[2]) else None  # fmt: skip
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, rows: slice, dz: torch.Tensor) -> None:
        """dz: the float32 (float64) logits' gradient; the products in the head's matmul dtype."""
        head = self.head
        if self.dh is not None:
            self.dh[rows] = torch.mm(dz.to(head.mm_dtype), head.mm_weight)
        if self.dW is not None:
            h = head.chunk_hidden(rows)
            self.dW.addmm_(dz.T.to(self.dW.dtype), h.to(self.dW.dtype))
        if self.db is not None:
            self.db += dz.sum(0, dtype=self.db.dtype)

    def scaled(self, grad_out: torch.Tensor | None):
        """(dh, dW, db) times the incoming scalar gradient (in place: the buffers are ours)."""
        db = None if self.db is None else self.db.to(self.bias_dtype)
        grads = (self.dh, self.dW, db)
        if grad_out is not None:
            for g in grads:
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        return grads


def _run(loss: ChunkedLoss, row_weight, grads: _Gradients | None) -> torch.Tensor:
    """Per-token losses of every chunk; with ``grads``, accumulate the gradient of
    ``sum_t row_weight(rows)_t loss_t``."""
    out = torch.empty(loss.tokens, dtype=loss.loss_dtype, device=loss.head.hidden.device)
    buffer = None
    for rows in loss.chunks():
        grad_rows = None if grads is None else row_weight(rows)
        # The logits buffer is reused between chunks unless the kernels returned it as the gradient
        # (the gradient is consumed before the next chunk, so reuse is safe either way).
        token_losses, dz = loss.chunk(rows, grad_rows, buffer)
        out[rows] = token_losses
        if dz is not None:
            grads.add(rows, dz)
            if buffer is None and loss.head.softcap is None and dz.shape[0] == loss.chunk_size:
                buffer = dz
    return out


def _reduce(token_losses: torch.Tensor, loss: ChunkedLoss) -> torch.Tensor:
    if loss.reduction == "none":
        return token_losses
    total = token_losses.sum()
    return total if loss.reduction == "sum" else total / loss.token_count


class _ChunkedHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: ChunkedLoss, hidden, weight, bias):
        needs = ctx.needs_input_grad[1:4]
        ctx.loss, ctx.precomputed = loss, None
        ctx.save_for_backward(hidden, weight, bias)  # inputs: no copy; for a recompute
        with _no_autocast(hidden):  # the head's dtype was chosen by the caller
            if any(needs) and loss.reduction != "none":
                grads = _Gradients(loss.head, hidden, weight, bias, needs)
                token_losses = _run(loss, _constant_weights(loss, 1.0), grads)
                ctx.precomputed = grads
            else:
                token_losses = _run(loss, None, None)
        return _reduce(token_losses, loss)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grads, ctx.precomputed = ctx.precomputed, None  # handed over (and scaled in place) once
        if grads is not None:
            return (None, *grads.scaled(grad_out))
        # reduction="none" (per-token weights), or a second backward through a retained graph
        hidden, weight, bias = ctx.saved_tensors
        grads = _Gradients(ctx.loss.head, hidden, weight, bias, ctx.needs_input_grad[1:4])
        g = grad_out.to(ctx.loss.loss_dtype)
        row_weight = (
            (lambda rows: g[rows]) if ctx.loss.reduction == "none" else _constant_weights(ctx.loss, g)
        )
        with _no_autocast(hidden):
            _run(ctx.loss, row_weight, grads)
        return (None, *grads.scaled(None))


def _constant_weights(loss: ChunkedLoss, grad_out):
    """Every token's weight in the reduced loss (1/count for mean, 1 for sum) times ``grad_out``."""
    weights = torch.ones(loss.chunk_size, dtype=loss.loss_dtype, device=loss.head.hidden.device) * grad_out
    if loss.reduction != "sum":
        weights = weights / loss.token_count
    return lambda rows: weights[: rows.stop - rows.start]


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def chunked_head_loss(loss: ChunkedLoss, hidden, weight, bias) -> torch.Tensor:
    """The loss (reduced as ``loss.reduction``), differentiable in ``hidden``, ``weight``, ``bias``
    (the tensors ``loss.head`` was built from, before any autocast cast)."""
    if torch.compiler.is_compiling():
        return _traced_chunked_head_loss(loss, hidden, weight, bias)
    return _ChunkedHeadFunction.apply(loss, hidden, weight, bias)


def _traced_chunked_head_loss(loss: ChunkedLoss, hidden, weight, bias) -> torch.Tensor:
    """The loss as plain differentiable ops, one activation-checkpointed region per chunk: the form
    torch.compile traces into one graph.

    :class:`_ChunkedHeadFunction` cannot be traced: its forward differentiates each chunk with
    ``torch.autograd.grad`` (which dynamo does not trace), hands Python objects (the precomputed
    gradients) from forward to backward, reads the ``mean`` denominator with a device sync, and
    reuses buffers in place. Here autograd (AOTAutograd under compile) differentiates the chunks and
    the checkpoint makes the backward recompute each chunk's logits rather than keep them, so the
    saved activations stay the chunks' inputs (``chunk x H``), not ``tokens x V`` logits.

    The gradients flow to the tensors passed here (as the autograd function's), which may differ
    from ``loss.head``'s as autograd nodes (e.g. behind an identity whose backward all-reduces).
    """
    dtype = loss.head.mm_dtype
    with _no_autocast(hidden):  # the head's dtype was chosen by the caller
        weight = weight.to(loss.head.dtype).to(dtype)
        bias = None if bias is None else bias.to(loss.head.dtype).to(dtype)
        parts = []
        for rows in loss.chunks():
            region = functools.partial(_traced_chunk, loss, rows)
            parts.append(checkpoint(region, hidden[rows], weight, bias, use_reentrant=False))
    if not parts:  # no tokens
        token_losses = hidden.new_zeros(0, dtype=loss.loss_dtype)
    else:
        token_losses = torch.cat(parts) if len(parts) > 1 else parts[0]
    if loss.reduction == "none":
        return token_losses
    total = token_losses.sum()
    return total if loss.reduction == "sum" else total / loss.token_count


def _traced_chunk(loss: ChunkedLoss, rows: slice, hidden, weight, bias) -> torch.Tensor:
    """Per-token losses of one chunk, differentiable in the chunk's hidden states and the head."""
    head = loss.head
    z = head_logits(hidden.to(head.dtype).to(head.mm_dtype), weight, bias)
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap  # out of place: autograd needs the tanh
    return loss.token_losses(z, rows)


def default_chunk_size(vocab: int, hidden_size: int, device: torch.device) -> int:
    """Tokens per chunk: a power of two with ``chunk x V`` about 2^24 logits (64 MiB in float32) on
    the CPU and 2^26 on a GPU, at least H / 8 (the ``chunk x H`` by ``H x V`` matmul needs enough rows
    to keep the cores busy) and within [16, 8192]."""
    budget = 1 << (26 if device.type == "cuda" else 24)
    chunk = max(budget // max(vocab, 1), hidden_size // 8, 16)
    return int(min(1 << (chunk.bit_length() - 1), 8192))

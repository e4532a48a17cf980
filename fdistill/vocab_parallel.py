"""Vocabulary-parallel losses: logits (or LM-head weights) sharded over the vocabulary across a
process group. Each rank reduces its shard to per-row statistics, the statistics are all-reduced, and
each rank computes the gradient of its own shard; nothing of size ``tokens x V`` is ever gathered.

Layout. Rank ``r`` of the group (in the group's rank order) holds the contiguous vocabulary entries
``[o_r, o_r + V_r)`` of every token, ``o_r = V_0 + ... + V_(r-1)``; the ``V_r`` may differ (uneven
shards) and ``V = sum V_r``. Vocabulary parallelism does not shard tokens: every rank holds every
token (the same leading dimensions), the same labels and the same options, and every rank makes the
same calls, forward and backward, in the same order (the collectives pair up across ranks).

Every call starts with one small all-gather of integers (the agreement, :func:`_agree`): each
rank's shard sizes, token count, dtype, a checksum of its options and of its labels, and whether its
own argument checks failed. Every decision is then taken from that identical table, so a bad call
(shards of the student and teacher that differ, shard sizes that do not add up to ``vocab_size``,
different token counts or options on different ranks, a rank whose arguments are wrong) raises the
same error on every rank instead of leaving some of them waiting in a collective.

Collectives after the agreement (``rows`` = tokens; every message is ``O(rows)`` numbers):

==================== ======================================================= ======================
call                 forward                                                 backward
==================== ======================================================= ======================
divergence_loss      fused backends: 1 all-gather of each rank's row         none
                     partials (``NUM_PARTIALS`` float64 numbers per row),
                     then 1 all-reduce of the second-pass sums (``jsd``,
                     ``skew_kl``, ``skew_reverse_kl``, ``tv`` only);
                     reference: 1 all-gather (max and sum-exp of s and t;
                     ``alpha``: also of ``alpha t + (1 - alpha) s``), 1
                     all-reduce of the partial sums (none for ``alpha``)
fy_loss              1 all-gather (max, bracket; ``kl``: sum-exp), 1         none
                     all-reduce per Newton sweep (none for ``kl``), 1
                     all-reduce of the loss's partial sums
f_softargmax         as ``fy_loss``, without the loss's all-reduce           1 all-reduce
f_softmax            as ``fy_loss``                                          none
fused-linear losses  the rows above, per chunk of tokens (and the            1 all-reduce of dh
                     cross-entropy's, as ``fy_loss`` with ``kl``, when       (``tokens x H``)
                     ``hard_loss_weight > 0``)
==================== ======================================================= ======================

The fused-linear losses agree once per call, not per chunk; with ``reduction="none"`` their
backward recomputes the chunks, and with them the chunks' forward collectives. The partial sums are
accumulated and all-reduced in float64 (the kernels' partials too; the reference path's first
all-gather is in the compute dtype).

The divergences run on the fused kernels (``backend`` None: the C++ kernels for CPU tensors, Triton for
CUDA tensors; or ``"cpu"`` / ``"triton"``) as partial -> merge -> finish (``_KernelRows``; the ops and
their statistics: ``fdistill/ops.py`` and docs/divergences.md, "Partials"): each rank's partial op reduces
its shard to mergeable per-row statistics (max and sum-exp of s and t relative to the shard's own
references, the divergence's weighted sums, the alpha mixture's log-sum-exp), the all-gather brings every
rank's, and the finish op (the same C++ / Triton code as the unsharded forward) re-bases and merges them
in float64 into the loss and the row statistics the unsharded forward would write; the two-pass
divergences then all-reduce their second pass over the shards and finish again. The backward is the
unsharded backward kernel on the rank's shard with those statistics: local. ``backend="reference"`` (and
``grad_teacher=True``, which the fused kernels do not differentiate) is pure PyTorch (``_ReferenceRows``):
the per-entry terms of :func:`fdistill.reference.divergence_terms` on log-probabilities normalised by the
all-gathered log-sum-exps, with the backward's row sums (``sum_k dD/dls_k``, the softmax's chain rule)
computed in the forward, in the same all-reduce as the value, so that its backward is local too.

For the fused-linear losses, each rank's ``dh = dz_shard @ W_shard`` is a partial sum over its
vocabulary shard: it is all-reduced (SUM) over the group in the backward; the weight and bias gradients
of a shard stay on their rank. Their divergence rows run as ``divergence_loss``'s (fused kernels where the
device has them).

The f-divergence operators run the unsharded kernels' search (:mod:`fdistill.fdiv_search`: the same
search variable t, bracket, Newton steps and stopping rules as csrc/include/fdistill/fdiv_math.h) with
every sweep split over the shards: each rank's ``fdiv_shard`` kernel (C++ for CPU tensors, Triton for
CUDA tensors; ``backend="reference"``: PyTorch, ``fdiv_search.sweep_terms``) sums S0 and S1 over its
entries at the current t, the sums are all-reduced, and every rank takes the same step; p* is then
``fdiv_shard``'s probabilities at the statistics ``[max theta, t, S0]``, and the FY loss's terms
(generators of :mod:`fdistill.fdiv_reference`) are summed over the shards in PyTorch. Everything is
computed in float32 (float64 for float64 inputs); any ``torch.distributed`` backend whose collectives
accept that device works (gloo for CPU tensors, NCCL for CUDA tensors). Eager mode only (no
``torch.compile``).
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import fdiv_reference as fref
from . import fdiv_search as fsearch
from ._triton_dispatch import triton_forward_op
from .fdiv_ops import SHARD_PROBS, SHARD_SUMS
from .ops import TWO_PASS_DIVERGENCES, accumulate_dtype
from .reference import (
    DIVERGENCES,
    alpha_form,
    alpha_loss_from_log,
    alpha_mixture_logits,
    divergence_terms,
    resolve_divergence,
)
from .rows import as_rows, pick_backend, reduce_rows
from .validation import (
    FLOAT_DTYPES,
    REDUCTIONS,
    check_choice,
    check_float,
    check_head,
    check_labels,
    check_logits_tensor,
    check_real,
    check_temperature,
    check_token_ids,
    divergence_param,
)

_NEG_INF = -math.inf

# ----------------------------------------------------------------------------- layout and agreement


@dataclass(frozen=True)
class ShardLayout:
    """The agreed layout: every rank's shard size, in the group's rank order, and this rank."""

    group: object
    rank: int
    sizes: tuple[int, ...]

    @property
    def vocab(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]


@dataclass
class _Local:
    """What one rank reports about its arguments (after its own checks passed)."""

    vocab: int
    rows: int
    dtype: torch.dtype
    teacher_vocab: int = -1
    teacher_rows: int = -1
    grads: int = 0  # bit mask of the inputs that will run a backward collective
    labels: torch.Tensor | None = None  # flat int64
    ignore_index: int = -100


_SLOTS = 12  # error, vocab, teacher vocab, rows, teacher rows, dtype, grads, options, labels x 4


def _group_rank(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_group needs an initialised torch.distributed (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"vocab_parallel_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    return rank, dist.get_world_size(group)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``(world, *x.shape)``: every rank's ``x``, in the group's rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over the ranks of a tensor this module owns (reduced in place)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _labels_summary(labels: torch.Tensor, ignore_index: int) -> list[int]:
    """(live count, min and max of the live labels, a position-weighted checksum of all of them)."""
    live = labels[labels != ignore_index]
    weights = torch.arange(labels.numel(), device=labels.device) % 1009 + 1
    checksum = int(((labels + 1) * weights).sum()) if labels.numel() else 0
    if live.numel() == 0:
        return [0, 0, 0, checksum]
    return [live.numel(), int(live.min()), int(live.max()), checksum]


def _agree(group, what: str, device, check: Callable[[], _Local], options, vocab_size=None,
           label_range: bool = False) -> ShardLayout:  # fmt: skip
    """Run this rank's argument checks, exchange what every rank found in one all-gather, and raise
    the same error on every rank if anything is wrong anywhere; else the agreed layout.

    ``options`` (any value with a deterministic ``repr``) must be equal on every rank. With
    ``label_range`` the live labels must be in ``[0, V)`` of the whole vocabulary.
    """
    rank, world = _group_rank(group)
    error, local = None, None
    try:
        local = check()
    except Exception as exc:  # re-raised after the all-gather: the other ranks must not wait for us
        error = exc
    row = [int(error is not None)] + [-1] * (_SLOTS - 1)
    row[7] = zlib.crc32(repr(options).encode())
    if local is not None:
        row[1:7] = [local.vocab, local.teacher_vocab, local.rows, local.teacher_rows,
                    FLOAT_DTYPES.index(local.dtype), local.grads]  # fmt: skip
        if local.labels is not None:
            row[8:12] = _labels_summary(local.labels, local.ignore_index)
    table = _all_gather(torch.tensor(row, dtype=torch.int64, device=device), group).cpu().tolist()
    column = [list(c) for c in zip(*table, strict=True)]

    failed = [r for r in range(world) if column[0][r]]
    if failed:
        if error is not None:
            raise error
        raise ValueError(
            f"{what}: the arguments of rank(s) {failed} of vocab_parallel_group were rejected (see the "
            "error raised there); every rank stops"
        )
    if len(set(column[7])) > 1:
        raise ValueError(
            f"{what}: the ranks of vocab_parallel_group were called with different options; every rank "
            "must pass the same options (divergence, parameters, temperature, reduction, ...)"
        )
    if len(set(column[5])) > 1:
        names = [str(FLOAT_DTYPES[c]).removeprefix("torch.") for c in column[5]]
        raise TypeError(f"{what}: the ranks hold tensors of different dtypes (by rank: {names})")
    if len(set(column[3])) > 1:
        raise ValueError(
            f"{what}: the ranks hold different numbers of tokens (by rank: {column[3]}); vocabulary "
            "parallelism shards the vocabulary only, every rank holds every token"
        )
    bad = [r for r in range(world) if column[4][r] != -1 and column[4][r] != column[3][r]]
    if bad:
        raise ValueError(
            f"{what}: the teacher and the student hold different numbers of tokens on rank(s) {bad} "
            f"(teacher {[column[4][r] for r in bad]}, student {[column[3][r] for r in bad]})"
        )
    sizes = tuple(column[1])
    bad = [r for r in range(world) if column[2][r] != -1 and column[2][r] != sizes[r]]
    if bad:
        layout = ", ".join(f"rank {r}: student {sizes[r]}, teacher {column[2][r]}" for r in range(world))
        raise ValueError(
            f"{what}: the teacher's vocabulary shards do not match the student's ({layout}); both must be "
            "sharded the same way over the ranks"
        )
    if any(len(set(column[c])) > 1 for c in range(8, 12)):
        raise ValueError(f"{what}: the labels differ between the ranks; every rank must pass the same labels")
    if len(set(column[6])) > 1:
        raise ValueError(
            f"{what}: requires_grad differs between the ranks (by rank: {column[6]}); the backward runs a "
            "collective, so every rank must differentiate the same inputs"
        )
    total = sum(sizes)
    if vocab_size is not None and total != vocab_size:
        raise ValueError(
            f"{what}: the vocabulary shard sizes {list(sizes)} add up to {total} but vocab_size is "
            f"{vocab_size}"
        )
    if label_range and column[8][0] > 0 and (column[9][0] < 0 or column[10][0] >= total):
        ignore = local.ignore_index
        raise ValueError(
            f"{what}: labels must be in [0, {total}) (the whole vocabulary) or ignore_index ({ignore})"
        )
    return ShardLayout(group, rank, sizes)


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _check_backend(backend) -> None:
    """The f-divergence and fused-linear losses take no backend choice on shards (their divergence rows
    run on the fused kernels where the device has them, see :func:`divergence_rows`)."""
    if backend not in (None, "reference"):
        raise ValueError(
            f"backend={backend!r} cannot be combined with vocab_parallel_group for the f-divergence and "
            "fused-linear losses (pass backend=None or 'reference')"
        )


def _check_vocab_size(vocab_size) -> None:
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1
    ):
        raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")


def _grad_bit(*tensors) -> int:
    """Which of ``tensors`` will be differentiated (each backward collective must run everywhere)."""
    on = torch.is_grad_enabled()
    return sum(
        1 << i for i, x in enumerate(tensors) if isinstance(x, torch.Tensor) and x.requires_grad and on
    )


# ----------------------------------------------------------------------------- row statistics


def _local_lse(x: torch.Tensor, weight=None) -> torch.Tensor:
    """``[rows, 2]``: the shard's max and ``sum w exp(x - max)`` (0 for an all ``-inf`` shard)."""
    top = x.amax(-1)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(x - shift.unsqueeze(-1))
    return torch.stack([top, (e if weight is None else weight * e).sum(-1)], -1)


def _global_lse(stats: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp over the whole vocabulary from every rank's ``(max, sum-exp)`` (``[world, rows,
    2]``), as ``[rows, 2]`` pairs ``(shift, log-sum)`` with LSE = shift + log-sum: the shift is the
    row's max (an entry, so ``x - shift`` is exact; 0 when the max is not finite) and the log-sum is
    ``-inf`` for a row that is ``-inf`` everywhere, ``+inf`` / NaN when the max is."""
    tops, sums = stats[..., 0], stats[..., 1]
    top = tops.amax(0)
    finite = torch.isfinite(top)
    shift = torch.where(finite, top, torch.zeros_like(top))
    log_sum = torch.log((sums * torch.exp(tops - shift)).sum(0))
    return torch.stack([shift, torch.where(finite, log_sum, top)], -1)


def _log_normalise(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``x - LSE`` as ``(x - shift) - log-sum`` (never forming the LSE: at logits ~1e4 its rounding
    would be larger than the log-probabilities' precision)."""
    return (x - lse[:, 0:1]) - lse[:, 1:2]


_SUMS = torch.float64  # the partial sums over a shard that are all-reduced, whatever the compute dtype


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the shard's entries, accumulated (and all-reduced) in float64."""
    return x.sum(-1, dtype=_SUMS)


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Rows holding a NaN or ``+inf`` (their loss and gradient are NaN)."""
    return (torch.isnan(x) | torch.isposinf(x)).any(-1)


def _to_compute(x: torch.Tensor, acc: torch.dtype, temperature: float, keep) -> torch.Tensor:
    """``x / T`` in the compute dtype; rows that are not kept (ignored labels) are zeros, so that
    whatever they hold cannot leak a NaN."""
    x = x.to(acc)
    if temperature != 1.0:
        x = x / temperature
    if keep is not None:
        x = torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=acc, device=x.device))
    return x


def _flag_rows(x: torch.Tensor, zero: torch.Tensor, nan: torch.Tensor) -> torch.Tensor:
    """Rows (of a ``[rows]`` or ``[rows, V]`` tensor) set to 0 where ``zero``, to NaN where ``nan``."""
    if x.dim() == 2:
        zero, nan = zero.unsqueeze(-1), nan.unsqueeze(-1)
    x = torch.where(zero, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return torch.where(nan, torch.full((), math.nan, dtype=x.dtype, device=x.device), x)


# ----------------------------------------------------------------------------- divergences


@dataclass(frozen=True)
class _DivSpec:
    divergence: str
    param: float
    temperature: float
    ignore_index: int
    layout: ShardLayout
    backend: str  # "cpu", "triton" or "reference"

    @property
    def options(self) -> tuple:
        """The ops' (divergence, param, temperature, ignore_index) arguments."""
        return self.divergence, self.param, self.temperature, self.ignore_index


def _kernel_ops(backend: str):
    """(partial, finish, second, backward) ops of a fused backend (ops.py states their contract)."""
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":
        triton_forward_op()  # registers the Triton ops
    ns = torch.ops.fdistill
    return tuple(getattr(ns, f"divergence_{name}{suffix}") for name in ("partial", "finish", "second", "bwd"))


class _KernelRows(torch.autograd.Function):
    """Per-row divergence of ``[rows, V_local]`` shards on the fused kernels: partial -> merge -> finish.

    The partial op reduces each row of the shard to ``NUM_PARTIALS`` float64 numbers, one all-gather
    brings every rank's, and the finish op merges them into the loss and the row statistics the
    unsharded forward would write (the same C++ / Triton code); the two-pass divergences then sum
    their second pass over the shards (one all-reduce) and finish again. The backward is the
    unsharded backward kernel on the shard with those statistics: local, no collective.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, spec: _DivSpec):
        partial, finish, second, _ = _kernel_ops(spec.backend)
        group = spec.layout.group
        merge = (labels, spec.divergence, spec.param, spec.ignore_index, student.dtype)
        parts = _all_gather(partial(student, teacher, labels, *spec.options), group)
        loss, stats = finish(parts, None, *merge)
        if resolve_divergence(spec.divergence, spec.param) in TWO_PASS_DIVERGENCES:
            sums = _all_reduce(second(student, teacher, labels, stats, *spec.options), group)
            loss, stats = finish(parts, sums, *merge)
        ctx.spec = spec
        ctx.save_for_backward(student, teacher, labels, stats)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        student, teacher, labels, stats = ctx.saved_tensors
        bwd = _kernel_ops(ctx.spec.backend)[3]
        return bwd(grad_rows, student, teacher, labels, stats, *ctx.spec.options), None, None, None


def _terms_and_grads(ls, lt, kind, param, need_s: bool, need_t: bool):
    """The divergence's per-entry terms and their derivatives in ``ls`` and ``lt`` (entry by entry:
    each term depends on its own entry only), zeros where not needed."""
    if not (need_s or need_t):
        return divergence_terms(ls, lt, kind, param), None, None
    with torch.enable_grad():
        ls, lt = ls.detach().requires_grad_(need_s), lt.detach().requires_grad_(need_t)
        terms = divergence_terms(ls, lt, kind, param)
        wrt = [x for x in (ls, lt) if x.requires_grad]
        grads = [None] * len(wrt)
        if terms.requires_grad:  # (skew_kl with skew = 1 does not depend on the student)
            grads = list(torch.autograd.grad(terms.sum(), wrt, allow_unused=True))
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads, strict=True)]
    return terms.detach(), grads[0] if need_s else None, grads[-1] if need_t else None


def _alpha_log_form(spec) -> bool:
    """alpha in its Log form (from log-sum-exps); in the others it is a sum of entries, as the rest."""
    return resolve_divergence(spec.divergence, spec.param) == "alpha" and alpha_form(spec.param) == "log"


class _ReferenceRows(torch.autograd.Function):
    """The reference backend (pure PyTorch, differentiable in both logits): the terms of
    :func:`fdistill.reference.divergence_terms` on log-probabilities normalised by all-gathered
    log-sum-exps, summed with one all-reduce together with the backward's row sums
    ``sum_k dD/dls_k``, ``sum_k dD/dlt_k`` (so that the backward is local)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, spec: _DivSpec):
        acc = accumulate_dtype(student.dtype)
        kind = resolve_divergence(spec.divergence, spec.param)
        keep = None if labels is None else labels != spec.ignore_index
        group, alpha = spec.layout.group, _alpha_log_form(spec)
        s = _to_compute(student, acc, spec.temperature, keep)
        t = _to_compute(teacher, acc, spec.temperature, keep)
        cols = [_local_lse(s), _local_lse(t), (_nonfinite(s) | _nonfinite(t)).to(acc).unsqueeze(-1)]
        if alpha:
            cols.append(_local_lse(alpha_mixture_logits(s, t, spec.param)))
        stats = _all_gather(torch.cat(cols, -1), group)  # [world, rows, 5 or 7]
        lse_s, lse_t = _global_lse(stats[..., 0:2]), _global_lse(stats[..., 2:4])
        empty_s, empty_t = torch.isneginf(lse_s[:, 1]), torch.isneginf(lse_t[:, 1])
        zero = empty_s & empty_t  # padding: loss 0, gradient 0
        nan = (stats[..., 4].sum(0) > 0) | (empty_s ^ empty_t)
        if keep is not None:
            zero, nan = zero | ~keep, nan & keep
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if alpha:  # (1 - A) / (alpha (1 - alpha)), log A from three log-sum-exps
            lse_z = _global_lse(stats[..., 5:7])
            a = spec.param
            log_a = (lse_z - a * lse_t - (1 - a) * lse_s).sum(-1)  # shifts and log-sums apart
            rows = alpha_loss_from_log(log_a, a)
            extra = torch.cat([lse_z, log_a.unsqueeze(-1)], -1)
        else:  # the value and sum_k dD/dls_k, sum_k dD/dlt_k (the backward's row sums) in one all-reduce
            ls, lt = _log_normalise(s, lse_s), _log_normalise(t, lse_t)
            terms, d_ls, d_lt = _terms_and_grads(ls, lt, kind, spec.param, need_s, need_t)
            zeros = torch.zeros_like(lse_s[:, 0], dtype=_SUMS)
            parts = [_row_sum(terms)] + [zeros if d is None else _row_sum(d) for d in (d_ls, d_lt)]
            sums = _all_reduce(torch.stack(parts, -1), group).to(acc)
            rows, extra = sums[:, 0], sums[:, 1:]
        ctx.spec, ctx.kind = spec, kind
        ctx.save_for_backward(student, teacher, keep, lse_s, lse_t, extra, zero, nan)
        return _flag_rows(rows, zero, nan)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        student, teacher, keep, lse_s, lse_t, extra, zero, nan = ctx.saved_tensors
        spec = ctx.spec
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = accumulate_dtype(student.dtype)
        s = _to_compute(student, acc, spec.temperature, keep)
        t = _to_compute(teacher, acc, spec.temperature, keep)
        g = (grad_rows.to(acc) / spec.temperature).unsqueeze(-1)
        ls, lt = _log_normalise(s, lse_s), _log_normalise(t, lse_t)
        q, p = ls.exp(), lt.exp()
        if _alpha_log_form(spec):  # dL/ds = A/alpha (q - r), dL/dt = A/(1 - alpha) (p - r), r = softmax(z)
            r = torch.exp(_log_normalise(alpha_mixture_logits(s, t, spec.param), extra[:, 0:2]))
            big_a = extra[:, 2:3].exp() * g
            ds = big_a / spec.param * (q - r) if need_s else None
            dt = big_a / (1 - spec.param) * (p - r) if need_t else None
        else:  # chain rule through the log-softmax: dL/ds_j = d_j - q_j sum_k d_k
            _, d_ls, d_lt = _terms_and_grads(ls, lt, ctx.kind, spec.param, need_s, need_t)
            ds = (d_ls - q * extra[:, 0:1]) * g if need_s else None
            dt = (d_lt - p * extra[:, 1:2]) * g if need_t else None
        ds = None if ds is None else _flag_rows(ds, zero, nan).to(student.dtype)
        dt = None if dt is None else _flag_rows(dt, zero, nan).to(teacher.dtype)
        return ds, dt, None, None


def divergence_rows(student, teacher, layout: ShardLayout, divergence="forward_kl", param=0.5,
                    temperature=1.0, labels=None, ignore_index=-100,
                    backend="reference") -> torch.Tensor:  # fmt: skip
    """Per-row divergence of ``[rows, V_local]`` shards (already agreed on: no checks); rows whose
    ``labels`` (``[rows]`` int64 or None) equal ``ignore_index`` are 0. ``backend``: ``"cpu"`` or
    ``"triton"`` (the fused kernels, differentiable in the student) or ``"reference"`` (pure PyTorch,
    differentiable in both)."""
    spec = _DivSpec(divergence, float(param), float(temperature), int(ignore_index), layout, backend)
    if labels is not None:
        labels = labels.long().contiguous()
    if backend != "reference":  # the kernels read rows with unit stride
        student, teacher = (x if x.stride(-1) == 1 else x.contiguous() for x in (student, teacher))
    rows_fn = _ReferenceRows if backend == "reference" else _KernelRows
    return rows_fn.apply(student, teacher, labels, spec)


def divergence_loss(student_logits, teacher_logits, divergence, *, beta, skew, alpha, temperature, labels,
                    ignore_index, reduction, scale_by_temperature_squared, grad_teacher, grad_in_place,
                    backend, group, vocab_size):  # fmt: skip
    """:func:`fdistill.divergence_loss` on vocabulary shards (its ``vocab_parallel_group`` path)."""
    what = "divergence_loss"
    found = {}

    def check() -> _Local:
        check_logits_tensor("student_logits", student_logits, "V_local")
        check_logits_tensor("teacher_logits", teacher_logits, "V_local")
        if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} must have the same token dimensions"
            )
        if student_logits.dtype != teacher_logits.dtype:
            raise TypeError(f"student_logits ({student_logits.dtype}) and teacher_logits "
                            f"({teacher_logits.dtype}) must have the same dtype")  # fmt: skip
        if student_logits.device != teacher_logits.device:
            raise ValueError("student_logits and teacher_logits are on different devices")
        check_choice("divergence", divergence, DIVERGENCES)
        check_choice("reduction", reduction, REDUCTIONS)
        found["param"] = divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
        check_temperature(temperature)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if teacher_logits.requires_grad and not grad_teacher:
            raise ValueError(
                "teacher_logits requires grad, but fdistill does not backpropagate into the teacher by "
                "default: pass teacher_logits.detach(), or grad_teacher=True to differentiate through it"
            )
        if grad_in_place:
            raise ValueError("grad_in_place=True cannot be combined with vocab_parallel_group")
        found["backend"] = pick_backend(backend, student_logits, grad_teacher)
        _check_vocab_size(vocab_size)
        if labels is not None:
            found["labels"] = check_labels(labels, student_logits).reshape(-1).long()
        vocab = student_logits.shape[-1]
        rows = student_logits.numel() // vocab
        return _Local(vocab, rows, student_logits.dtype, teacher_logits.shape[-1],
                      teacher_logits.numel() // teacher_logits.shape[-1], 0, found.get("labels"),
                      int(ignore_index))  # fmt: skip

    options = (what, divergence, beta, skew, alpha, temperature, ignore_index, reduction,
               scale_by_temperature_squared, grad_teacher, labels is None, vocab_size, backend)  # fmt: skip
    layout = _agree(group, what, _device_of(student_logits), check, options, vocab_size)
    lead = student_logits.shape[:-1]
    student = as_rows(student_logits, layout.local)
    teacher = as_rows(teacher_logits, layout.local)
    flat_labels = found.get("labels")
    rows = divergence_rows(student, teacher, layout, divergence, found["param"], temperature, flat_labels,
                           ignore_index, found["backend"])  # fmt: skip
    if scale_by_temperature_squared:
        rows = rows * (temperature * temperature)
    return reduce_rows(rows, reduction, lead, flat_labels, ignore_index)


# ----------------------------------------------------------------------------- f-divergences


@dataclass(frozen=True)
class _FSpec:
    family: str
    alpha: float
    temperature: float
    ignore_index: int
    max_sweeps: int
    tol: float
    layout: ShardLayout
    shard_op: str | None = None  # the fdiv_shard op of the kernels (None: PyTorch, fdiv_search.sweep_terms)


@dataclass
class _Solution:
    """p* of shard rows: ``p = q (f*)'(x - tau) / norm`` on the live entries, x = theta - shift, at the
    search variable ``t`` (:mod:`fdistill.fdiv_search`; the kernels' statistics ``[shift, t, norm]``)."""

    p: torch.Tensor  # [rows, V_local], 0 on masked entries and empty rows
    shift: torch.Tensor  # [rows] the row's max over the whole vocabulary (0 when not finite)
    t: torch.Tensor
    norm: torch.Tensor
    empty: torch.Tensor  # [rows] bool: all -inf everywhere
    bad: torch.Tensor  # [rows] bool: a NaN or +inf somewhere
    extra: torch.Tensor | None  # the all-gathered extra column, summed over the ranks


def _shard_stats(shift, t, norm, acc) -> torch.Tensor:
    """The kernels' ``[rows, 3]`` statistics ``[max theta, t, S0]`` of a point (fdiv_shard's input)."""
    return torch.stack([shift.to(acc), t.to(acc), norm.to(acc)], -1).contiguous()


def _shard_call(theta, q, stats, spec: _FSpec, mode: int) -> torch.Tensor:
    """fdiv_shard on the shard rows (theta already divided by T), q a 0-dim value or [rows, V_local]."""
    op = getattr(torch.ops.fdistill, spec.shard_op)  # (spec.family is canonical: kl, reverse_kl, alpha, js)
    if q.dim() == 0:
        return op(theta, None, stats, spec.family, spec.alpha, float(q), 1.0, mode)
    ref = q.expand_as(theta)
    ref = ref if ref.stride(-1) == 1 else ref.contiguous()
    return op(theta, ref, stats, spec.family, spec.alpha, 1.0, 1.0, mode)


def _probs(theta, q, live, shift, t, norm, spec: _FSpec) -> torch.Tensor:
    """p = q (f*)'(x - tau) / norm at the search variable t (0 on masked entries)."""
    if spec.shard_op is not None:
        return _shard_call(theta, q, _shard_stats(shift, t, norm, theta.dtype), spec, SHARD_PROBS)
    d1, _ = fsearch.sweep_terms(theta - shift.unsqueeze(-1), t, spec.family, spec.alpha)
    p = (
        q.expand_as(theta)
        * d1
        / torch.where(norm > 0, norm, torch.ones_like(norm)).to(theta.dtype).unsqueeze(-1)
    )
    return torch.where(live, p, torch.zeros((), dtype=p.dtype, device=p.device))


def _sweep_sums(theta, q, live, shift, t, spec: _FSpec) -> torch.Tensor:
    """This shard's [S0, S1] at t ([rows, 2], float64): one sweep of the search."""
    if spec.shard_op is not None:
        ones = torch.ones_like(shift)
        return _shard_call(theta, q, _shard_stats(shift, t, ones, theta.dtype), spec, SHARD_SUMS)
    d1, d2 = fsearch.sweep_terms(theta - shift.unsqueeze(-1), t, spec.family, spec.alpha)
    qx = q.expand_as(theta)
    zero = torch.zeros((), dtype=theta.dtype, device=theta.device)
    return torch.stack(
        [_row_sum(torch.where(live, qx * d1, zero)), _row_sum(torch.where(live, qx * d2, zero))], -1
    )


def _solve(theta: torch.Tensor, q: torch.Tensor, spec: _FSpec, extra=None) -> _Solution:
    """f-softargmax of ``[rows, V_local]`` shards (theta already divided by T).

    One all-gather: every rank's max, q at its argmax, live reference mass, NaN/+inf flag (and for
    ``kl`` its ``sum q exp(theta - max)``, which gives tau exactly; and ``extra``, a per-row number
    summed over the ranks). Then, except for ``kl``, the search of :mod:`fdistill.fdiv_search` (the C++
    kernels' iteration and variables): each sweep is this shard's [S0, S1] (the fdiv_shard kernel, or
    PyTorch), all-reduced over the shards, then one search step, for at most ``spec.max_sweeps`` sweeps.
    Every rank's search sees only the merged sums, so all of them settle at the same sweep.
    """
    group, acc = spec.layout.group, theta.dtype
    live = theta > _NEG_INF
    rows = theta.shape[0]
    top = theta.amax(-1)
    qx = q.expand_as(theta)
    cols = [
        top,
        qx.gather(-1, theta.argmax(-1, keepdim=True)).squeeze(-1),
        torch.where(live, qx, torch.zeros((), dtype=acc, device=q.device)).sum(-1),
        _nonfinite(theta).to(acc),
        # Jensen's start: sum q (theta - this shard's max), merged below relative to the global max
        torch.where(live, qx * (theta - top.unsqueeze(-1)), torch.zeros((), dtype=acc, device=q.device)).sum(
            -1
        ),
    ]
    if spec.family == "kl":
        cols.append(_local_lse(theta, qx)[:, 1])  # sum q exp(theta - local max)
    if extra is not None:
        cols.append(extra)
    stats = _all_gather(torch.stack(cols, -1), group)  # [world, rows, k]
    tops = stats[..., 0]
    top = tops.amax(0)
    empty, bad = torch.isneginf(top), stats[..., 3].sum(0) > 0
    skip = empty | bad
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ones = torch.ones_like(top, dtype=_SUMS)
    if spec.family == "kl":  # p = q exp(theta - tau), tau = log sum q exp(theta): no iteration
        log_sum = _global_lse(stats[..., [0, 5]])[:, 1]  # relative to the same shift
        t, norm = torch.where(skip, torch.zeros_like(top), log_sum).to(_SUMS), ones
    else:
        q_star = stats[..., 1].gather(0, tops.argmax(0, keepdim=True)).squeeze(0)  # q at the argmax
        q_star = torch.where(skip, torch.ones_like(q_star), q_star)
        q_total = torch.where(skip, torch.ones_like(q_star), stats[..., 2].sum(0))
        # sum q (theta - max) over the vocabulary from each shard's sum relative to its own max
        shard_q, shard_qx = stats[..., 2].to(_SUMS), stats[..., 4].to(_SUMS)
        rebase = torch.where(shard_q > 0, shard_q * (tops.to(_SUMS) - shift.to(_SUMS)), 0)
        x_mean = (shard_qx + rebase).sum(0) / q_total.to(_SUMS)
        search = fsearch.TauSearch(
            spec.family, spec.alpha, q_star, q_total, x_mean, torch.finfo(acc).eps, skip
        )
        for _ in range(spec.max_sweeps):
            if bool(search.done.all()):  # (the same on every rank: it sees only merged sums)
                break
            local = _sweep_sums(theta, q, live, shift, search.t, spec)
            sums = _all_reduce(torch.cat([local[:, 0], local[:, 1]]), group)
            search.step(sums[:rows], sums[rows : 2 * rows], spec.tol)
        t = torch.where(skip, torch.zeros_like(search.best_t), search.best_t)
        norm = torch.where(skip | search.best_s0.isnan(), ones, search.best_s0)
    p = _probs(theta, q, live, shift, t, norm, spec)
    extra_sum = stats[..., -1].sum(0) if extra is not None else None
    return _Solution(p, shift, t, norm, empty, bad, extra_sum)


def _target_shard(labels, probs, keep, layout: ShardLayout, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the target: the one-hot of the labels it holds, or the probabilities."""
    if probs is not None:
        return probs.to(like.dtype)
    local = labels - layout.offset
    mine = (local >= 0) & (local < layout.local) & keep
    y = torch.zeros_like(like)
    return y.scatter_(1, local.clamp(0, layout.local - 1).unsqueeze(-1), mine.to(like.dtype).unsqueeze(-1))


def _q_f(spec: _FSpec, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q f(x / q)`` entry by entry."""
    return q * fref.f_value(spec.family, spec.alpha, x / q)


class _FYRows(torch.autograd.Function):
    """Per-row Fenchel–Young loss of ``[rows, V_local]`` logit shards."""

    @staticmethod
    def forward(ctx, logits, q, labels, probs, spec: _FSpec):
        acc = accumulate_dtype(logits.dtype)
        keep = None if labels is None else labels != spec.ignore_index
        theta = _to_compute(logits, acc, spec.temperature, keep)
        sol = _solve(theta, q, spec, extra=None if probs is None else probs.to(acc).sum(-1))
        if probs is not None:
            tol = 1e-4 if probs.dtype in (torch.float32, torch.float64) else 2e-2
            off = int(((sol.extra - 1).abs() > tol).sum())
            if off:  # the same numbers on every rank: every rank raises
                raise ValueError(
                    f"fy_loss: probability target rows must sum to 1 over the whole vocabulary (within "
                    f"{tol}); {off} do not"
                )
        live = theta > _NEG_INF
        q = q.expand_as(theta)
        y = _target_shard(labels, probs, keep, spec.layout, theta)
        theta_s = theta - sol.shift.unsqueeze(-1)
        # (p - y) theta - [q f(p/q) - q f(y/q)] per entry (D_f(y, q) dropped for reverse KL)
        terms = (sol.p - y) * theta_s - _q_f(spec, sol.p, q)
        if spec.family != "reverse_kl":
            terms = terms + _q_f(spec, y, q)
        terms = torch.where(live, terms, torch.zeros((), dtype=acc, device=terms.device))
        outside = ((y > 0) & ~live).sum(-1).to(_SUMS)  # target mass on a masked logit: +inf
        sums = _all_reduce(torch.stack([_row_sum(terms), outside], -1), spec.layout.group).to(acc)
        rows = torch.where(sums[:, 1] > 0, torch.full_like(sums[:, 0], math.inf), sums[:, 0])
        zero, nan = sol.empty, sol.bad
        if keep is not None:
            zero, nan = zero | ~keep, nan & keep
        ctx.spec = spec
        ctx.save_for_backward(logits, q, labels, probs, sol.shift, sol.t, sol.norm, zero, nan)
        return _flag_rows(rows, zero, nan)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        logits, q, labels, probs, shift, t, norm, zero, nan = ctx.saved_tensors
        spec = ctx.spec
        acc = accumulate_dtype(logits.dtype)
        keep = None if labels is None else labels != spec.ignore_index
        theta = _to_compute(logits, acc, spec.temperature, keep)
        p = _probs(theta, q, theta > _NEG_INF, shift, t, norm, spec)
        y = _target_shard(labels, probs, keep, spec.layout, theta)
        grad = (p - y) * (grad_rows.to(acc) / spec.temperature).unsqueeze(-1)
        return _flag_rows(grad, zero, nan).to(logits.dtype), None, None, None, None


class _FSoftargmax(torch.autograd.Function):
    """p* of ``[rows, V_local]`` shards; the backward all-reduces ``<w, g>`` and ``sum w``."""

    @staticmethod
    def forward(ctx, logits, q, spec: _FSpec):
        sol = _solve(logits.to(accumulate_dtype(logits.dtype)), q, spec)
        p = _flag_rows(sol.p, sol.empty, sol.bad).to(logits.dtype)
        ctx.spec = spec
        ctx.save_for_backward(p, q)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        p, q = ctx.saved_tensors
        spec = ctx.spec
        acc = accumulate_dtype(p.dtype)
        w = fref.jacobian_weights(spec.family, spec.alpha, p.to(acc), q.expand_as(p))
        g = grad.to(acc)
        sums = _all_reduce(torch.stack([_row_sum(w * g), _row_sum(w)], -1), spec.layout.group).to(acc)
        mean = sums[:, 0] / torch.where(sums[:, 1] > 0, sums[:, 1], torch.ones_like(sums[:, 1]))
        return (w * (g - mean.unsqueeze(-1))).to(grad.dtype), None, None


class _FSoftmax(torch.autograd.Function):
    """``<p*, theta> - D_f(p*, q)`` of ``[rows, V_local]`` shards; gradient ``p*``."""

    @staticmethod
    def forward(ctx, logits, q, spec: _FSpec):
        theta = logits.to(accumulate_dtype(logits.dtype))
        sol = _solve(theta, q, spec)
        live = theta > _NEG_INF
        terms = sol.p * (theta - sol.shift.unsqueeze(-1)) - _q_f(spec, sol.p, q.expand_as(theta))
        terms = torch.where(live, terms, torch.zeros((), dtype=theta.dtype, device=theta.device))
        value = sol.shift + _all_reduce(_row_sum(terms), spec.layout.group).to(theta.dtype)
        value = torch.where(sol.empty, torch.full_like(value, _NEG_INF), value)
        nan = torch.full_like(value, math.nan)
        ctx.save_for_backward(sol.p, sol.bad)
        return torch.where(sol.bad, nan, value)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        p, bad = ctx.saved_tensors
        out = p * grad.to(p.dtype).unsqueeze(-1)
        return _flag_rows(out, torch.zeros_like(bad), bad), None, None


def _f_spec(family, alpha, temperature, ignore_index, n_iter, acc, layout, shard_op=None) -> _FSpec:
    from .fdiv_call import DEFAULT_MAX_SWEEPS

    sweeps = DEFAULT_MAX_SWEEPS if n_iter is None else int(n_iter)
    tol = 1e-12 if acc == torch.float64 else 1e-7
    return _FSpec(family, float(alpha), float(temperature), int(ignore_index), sweeps, tol, layout, shard_op)


def _shard_op(backend) -> str | None:
    """The fdiv_shard op of a picked f-divergence backend (fdiv_call.pick_backend): the C++ kernels for CPU
    tensors, Triton for CUDA tensors (the CUDA build has no shard kernel); None: PyTorch."""
    if backend == "cpu" and hasattr(torch.ops.fdistill, "fdiv_shard"):  # (False for a stale build)
        return "fdiv_shard"
    if backend in ("cuda", "triton"):
        from ._triton_dispatch import triton_available

        if triton_available():
            from .triton import fdiv as _triton_fdiv  # noqa: F401  (registers fdiv_shard_triton)

            return "fdiv_shard_triton"
    return None


def _reference_value(reference, layout: ShardLayout, acc, device) -> torch.Tensor:
    """q for the string presets: 1/V of the whole vocabulary ("uniform") or 1 ("unit"), 0-dim."""
    value = 1.0 / layout.vocab if reference == "uniform" else 1.0
    return torch.tensor(value, dtype=acc, device=device)


def _prepare_f(what, logits, f, alpha, reference, dim, n_iter, backend, group, vocab_size, options,
               extra_check=None, grads=0):  # fmt: skip
    """Checks (collective) of an f-divergence call: (the fdiv call plumbing, layout, spec, q rows)."""
    from .fdiv_call import prepare as _prepare

    found = {}

    def check() -> _Local:
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        found["call"] = call = _prepare(logits, f, alpha, reference, dim, n_iter, None)
        local = _Local(call.vocab, call.rows.shape[0], logits.dtype, grads=grads)
        if extra_check is not None:
            extra_check(local)
        return local

    layout = _agree(group, what, _device_of(logits), check, options, vocab_size,
                    label_range=extra_check is not None)  # fmt: skip
    call = found["call"]
    shard_op = None if backend == "reference" else _shard_op(call.backend)
    spec = _f_spec(call.family, call.alpha, 1.0, -100, n_iter, call.acc, layout, shard_op)
    if call.ref_tensor is not None:
        q = call.ref_tensor
    else:
        q = _reference_value(reference, layout, call.acc, logits.device)
    return call, layout, spec, q


def fy_loss(logits, target, f, *, alpha, reference, ignore_index, reduction, temperature, n_iter, backend,
            group, vocab_size):  # fmt: skip
    """:func:`fdistill.fy_loss` on vocabulary shards (its ``vocab_parallel_group`` path)."""
    from .validation import check_target as _check_target

    what = "fy_loss"
    found = {}

    def check_target(local: _Local) -> None:
        check_choice("reduction", reduction, REDUCTIONS)
        check_temperature(temperature)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        found["labels"], found["probs"] = _check_target(target, logits, ignore_index, shard=True)
        local.labels, local.ignore_index = found["labels"], int(ignore_index)

    kind = "probs" if isinstance(target, torch.Tensor) and target.dtype.is_floating_point else "labels"
    options = (what, f, alpha, _option_repr(reference), ignore_index, reduction, temperature, n_iter, kind,
               vocab_size)  # fmt: skip
    call, layout, spec, q = _prepare_f(what, logits, f, alpha, reference, -1, n_iter, backend, group,
                                       vocab_size, options, check_target)  # fmt: skip
    spec = replace(spec, temperature=float(temperature), ignore_index=int(ignore_index))
    rows = _FYRows.apply(call.rows, q, found["labels"], found["probs"], spec)
    return reduce_rows(rows, reduction, call.lead_shape, found["labels"], ignore_index)


def fy_rows(logits, target_labels, target_probs, layout: ShardLayout, f="alpha", alpha=1.5, reference=None,
            temperature=1.0, ignore_index=-100, n_iter=None) -> torch.Tensor:  # fmt: skip
    """Per-row FY loss of ``[rows, V_local]`` shards (already agreed on: no checks). ``reference``:
    a 0-dim or ``[rows, V_local]`` tensor; None is the uniform ``1/V``."""
    from .fdiv_call import pick_backend as _pick_fdiv_backend

    family, alpha = fref.canonical_f(f, float(alpha))
    acc = accumulate_dtype(logits.dtype)
    shard_op = _shard_op(_pick_fdiv_backend(None, logits))
    spec = _f_spec(family, alpha, temperature, ignore_index, n_iter, acc, layout, shard_op)
    if reference is None:
        reference = _reference_value("uniform", layout, acc, logits.device)
    return _FYRows.apply(logits, reference.to(acc), target_labels, target_probs, spec)


def f_softargmax(logits, f, *, alpha, reference, dim, n_iter, backend, group, vocab_size):
    """:func:`fdistill.f_softargmax` on vocabulary shards (its ``vocab_parallel_group`` path)."""
    what = "f_softargmax"
    options = (what, f, alpha, _option_repr(reference), dim, n_iter, vocab_size)
    call, _, spec, q = _prepare_f(what, logits, f, alpha, reference, dim, n_iter, backend, group, vocab_size,
                                  options, grads=_grad_bit(logits))  # fmt: skip
    return call.restore(_FSoftargmax.apply(call.rows, q, spec))


def f_softmax(logits, f, *, alpha, reference, dim, n_iter, backend, group, vocab_size):
    """:func:`fdistill.f_softmax` on vocabulary shards (its ``vocab_parallel_group`` path)."""
    what = "f_softmax"
    options = (what, f, alpha, _option_repr(reference), dim, n_iter, vocab_size)
    call, _, spec, q = _prepare_f(what, logits, f, alpha, reference, dim, n_iter, backend, group, vocab_size,
                                  options)  # fmt: skip
    return _FSoftmax.apply(call.rows, q, spec).reshape(call.lead_shape)


def _option_repr(reference):
    return reference if isinstance(reference, str) else "tensor"


# ----------------------------------------------------------------------------- fused-linear losses


class _CopyToGroup(torch.autograd.Function):
    """Identity; the backward sums the gradient over the group (each rank's gradient of the hidden
    states is the partial sum ``dz_shard @ W_shard`` over its vocabulary shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        total = _all_reduce(grad.to(accumulate_dtype(grad.dtype), copy=True), ctx.group)
        return total.to(grad.dtype), None


def _not_supported(name: str, why: str) -> ValueError:
    return ValueError(f"{name} cannot be combined with vocab_parallel_group ({why})")


def fused_linear_divergence_loss(student_hidden, student_weight, *, student_bias, teacher_hidden,
                                 teacher_weight, teacher_bias, teacher_logits, teacher_topk, topk_tail,
                                 divergence, beta, skew, alpha, temperature, labels, ignore_index,
                                 hard_loss_weight, softcap, teacher_softcap, vocab_mismatch,
                                 scale_by_temperature_squared, reduction, chunk_size, backend, group,
                                 vocab_size):  # fmt: skip
    """:func:`fdistill.fused_linear_divergence_loss` with LM heads sharded over the vocabulary."""
    from .chunked_head import ChunkedLoss, LMHead, chunked_head_loss, default_chunk_size, head_dtype

    what = "fused_linear_divergence_loss"
    found = {}

    def check() -> _Local:
        if teacher_topk is not None:
            raise _not_supported("teacher_topk", "give the teacher as its sharded head or logit shards")
        if vocab_mismatch != "error":
            raise _not_supported("vocab_mismatch='mask'", "the teacher must be sharded as the student")
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        check_choice("divergence", divergence, DIVERGENCES)
        found["param"] = divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
        check_temperature(temperature)
        check_choice("reduction", reduction, REDUCTIONS)
        check_real("hard_loss_weight", hard_loss_weight)
        if hard_loss_weight < 0:
            raise ValueError(f"hard_loss_weight must be >= 0, got {hard_loss_weight}")
        if hard_loss_weight > 0 and labels is None:
            raise ValueError("hard_loss_weight > 0 needs labels (the cross-entropy targets)")
        found["head"] = head_args = check_head("student", student_hidden, student_weight, student_bias,
                                                   softcap)  # fmt: skip
        lead = student_hidden.shape[:-1]
        found["labels"] = check_token_ids(labels, lead, 1 << 62, ignore_index, student_hidden.device)
        _check_chunk_size(chunk_size)
        rows = head_args[0].shape[0]
        t_head = teacher_weight if teacher_weight is not None else teacher_hidden
        given = [
            n for n, x in (("teacher head", t_head), ("teacher_logits", teacher_logits)) if x is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one teacher: teacher_hidden and teacher_weight (its LM head shard) or "
                f"teacher_logits (shards); got {given or 'none'}"
            )
        if teacher_logits is not None:
            if teacher_bias is not None or teacher_softcap is not None:
                raise ValueError("teacher_bias and teacher_softcap apply only to a teacher given by its head")
            check_float("teacher_logits", teacher_logits, student_hidden.device)
            if teacher_logits.dim() < 1 or teacher_logits.shape[:-1] != lead or teacher_logits.shape[-1] < 1:
                raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be (..., V_local) with "
                                 f"... = {tuple(lead)}")  # fmt: skip
            found["teacher"] = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
            t_vocab, t_rows = teacher_logits.shape[-1], found["teacher"].shape[0]
        else:
            t_head = check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, teacher_softcap)
            found["teacher"] = t_head
            if teacher_hidden.device != student_hidden.device:
                raise ValueError("teacher_hidden and student_hidden are on different devices")
            t_vocab, t_rows = t_head[1].shape[0], t_head[0].shape[0]
            if teacher_hidden.shape[:-1] != lead:
                raise ValueError(
                    f"teacher_hidden {tuple(teacher_hidden.shape)} must have the student's token dimensions "
                    f"{tuple(lead)}"
                )
        grads = _grad_bit(student_hidden, student_weight, student_bias)
        return _Local(student_weight.shape[0], rows, student_weight.dtype, t_vocab, t_rows, grads,
                      found["labels"], int(ignore_index))  # fmt: skip

    hidden_size = student_hidden.shape[-1] if isinstance(student_hidden, torch.Tensor) else None
    options = (what, divergence, beta, skew, alpha, temperature, ignore_index, hard_loss_weight, softcap,
               teacher_softcap, scale_by_temperature_squared, reduction, chunk_size, hidden_size,
               teacher_logits is None, student_bias is None, labels is None, vocab_size)  # fmt: skip
    layout = _agree(group, what, _device_of(student_hidden), check, options, vocab_size,
                    label_range=labels is not None)  # fmt: skip
    hidden, weight, bias = found["head"]
    flat_labels = found["labels"]
    lead = student_hidden.shape[:-1]
    head = LMHead(hidden, weight, bias, softcap, head_dtype(student_hidden, student_weight))
    if teacher_logits is not None:
        t_rows = found["teacher"]

        def teacher_chunk(r):
            return t_rows[r]
    else:
        t_hidden, t_weight, t_bias = found["teacher"]
        t_head = LMHead(t_hidden.detach(), t_weight.detach(), None if t_bias is None else t_bias.detach(),
                        teacher_softcap, head_dtype(teacher_hidden, teacher_weight))  # fmt: skip

        def teacher_chunk(r):
            return t_head.logits(r)[0]

    param = found["param"]
    div_backend = pick_backend(backend, hidden, False)

    def rows_fn(z, rows):
        t = teacher_chunk(rows).to(z.dtype)
        chunk_labels = None if flat_labels is None else flat_labels[rows]
        loss = divergence_rows(z, t.contiguous(), layout, divergence, param, temperature, chunk_labels,
                               ignore_index, div_backend)  # fmt: skip
        if scale_by_temperature_squared:
            loss = loss * (temperature * temperature)
        if hard_loss_weight:  # cross-entropy = the FY loss of KL with a uniform reference
            ce = fy_rows(z, flat_labels[rows], None, layout, "kl", ignore_index=ignore_index)
            loss = loss + hard_loss_weight * ce
        return loss

    chunk = chunk_size or default_chunk_size(max(layout.sizes), hidden.shape[-1], hidden.device)
    loss = ChunkedLoss(head, rows_fn, int(chunk), reduction, flat_labels, int(ignore_index))
    out = chunked_head_loss(loss, _CopyToGroup.apply(hidden, group), weight, bias)
    return out.reshape(lead) if reduction == "none" else out


def fused_linear_fy_loss(hidden, weight, target, f, *, bias, alpha, reference, temperature, ignore_index,
                         softcap, reduction, n_iter, chunk_size, backend, group, vocab_size):  # fmt: skip
    """:func:`fdistill.fused_linear_fy_loss` with the LM head sharded over the vocabulary."""
    from .chunked_head import ChunkedLoss, LMHead, chunked_head_loss, default_chunk_size, head_dtype
    from .fdiv_call import prepare as _prepare

    what = "fused_linear_fy_loss"
    found = {}

    def check() -> _Local:
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        found["head"] = head_args = check_head("", hidden, weight, bias, softcap)
        lead, vocab = hidden.shape[:-1], weight.shape[0]
        check_temperature(temperature)
        check_choice("reduction", reduction, REDUCTIONS)
        _check_chunk_size(chunk_size)
        if not isinstance(target, torch.Tensor):
            raise TypeError(
                f"target must be a torch.Tensor (labels or probabilities), got {type(target).__name__}"
            )
        found["labels"] = found["probs"] = None
        if target.dtype.is_floating_point:
            if target.shape != (*lead, vocab):
                raise ValueError(
                    f"probability target {tuple(target.shape)} must be (..., V_local) = {(*lead, vocab)}"
                )
            found["probs"] = probs = target.detach().reshape(-1, vocab)
            if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
                raise ValueError("probability target must be finite and non-negative")
        else:
            found["labels"] = check_token_ids(
                target, lead, 1 << 62, ignore_index, hidden.device, name="target"
            )
        q = reference
        if isinstance(reference, torch.Tensor) and reference.dim() > 1:
            if reference.shape != (*lead, vocab):
                raise ValueError(f"reference {tuple(reference.shape)} must be (V_local,) or (..., V_local) = "
                                 f"{(*lead, vocab)}")  # fmt: skip
            q = reference.reshape(-1, vocab)
        empty = head_args[0].new_empty((0, vocab), dtype=weight.dtype)
        found["call"] = _prepare(empty, f, alpha, q[:0] if q is not reference else q, -1, n_iter, None)
        found["q"] = q
        return _Local(vocab, head_args[0].shape[0], weight.dtype, grads=_grad_bit(hidden, weight, bias),
                      labels=found["labels"], ignore_index=int(ignore_index))  # fmt: skip

    options = (what, f, alpha, _option_repr(reference), temperature, ignore_index, softcap, reduction, n_iter,
               chunk_size, hidden.shape[-1] if isinstance(hidden, torch.Tensor) else None,
               bool(isinstance(target, torch.Tensor) and target.dtype.is_floating_point), bias is None,
               vocab_size)  # fmt: skip
    by_labels = not (isinstance(target, torch.Tensor) and target.dtype.is_floating_point)
    layout = _agree(group, what, _device_of(hidden), check, options, vocab_size, label_range=by_labels)
    head_args = found["head"]
    call, labels, probs, q = found["call"], found["labels"], found["probs"], found["q"]
    head = LMHead(*head_args, softcap, head_dtype(hidden, weight))
    acc = accumulate_dtype(head.dtype)
    per_token = isinstance(q, torch.Tensor) and q.dim() > 1
    q = _reference_value(q, layout, acc, hidden.device) if isinstance(q, str) else q.to(acc)
    spec = _f_spec(call.family, call.alpha, temperature, ignore_index, n_iter, acc, layout)

    def rows_fn(z, rows):
        y = None if probs is None else probs[rows].to(z.dtype)
        return _FYRows.apply(
            z, q[rows] if per_token else q, None if labels is None else labels[rows], y, spec
        )

    chunk = chunk_size or default_chunk_size(max(layout.sizes), head_args[0].shape[-1], hidden.device)
    loss = ChunkedLoss(head, rows_fn, int(chunk), reduction, labels, int(ignore_index))
    out = chunked_head_loss(loss, _CopyToGroup.apply(head_args[0], group), head_args[1], head_args[2])
    return out.reshape(hidden.shape[:-1]) if reduction == "none" else out


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


__all__ = ["ShardLayout", "divergence_rows", "fy_rows"]

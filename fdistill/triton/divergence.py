"""Triton kernels of the token-level divergences, registered as ``torch.ops.fdistill.*_triton``.

The op contract is the C++ one (``fdistill/ops.py``): ``divergence_fwd_triton`` maps ``[rows, V]``
student and teacher logits to a per-row loss and ``[rows, NUM_STATS]`` row statistics, and
``divergence_fwd_grad_triton`` (the same kernel with ``WRITE_GRAD``) writes each row's gradient
right after its statistics.

One program per row walks the vocabulary in tiles of ``BLOCK`` entries with an online
log-sum-exp (one rescale per tile), so any V works without holding a row. Tiles are loaded in
their storage dtype and upcast to the accumulation dtype (float32, float64 for float64 logits)
before any arithmetic. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops import (
    BWD_INPLACE_SCHEMA,
    BWD_SCHEMA,
    FINISH_SCHEMA,
    FWD_GRAD_INPLACE_SCHEMA,
    FWD_GRAD_SCHEMA,
    FWD_SCHEMA,
    NUM_PARTIALS,
    NUM_STATS,
    PARTIAL_SCHEMA,
    SECOND_SCHEMA,
    accumulate_dtype,
    register_divergence_ops,
    register_vocab_parallel_ops,
)
from ..reference import resolve_divergence
from .math import (
    ALPHA_LOG,
    ALPHA_STUDENT,
    DIVERGENCE_CODES,
    ROW_PARTIALS,
    ROW_STATS,
    alpha_form,
    alpha_logit,
    alpha_term,
    expm1,
    grad_entry,
    second_pass_terms,
    weighted,
)
from .tiles import tiling


@triton.jit
def _scalars(inv_t, param, log_wt, log_ws, ACC: tl.constexpr):
    """The float64 kernel arguments [1/T, param, log w_teacher, log w_student] in the accumulation
    dtype (``zeros + x``: the interpreter passes Python floats, the compiler float64 scalars)."""
    zero = tl.zeros([], tl.float64)
    return (zero + inv_t).to(ACC), (zero + param).to(ACC), (zero + log_wt).to(ACC), (zero + log_ws).to(ACC)


@triton.jit
def _raise_max(m, ref, has_ref, x):
    """Online log-sum-exp over one tile: the new running max, the shift to exponentiate with, the
    factor that rescales the running sums, and the row's fixed reference (its first finite max)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    first = (has_ref == 0) & (m_new > float("-inf")) & (m_new < float("inf"))
    ref = tl.where(first, m_new, ref)
    has_ref = has_ref | first.to(tl.int32)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix keeps the sum at 0
    return m_new, shift, tl.exp(m - shift), ref, has_ref


@triton.jit
def _is_finite(x):
    return (x > float("-inf")) & (x < float("inf"))  # False for NaN


@triton.jit
def _first_pass(s_row, t_row, n_cols, V, inv_t, param,
                DIV: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Pass 1 over the first ``n_cols`` entries of a row: online log-sum-exps, and the sums of the
    one-pass divergences, as (max, sum, weighted, ref, has_ref) of s and of t and (max, sum) of the
    alpha mixture logit (the partials of ``ROW_PARTIALS``, in that order). Weighted terms use
    (t - ref_t) - (s - ref_s), which stays small when the logits carry a large offset.

    Each tile is reduced in the accumulation dtype (a tree: error ~ log2(BLOCK) ulp of the tile's
    sum); only the running totals across tiles are float64, where at large logits one tile
    dominates (1 in z, ~100s in w) and float32 totals would drop the rest. z: sums of exp(x - m);
    w_s, w_t: sums of exp(s - m_s) ((s - ref_s) - (t - ref_t)) and exp(t - m_t) ((t - ref_t) - (s - ref_s)).
    """
    NEG_INF = float("-inf")
    F64: tl.constexpr = tl.float64
    offs = tl.arange(0, BLOCK)
    m_s = tl.full([], NEG_INF, ACC)
    m_t = tl.full([], NEG_INF, ACC)
    m_z = tl.full([], NEG_INF, ACC)
    z_s = tl.zeros([], F64)
    z_t = tl.zeros([], F64)
    z_z = tl.zeros([], F64)
    w_s = tl.zeros([], F64)
    w_t = tl.zeros([], F64)
    ref_s = tl.zeros([], ACC)
    ref_t = tl.zeros([], ACC)
    has_s = tl.zeros([], tl.int32)
    has_t = tl.zeros([], tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
        t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
        m_s, shift_s, scale_s, ref_s, has_s = _raise_max(m_s, ref_s, has_s, s)
        m_t, shift_t, scale_t, ref_t, has_t = _raise_max(m_t, ref_t, has_t, t)
        es = tl.exp(s - shift_s)
        et = tl.exp(t - shift_t)
        sum_es = tl.sum(es, axis=0).to(F64)
        z_s = z_s * scale_s.to(F64) + sum_es
        z_t = z_t * scale_t.to(F64) + tl.sum(et, axis=0).to(F64)
        if DIV == 0 or DIV == 2:
            w_t = w_t * scale_t.to(F64) + tl.sum(weighted(et, t - ref_t, s - ref_s), axis=0).to(F64)
        if DIV == 1 or DIV == 2:
            # The reverse-KL gradient q ((s - t) - c0) needs c0 = w_s / z_s to far better than a float
            # ulp of it (~100s at large logits): the tile's terms are taken relative to the entry of
            # its largest s (which dominates es), g0 = its gap, added back in float64 as g0 sum es.
            j = tl.argmax(s, axis=0)
            s_j = tl.max(s, axis=0)
            t_j = tl.sum(tl.where(offs == j, t, 0.0), axis=0)
            shift = _is_finite(s_j) & _is_finite(t_j)  # else the plain terms (an inf / NaN passes)
            a_s = tl.where(shift, s_j, ref_s)
            a_t = tl.where(shift, t_j, ref_t)
            g0 = (a_s.to(F64) - ref_s.to(F64)) - (a_t.to(F64) - ref_t.to(F64))  # each exact in float64
            w_tile = tl.sum(weighted(es, s - a_s, t - a_t), axis=0).to(F64)
            w_s = w_s * scale_s.to(F64) + w_tile + g0 * sum_es
        if DIV == 7:
            z = alpha_logit(s - ref_s, t - ref_t, param)
            m_z_new = tl.maximum(m_z, tl.max(z, axis=0))
            shift_z = tl.where(m_z_new == NEG_INF, 0.0, m_z_new)
            z_z = z_z * tl.exp(m_z - shift_z).to(F64) + tl.sum(tl.exp(z - shift_z), axis=0).to(F64)
            m_z = m_z_new
    return m_s, z_s, w_s, ref_s, has_s, m_t, z_t, w_t, ref_t, has_t, m_z, z_z


@triton.jit
def _second_pass(s_row, t_row, n_cols, V, inv_t, m_s, log_sum_s, m_t, log_sum_t, param, log_wt, log_ws,
                 alpha64, DIV: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Pass 2 of the divergences that need normalised log-probabilities (jsd, skew*, tv, and alpha in
    its Student / Teacher form) over the first ``n_cols`` entries: the float64 sums of the loss and of
    the row scalar c0 (0, 0 for the others). alpha: loss2 = A - 1, the sum of its expm1 terms;
    ``alpha64`` the unrounded alpha (1 - alpha is rounded from it)."""
    NEG_INF = float("-inf")
    F64: tl.constexpr = tl.float64
    offs = tl.arange(0, BLOCK)
    loss2 = tl.zeros([], F64)
    aux2 = tl.zeros([], F64)
    if DIV == 3 or DIV == 4 or DIV == 5 or DIV == 6:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            ls = (s - m_s) - log_sum_s
            lt = (t - m_t) - log_sum_t
            term, aux = second_pass_terms(ls, lt, tl.exp(ls), tl.exp(lt), param, log_wt, log_ws, DIV)
            loss2 += tl.sum(term, axis=0).to(F64)
            aux2 += tl.sum(aux, axis=0).to(F64)
    if DIV == 7:
        form = alpha_form(param)  # from the rounded alpha, as the backward decides it
        one_minus = (1.0 - alpha64).to(ACC)
        for start in range(0, tl.where(form != ALPHA_LOG, n_cols, 0), BLOCK):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            ls = (s - m_s) - log_sum_s
            lt = (t - m_t) - log_sum_t
            term = alpha_term(ls, lt, tl.exp(ls), tl.exp(lt), param, one_minus, form)
            loss2 += tl.sum(term, axis=0).to(F64)
    return loss2, aux2


@triton.jit
def _finish_row(LOSS, STATS, row, m_s, z_s, w_s, ref_s, m_t, z_t, w_t, ref_t, m_z, z_z, loss2, aux2, param,
                alpha64, DIV: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """A row's loss and statistics from its pass sums (C++: finish_row), stored; returns the
    statistics (log-sum s, log-sum t, c0, c1) in ACC. ``m_z`` may be float64 (a merged max)."""
    NEG_INF = float("-inf")
    F64: tl.constexpr = tl.float64
    log_sum_s = tl.log(z_s).to(ACC)
    log_sum_t = tl.log(z_t).to(ACC)
    lse_s = m_s + log_sum_s  # -inf for an all -inf row, NaN after a NaN or +inf logit
    lse_t = m_t + log_sum_t
    empty = (lse_s == NEG_INF) & (lse_t == NEG_INF)
    normal = _is_finite(lse_s) & _is_finite(lse_t)
    # Row scalars in float64 (a handful of operations per row, as the C++ kernels do), so that
    # constants such as c0 = KL + LSE(s) - LSE(t) are rounded once.
    # KL(p||q) = E_p[t - s] - LSE(t) + LSE(s), with both LSEs taken relative to the references
    lsum_s = tl.log(z_s)
    lsum_t = tl.log(z_t)
    lse_gap = ((m_t.to(F64) - ref_t.to(F64)) + lsum_t) - ((m_s.to(F64) - ref_s.to(F64)) + lsum_s)
    fkl = w_t / z_t - lse_gap
    rkl = w_s / z_s + lse_gap
    form = alpha_form(param)  # (alpha) from the rounded alpha, as the second pass and the backward
    param = param.to(F64)
    c0 = tl.zeros([], F64)
    c1 = tl.zeros([], F64)
    if DIV == 0:
        loss = fkl
    elif DIV == 1 or DIV == 2:
        loss = rkl if DIV == 1 else (1.0 - param) * fkl + param * rkl
        c0 = rkl + lsum_s - lsum_t  # KL(q||p) + (LSE(s) - max s) - (LSE(t) - max t): no 1e20 - 1e20
        c1 = c0 - c0.to(ACC).to(F64)  # c0 + c1 as a float pair: the rounding error of c0
    elif DIV == 7:
        # z was taken relative to the references (and weighted by the rounded alpha): shift it to the maxima
        lse_z = m_z.to(F64) + tl.log(z_z)
        lse_z = lse_z - param * (m_t.to(F64) - ref_t.to(F64)) - (1.0 - param) * (m_s.to(F64) - ref_s.to(F64))
        a = alpha64
        log_a = lse_z - param * lsum_t - (1.0 - param) * lsum_s
        c0 = lse_z
        if form == ALPHA_LOG:  # A >= 1: loss = exp(log A - log(a (a - 1))) (1 - 1/A), c1 = A / a
            c1 = tl.exp(log_a - tl.log(tl.abs(a))) * tl.where(a < 0, -1.0, 1.0)
            loss = tl.exp(log_a - tl.log(a * (a - 1.0))) * -expm1(-log_a)
        else:  # loss2 = A - 1; the gradient's scalars as the C++ finish_row chooses them
            loss = -loss2 / (a * (1.0 - a))
            # A = 1 + (A - 1) to its last bits where A >= 1/2, exp(log A) below
            ratio = (tl.where(loss2 >= -0.5, 1.0 + loss2, tl.exp(log_a)) / a).to(ACC).to(F64)
            student = (form == ALPHA_STUDENT) & ((tl.abs(loss2) <= 0.5) | ~(ratio * a > 0))
            c0 = tl.where(student, log_sum_t.to(F64) - log_sum_s.to(F64), c0)  # X = (dt - ds) - c0
            c1 = tl.where(student, loss2, ratio)  # A - 1 (sign never that of a), or A / a
        infinite = m_z == float("inf")  # alpha outside (0, 1), disjoint supports: A = +inf
        c0 = tl.where(infinite, float("inf"), c0)
        c1 = tl.where(infinite, float("inf"), c1)
        loss = tl.where(infinite, float("inf"), loss)
    else:
        loss = loss2
        c0 = aux2
    loss = tl.where(normal, loss, tl.where(empty, 0.0, float("nan")))
    c0 = tl.where(normal, c0, 0.0)  # rows not computed keep finite statistics (as the C++ kernels)
    c1 = tl.where(normal, c1, 0.0)
    tl.store(LOSS + row, loss.to(ACC))
    stats = STATS + row * ROW_STATS
    tl.store(stats + 0, m_s)
    tl.store(stats + 1, log_sum_s)
    tl.store(stats + 2, m_t)
    tl.store(stats + 3, log_sum_t)
    tl.store(stats + 4, c0.to(ACC))
    tl.store(stats + 5, c1.to(ACC))
    return log_sum_s, log_sum_t, c0.to(ACC), c1.to(ACC)


@triton.jit
def _divergence_fwd_kernel(
    S, T, LABELS, LOSS, STATS, GRAD,
    inv_t: tl.float64, param: tl.float64, log_wt: tl.float64, log_ws: tl.float64, grad_scale: tl.float64,
    V, stride_s, stride_t, stride_grad, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = LOSS.dtype.element_ty
    alpha64 = tl.zeros([], tl.float64) + param  # DIV == 7: 1 - alpha and the loss need it unrounded
    inv_t, param, log_wt, log_ws = _scalars(inv_t, param, log_wt, log_ws, ACC)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    n_cols = V
    if HAS_LABELS:
        n_cols = tl.where(tl.load(LABELS + row) == ignore_index, 0, V)  # ignored: no pass at all
    m_s, z_s, w_s, ref_s, has_s, m_t, z_t, w_t, ref_t, has_t, m_z, z_z = _first_pass(
        s_row, t_row, n_cols, V, inv_t, param, DIV, BLOCK, ACC
    )
    log_sum_s = tl.log(z_s).to(ACC)
    log_sum_t = tl.log(z_t).to(ACC)
    normal = _is_finite(m_s + log_sum_s) & _is_finite(m_t + log_sum_t)
    loss2, aux2 = _second_pass(
        s_row, t_row, tl.where(normal, n_cols, 0), V, inv_t, m_s, log_sum_s, m_t, log_sum_t,
        param, log_wt, log_ws, alpha64, DIV, BLOCK, ACC,
    )  # fmt: skip
    log_sum_s, log_sum_t, c0, c1 = _finish_row(
        LOSS, STATS, row, m_s, z_s, w_s, ref_s, m_t, z_t, w_t, ref_t, m_z, z_z, loss2, aux2, param, alpha64,
        DIV, ACC,
    )  # fmt: skip
    if WRITE_GRAD:  # the one-pass op: the row's gradient right after its statistics
        g = ((tl.zeros([], tl.float64) + grad_scale) * inv_t.to(tl.float64)).to(ACC)
        _write_grad(
            s_row, t_row, GRAD + row * stride_grad, m_s, log_sum_s, m_t, log_sum_t,
            c0, c1, g, n_cols == 0,
            inv_t, param, log_wt, log_ws, V, DIV, BLOCK, ACC,
        )  # fmt: skip


# ----------------------------------------------------------------------------- vocabulary parallelism
# partial -> merge -> finish, as the C++ ops (fdistill/ops.py states the contract).


@triton.jit
def _divergence_partial_kernel(
    S, T, LABELS, PARTS, inv_t: tl.float64, param: tl.float64, V, stride_s, stride_t, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The first-pass partials of each row of a vocabulary slice (ignored rows: an empty slice)."""
    row = tl.program_id(0).to(tl.int64)
    inv_t, param, _, _ = _scalars(inv_t, param, 0.0, 0.0, ACC)
    n_cols = V
    if HAS_LABELS:
        n_cols = tl.where(tl.load(LABELS + row) == ignore_index, 0, V)
    m_s, z_s, w_s, ref_s, has_s, m_t, z_t, w_t, ref_t, has_t, m_z, z_z = _first_pass(
        S + row * stride_s, T + row * stride_t, n_cols, V, inv_t, param, DIV, BLOCK, ACC
    )
    out = PARTS + row * ROW_PARTIALS
    tl.store(out + 0, m_s.to(tl.float64))
    tl.store(out + 1, z_s)
    tl.store(out + 2, w_s)
    tl.store(out + 3, ref_s.to(tl.float64))
    tl.store(out + 4, has_s.to(tl.float64))
    tl.store(out + 5, m_t.to(tl.float64))
    tl.store(out + 6, z_t)
    tl.store(out + 7, w_t)
    tl.store(out + 8, ref_t.to(tl.float64))
    tl.store(out + 9, has_t.to(tl.float64))
    tl.store(out + 10, m_z.to(tl.float64))
    tl.store(out + 11, z_z)


@triton.jit
def _lse_add(m, z, w, m_o, z_o, w_o):
    """Merge (m_o, z_o, w_o) into the running (max, sum, weighted) of a row (C++: OnlineLSE::add):
    both rescaled to the larger max (NaN wins, an all -inf slice adds 0)."""
    top = tl.where((m_o > m) | (m_o != m_o), m_o, m)
    mine = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    theirs = tl.where(m_o == float("-inf"), 0.0, tl.exp(m_o - top))
    return top, z * mine + z_o * theirs, w * mine + w_o * theirs


@triton.jit
def _divergence_finish_kernel(
    PARTS, SECOND, LOSS, STATS, param: tl.float64, parts, rows, DIV: tl.constexpr, HAS_SECOND: tl.constexpr,
):  # fmt: skip
    """Loss and statistics of each row from the partials of its ``parts`` slices (C++:
    merge_partials, then finish_row): each slice's weighted sums and mixture logit are re-based
    exactly in float64 to the references of the first slice that has one."""
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = LOSS.dtype.element_ty
    F64: tl.constexpr = tl.float64
    NEG_INF = float("-inf")
    alpha = ((tl.zeros([], F64) + param).to(ACC)).to(F64)  # as the partial kernel's mixture logit
    ref_s = tl.zeros([], F64)
    ref_t = tl.zeros([], F64)
    has_s = tl.zeros([], tl.int1)
    has_t = tl.zeros([], tl.int1)
    stride = rows * ROW_PARTIALS
    for i in range(0, parts):
        p = PARTS + i * stride + row * ROW_PARTIALS
        take_s = ~has_s & (tl.load(p + 4) != 0)
        take_t = ~has_t & (tl.load(p + 9) != 0)
        ref_s = tl.where(take_s, tl.load(p + 3), ref_s)
        ref_t = tl.where(take_t, tl.load(p + 8), ref_t)
        has_s = has_s | take_s
        has_t = has_t | take_t
    m_s = tl.full([], NEG_INF, F64)
    m_t = tl.full([], NEG_INF, F64)
    m_z = tl.full([], NEG_INF, F64)
    z_s = tl.zeros([], F64)
    z_t = tl.zeros([], F64)
    z_z = tl.zeros([], F64)
    w_s = tl.zeros([], F64)
    w_t = tl.zeros([], F64)
    for i in range(0, parts):
        p = PARTS + i * stride + row * ROW_PARTIALS
        ds = tl.load(p + 3) - ref_s
        dt = tl.load(p + 8) - ref_t
        zs_i = tl.load(p + 1)
        zt_i = tl.load(p + 6)
        m_s, z_s, w_s = _lse_add(m_s, z_s, w_s, tl.load(p + 0), zs_i, tl.load(p + 2) + zs_i * (ds - dt))
        m_t, z_t, w_t = _lse_add(m_t, z_t, w_t, tl.load(p + 5), zt_i, tl.load(p + 7) + zt_i * (dt - ds))
        m_z_i = tl.load(p + 10) + (alpha * dt + (1.0 - alpha) * ds)
        m_z, z_z, _ = _lse_add(m_z, z_z, 0.0, m_z_i, tl.load(p + 11), 0.0)
    loss2 = tl.zeros([], F64)
    aux2 = tl.zeros([], F64)
    if HAS_SECOND:
        loss2 = tl.load(SECOND + 2 * row)
        aux2 = tl.load(SECOND + 2 * row + 1)
    # an ignored row's partials are empty: it finishes as an empty row (loss 0), as in the forward kernel
    _finish_row(
        LOSS, STATS, row, m_s.to(ACC), z_s, w_s, ref_s.to(ACC), m_t.to(ACC), z_t, w_t, ref_t.to(ACC),
        m_z, z_z, loss2, aux2, alpha.to(ACC), tl.zeros([], F64) + param, DIV, ACC,
    )  # fmt: skip


@triton.jit
def _divergence_second_kernel(
    S, T, LABELS, STATS, OUT, inv_t: tl.float64, param: tl.float64, log_wt: tl.float64, log_ws: tl.float64,
    V, stride_s, stride_t, ignore_index, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The second-pass sums (loss, aux) of each row of a slice from the whole rows' statistics (0 for
    rows that are ignored or not normal)."""
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = STATS.dtype.element_ty
    alpha64 = tl.zeros([], tl.float64) + param
    inv_t, param, log_wt, log_ws = _scalars(inv_t, param, log_wt, log_ws, ACC)
    stats = STATS + row * ROW_STATS
    m_s = tl.load(stats + 0)
    log_sum_s = tl.load(stats + 1)
    m_t = tl.load(stats + 2)
    log_sum_t = tl.load(stats + 3)
    n_cols = tl.where(_is_finite(m_s + log_sum_s) & _is_finite(m_t + log_sum_t), V, 0)
    if HAS_LABELS:
        n_cols = tl.where(tl.load(LABELS + row) == ignore_index, 0, n_cols)
    loss2, aux2 = _second_pass(
        S + row * stride_s, T + row * stride_t, n_cols, V, inv_t, m_s, log_sum_s, m_t, log_sum_t,
        param, log_wt, log_ws, alpha64, DIV, BLOCK, ACC,
    )  # fmt: skip
    tl.store(OUT + 2 * row, loss2)
    tl.store(OUT + 2 * row + 1, aux2)


@triton.jit
def _write_grad(
    s_row, t_row, g_row, m_s, log_sum_s, m_t, log_sum_t, c0, c1, g, skip,
    inv_t, param, log_wt, log_ws, V, DIV: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """g * dL/ds of one row from its statistics (g holds the upstream gradient and 1/T): zeros where
    ``skip`` (ignored or empty rows, g = 0) and NaN for rows with no distribution. ``g_row`` may alias
    ``s_row``: each tile is loaded before it is overwritten."""
    NEG_INF = float("-inf")
    lse_s = m_s + log_sum_s
    lse_t = m_t + log_sum_t
    normal = _is_finite(lse_s) & _is_finite(lse_t)
    skip = skip | ((lse_s == NEG_INF) & (lse_t == NEG_INF)) | (normal & (g == 0))
    compute = normal & ~skip
    fill = tl.where(skip, 0.0, float("nan"))
    offs = tl.arange(0, BLOCK)
    n_load = tl.where(compute, V, 0)  # skipped rows read nothing
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        load = cols < n_load
        s = tl.load(s_row + cols, mask=load, other=NEG_INF).to(ACC) * inv_t
        t = tl.load(t_row + cols, mask=load, other=NEG_INF).to(ACC) * inv_t
        ds = s - m_s
        dt = t - m_t
        ls = ds - log_sum_s
        lt = dt - log_sum_t
        q = tl.exp(ls)
        p = tl.exp(lt)
        grad = grad_entry(s, t, m_s, m_t, ds, dt, ls, lt, q, p, param, log_wt, log_ws, c0, c1, DIV) * g
        grad = tl.where(compute, grad, fill)
        tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _divergence_bwd_kernel(
    GRAD_LOSS, S, T, LABELS, STATS, GRAD,
    inv_t: tl.float64, param: tl.float64, log_wt: tl.float64, log_ws: tl.float64,
    V, stride_s, stride_t, stride_grad, stride_gl, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = STATS.dtype.element_ty
    inv_t, param, log_wt, log_ws = _scalars(inv_t, param, log_wt, log_ws, ACC)
    stats = STATS + row * ROW_STATS
    g = tl.load(GRAD_LOSS + row * stride_gl).to(ACC) * inv_t
    skip = tl.zeros([], tl.int1)
    if HAS_LABELS:
        skip = tl.load(LABELS + row) == ignore_index
    _write_grad(
        S + row * stride_s, T + row * stride_t, GRAD + row * stride_grad,
        tl.load(stats + 0), tl.load(stats + 1), tl.load(stats + 2), tl.load(stats + 3),
        tl.load(stats + 4), tl.load(stats + 5), g, skip,
        inv_t, param, log_wt, log_ws, V, DIV, BLOCK, ACC,
    )  # fmt: skip


# ----------------------------------------------------------------------------- launchers


def _kernel_scalars(kind: str, param: float, temperature: float) -> tuple[float, float, float, float]:
    """(1/T, param, log w_teacher, log w_student): float64 kernel arguments, no device copy."""
    log = lambda w: math.log(w) if w > 0 else -math.inf  # noqa: E731
    w_teacher, w_student = {
        "jsd": (param, 1 - param),
        "skew_kl": (param, 1 - param),  # m = lambda p + (1 - lambda) q
        "skew_reverse_kl": (1 - param, param),  # m = lambda q + (1 - lambda) p
    }.get(kind, (0.0, 0.0))
    return 1.0 / temperature, float(param), log(w_teacher), log(w_student)


FP_FUSION = False  # no FMA contraction: s = logit / T is rounded on its own, the two-sum stays exact


def _launch_setup(student, divergence, param, temperature):
    kind = resolve_divergence(divergence, param)
    scalars = _kernel_scalars(kind, param, temperature)
    return DIVERGENCE_CODES[kind], scalars, *tiling(student.shape[1], student.dtype, kind=kind)


def _check_rows(student, teacher, labels):
    torch._check(student.dim() == 2 and student.shape == teacher.shape, lambda: "student, teacher: [rows, V]")
    torch._check(student.stride(1) == 1 and teacher.stride(1) == 1, lambda: "unit stride along V")
    torch._check(labels is None or labels.shape == (student.shape[0],), lambda: "labels must be [rows]")


def _forward(student, teacher, labels, divergence, param, temperature, ignore_index, grad, grad_scale=1.0):
    _check_rows(student, teacher, labels)
    code, scalars, block, warps = _launch_setup(student, divergence, param, temperature)
    rows, vocab = student.shape
    acc = accumulate_dtype(student.dtype)
    loss = torch.empty(rows, dtype=acc, device=student.device)
    stats = torch.empty(rows, NUM_STATS, dtype=acc, device=student.device)
    if rows > 0:
        _divergence_fwd_kernel[(rows,)](
            student, teacher, labels, loss, stats, grad, *scalars, float(grad_scale),
            vocab, student.stride(0), teacher.stride(0), 0 if grad is None else grad.stride(0), ignore_index,
            DIV=code, HAS_LABELS=labels is not None, BLOCK=block, WRITE_GRAD=grad is not None,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return loss, stats


def divergence_fwd_triton(
    student, teacher, labels, divergence, param, temperature, ignore_index, grad_in_place=False
):
    return _forward(student, teacher, labels, divergence, param, temperature, ignore_index, None)


# float64 rows take the forward and the backward kernel (two launches, the same values): the fused
# float64 kernel of the mixture divergences exceeds the sm_90 register file (benchmarks/aot_sm90.py).
ONE_PASS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _forward_with_grad(student, teacher, labels, options, grad, grad_scale):
    if student.dtype in ONE_PASS_DTYPES:
        return _forward(student, teacher, labels, *options, grad, grad_scale)
    loss, stats = _forward(student, teacher, labels, *options, None)
    scale = torch.full((student.shape[0],), grad_scale, dtype=stats.dtype, device=student.device)
    _backward_into(grad, scale, student, teacher, labels, stats, *options)
    return loss, stats


def divergence_fwd_grad_triton(
    student, teacher, labels, divergence, param, temperature, ignore_index, grad_scale=1.0
):
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    options = (divergence, param, temperature, ignore_index)
    loss, stats = _forward_with_grad(student, teacher, labels, options, grad, grad_scale)
    return loss, stats, grad


def divergence_fwd_grad_triton_(
    student, teacher, labels, divergence, param, temperature, ignore_index, grad_scale=1.0
):
    # each tile of a row is loaded before its gradient is stored over it (one program per row)
    options = (divergence, param, temperature, ignore_index)
    out = _forward_with_grad(student, teacher, labels, options, student, grad_scale)
    torch.autograd.graph.increment_version(student)
    return out


def _backward_into(
    out, grad_loss, student, teacher, labels, stats, divergence, param, temperature, ignore_index
):
    _check_rows(student, teacher, labels)
    code, scalars, block, warps = _launch_setup(student, divergence, param, temperature)
    rows, vocab = student.shape
    grad_loss = grad_loss.to(stats.dtype)
    if rows > 0:
        _divergence_bwd_kernel[(rows,)](
            grad_loss, student, teacher, labels, stats, out, *scalars,
            vocab, student.stride(0), teacher.stride(0), out.stride(0), grad_loss.stride(0), ignore_index,
            DIV=code, HAS_LABELS=labels is not None, BLOCK=block, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def divergence_bwd_triton(grad_loss, student, teacher, labels, stats, *options):
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _backward_into(out, grad_loss, student, teacher, labels, stats, *options)
    return out


def divergence_bwd_triton_(grad_loss, student, teacher, labels, stats, *options):
    _backward_into(student, grad_loss, student, teacher, labels, stats, *options)
    torch.autograd.graph.increment_version(student)  # see divergence_bwd_inplace_cpu


def divergence_partial_triton(student, teacher, labels, divergence, param, temperature, ignore_index):
    _check_rows(student, teacher, labels)
    code, scalars, block, warps = _launch_setup(student, divergence, param, temperature)
    rows, vocab = student.shape
    parts = torch.empty(rows, NUM_PARTIALS, dtype=torch.float64, device=student.device)
    acc = tl.float64 if accumulate_dtype(student.dtype) == torch.float64 else tl.float32
    if rows > 0:
        _divergence_partial_kernel[(rows,)](
            student, teacher, labels, parts, scalars[0], scalars[1], vocab, student.stride(0),
            teacher.stride(0), ignore_index, DIV=code, HAS_LABELS=labels is not None, BLOCK=block, ACC=acc,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return parts


def divergence_finish_triton(partials, second, labels, divergence, param, ignore_index, dtype):
    shape_ok = partials.dim() == 3 and partials.shape[2] == NUM_PARTIALS
    torch._check(shape_ok, lambda: "partials must be [parts, rows, NUM_PARTIALS]")
    n_parts, rows = partials.shape[:2]
    partials = partials.contiguous()
    acc = accumulate_dtype(dtype)
    loss = torch.empty(rows, dtype=acc, device=partials.device)
    stats = torch.empty(rows, NUM_STATS, dtype=acc, device=partials.device)
    if rows > 0:
        code = DIVERGENCE_CODES[resolve_divergence(divergence, param)]
        _divergence_finish_kernel[(rows,)](
            partials, None if second is None else second.contiguous(), loss, stats, float(param),
            n_parts, rows, DIV=code, HAS_SECOND=second is not None, num_warps=1,
        )  # fmt: skip
    return loss, stats


def divergence_second_triton(student, teacher, labels, stats, divergence, param, temperature, ignore_index):
    _check_rows(student, teacher, labels)
    code, scalars, block, warps = _launch_setup(student, divergence, param, temperature)
    rows, vocab = student.shape
    out = torch.zeros(rows, 2, dtype=torch.float64, device=student.device)
    if rows > 0:
        _divergence_second_kernel[(rows,)](
            student, teacher, labels, stats, out, *scalars, vocab, student.stride(0), teacher.stride(0),
            ignore_index, DIV=code, HAS_LABELS=labels is not None, BLOCK=block, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return out


# The same schemas as the C++ ops, so one autograd formula and one set of fakes serve both.
_lib = torch.library.Library("fdistill", "FRAGMENT")
for _name, _schema, _impl in (
    ("divergence_fwd_triton", FWD_SCHEMA, divergence_fwd_triton),
    ("divergence_bwd_triton", BWD_SCHEMA, divergence_bwd_triton),
    ("divergence_bwd_triton_", BWD_INPLACE_SCHEMA, divergence_bwd_triton_),
    ("divergence_fwd_grad_triton", FWD_GRAD_SCHEMA, divergence_fwd_grad_triton),
    ("divergence_fwd_grad_triton_", FWD_GRAD_INPLACE_SCHEMA, divergence_fwd_grad_triton_),
    ("divergence_partial_triton", PARTIAL_SCHEMA, divergence_partial_triton),
    ("divergence_finish_triton", FINISH_SCHEMA, divergence_finish_triton),
    ("divergence_second_triton", SECOND_SCHEMA, divergence_second_triton),
):
    _lib.define(_name + _schema)
    for _key in ("CPU", "CUDA"):  # CPU tensors only under TRITON_INTERPRET=1 (checked by the caller)
        _lib.impl(_name, _impl, _key)
register_divergence_ops(
    "divergence_fwd_triton", "divergence_bwd_triton", "divergence_bwd_triton_", "divergence_fwd_grad_triton"
)
register_vocab_parallel_ops(
    "divergence_partial_triton", "divergence_finish_triton", "divergence_second_triton"
)

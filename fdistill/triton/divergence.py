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
    FWD_GRAD_INPLACE_SCHEMA,
    FWD_GRAD_SCHEMA,
    FWD_SCHEMA,
    accumulate_dtype,
    register_divergence_ops,
)
from ..reference import resolve_divergence
from .math import (
    ALPHA_LOG,
    ALPHA_STUDENT,
    DIVERGENCE_CODES,
    NUM_STATS,
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
def _divergence_fwd_kernel(
    S, T, LABELS, LOSS, STATS, GRAD,
    inv_t: tl.float64, param: tl.float64, log_wt: tl.float64, log_ws: tl.float64, grad_scale: tl.float64,
    V, stride_s, stride_t, stride_grad, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = LOSS.dtype.element_ty
    NEG_INF = float("-inf")
    alpha64 = tl.zeros([], tl.float64) + param  # DIV == 7: 1 - alpha and the loss need it unrounded
    inv_t, param, log_wt, log_ws = _scalars(inv_t, param, log_wt, log_ws, ACC)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    n_cols = V
    if HAS_LABELS:
        n_cols = tl.where(tl.load(LABELS + row) == ignore_index, 0, V)  # ignored: no pass at all
    offs = tl.arange(0, BLOCK)

    # pass 1: online log-sum-exps, and the sums of the one-pass divergences. Weighted terms use
    # (t - ref_t) - (s - ref_s), which stays small when the logits carry a large offset.
    # Each tile is reduced in the accumulation dtype (a tree: error ~ log2(BLOCK) ulp of the tile's
    # sum); only the running totals across tiles are float64, where at large logits one tile
    # dominates (1 in z, ~100s in w) and float32 totals would drop the rest. z: sums of exp(x - m);
    # w_s, w_t: sums of exp(s - m_s) ((s - ref_s) - (t - ref_t)) and exp(t - m_t) ((t - ref_t) - (s - ref_s)).
    F64: tl.constexpr = tl.float64
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
    log_sum_s = tl.log(z_s).to(ACC)
    log_sum_t = tl.log(z_t).to(ACC)
    lse_s = m_s + log_sum_s  # -inf for an all -inf row, NaN after a NaN or +inf logit
    lse_t = m_t + log_sum_t
    empty = (lse_s == NEG_INF) & (lse_t == NEG_INF)
    normal = _is_finite(lse_s) & _is_finite(lse_t)

    # pass 2: the divergences that need normalised log-probabilities
    loss2 = tl.zeros([], F64)
    aux2 = tl.zeros([], F64)
    if DIV == 3 or DIV == 4 or DIV == 5 or DIV == 6:
        for start in range(0, tl.where(normal, n_cols, 0), BLOCK):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            ls = (s - m_s) - log_sum_s
            lt = (t - m_t) - log_sum_t
            term, aux = second_pass_terms(ls, lt, tl.exp(ls), tl.exp(lt), param, log_wt, log_ws, DIV)
            loss2 += tl.sum(term, axis=0).to(F64)
            aux2 += tl.sum(aux, axis=0).to(F64)
    if DIV == 7:  # alpha in the Student / Teacher form: loss2 = A - 1, the sum of its expm1 terms
        form = alpha_form(param)  # from the rounded alpha, as the backward decides it
        one_minus = (1.0 - alpha64).to(ACC)
        for start in range(0, tl.where(normal & (form != ALPHA_LOG), n_cols, 0), BLOCK):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_t
            ls = (s - m_s) - log_sum_s
            lt = (t - m_t) - log_sum_t
            term = alpha_term(ls, lt, tl.exp(ls), tl.exp(lt), param, one_minus, form)
            loss2 += tl.sum(term, axis=0).to(F64)

    # Row scalars in float64 (a handful of operations per row, as the C++ kernels do), so that
    # constants such as c0 = KL + LSE(s) - LSE(t) are rounded once.
    # KL(p||q) = E_p[t - s] - LSE(t) + LSE(s), with both LSEs taken relative to the references
    lsum_s = tl.log(z_s)
    lsum_t = tl.log(z_t)
    lse_gap = ((m_t.to(F64) - ref_t.to(F64)) + lsum_t) - ((m_s.to(F64) - ref_s.to(F64)) + lsum_s)
    fkl = w_t / z_t - lse_gap
    rkl = w_s / z_s + lse_gap
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
    stats = STATS + row * 6
    tl.store(stats + 0, m_s)
    tl.store(stats + 1, log_sum_s)
    tl.store(stats + 2, m_t)
    tl.store(stats + 3, log_sum_t)
    tl.store(stats + 4, c0.to(ACC))
    tl.store(stats + 5, c1.to(ACC))
    if WRITE_GRAD:  # the one-pass op: the row's gradient right after its statistics
        g = ((tl.zeros([], F64) + grad_scale) * inv_t.to(F64)).to(ACC)
        _write_grad(
            s_row, t_row, GRAD + row * stride_grad, m_s, log_sum_s, m_t, log_sum_t,
            c0.to(ACC), c1.to(ACC), g, n_cols == 0,
            inv_t, param.to(ACC), log_wt, log_ws, V, DIV, BLOCK, ACC,
        )  # fmt: skip


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
    stats = STATS + row * 6
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


def divergence_fwd_grad_triton(
    student, teacher, labels, divergence, param, temperature, ignore_index, grad_scale=1.0
):
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    loss, stats = _forward(
        student, teacher, labels, divergence, param, temperature, ignore_index, grad, grad_scale
    )
    return loss, stats, grad


def divergence_fwd_grad_triton_(
    student, teacher, labels, divergence, param, temperature, ignore_index, grad_scale=1.0
):
    # each tile of a row is loaded before its gradient is stored over it (one program per row)
    out = _forward(
        student, teacher, labels, divergence, param, temperature, ignore_index, student, grad_scale
    )
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


# The same schemas as the C++ ops, so one autograd formula and one set of fakes serve both.
_lib = torch.library.Library("fdistill", "FRAGMENT")
for _name, _schema, _impl in (
    ("divergence_fwd_triton", FWD_SCHEMA, divergence_fwd_triton),
    ("divergence_bwd_triton", BWD_SCHEMA, divergence_bwd_triton),
    ("divergence_bwd_triton_", BWD_INPLACE_SCHEMA, divergence_bwd_triton_),
    ("divergence_fwd_grad_triton", FWD_GRAD_SCHEMA, divergence_fwd_grad_triton),
    ("divergence_fwd_grad_triton_", FWD_GRAD_INPLACE_SCHEMA, divergence_fwd_grad_triton_),
):
    _lib.define(_name + _schema)
    for _key in ("CPU", "CUDA"):  # CPU tensors only under TRITON_INTERPRET=1 (checked by the caller)
        _lib.impl(_name, _impl, _key)
register_divergence_ops(
    "divergence_fwd_triton", "divergence_bwd_triton", "divergence_bwd_triton_", "divergence_fwd_grad_triton"
)

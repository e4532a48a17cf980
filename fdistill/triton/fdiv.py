"""Triton kernels of the f-softargmax, f-softmax and Fenchel–Young losses (Roulet et al. 2025),
registered as ``torch.ops.fdistill.fdiv_fwd_triton`` / ``fdiv_bwd_triton``.

The op contract is the C++ one (``fdiv_fwd`` / ``fdiv_bwd`` in csrc/bindings.cpp, FDivArgs in
csrc/include/fdistill/fdiv_args.h), argument for argument. Per row of ``[rows, V]`` logits,
``theta = logits / T`` and ``x = theta - max theta``; ``tau`` solves
``S0(tau) = sum_j q_j (f*)'(x_j - tau) = 1`` (the safeguarded Newton search of ``tau_step``; KL in
closed form: ``tau = 0`` and ``S0 = sum_j q_j exp(x_j)``, as the C++ kernels), then
``p_j = q_j (f*)'(x_j - tau) / S0``:

* mode 0: ``out = p`` ``[rows, V]`` in the logits' dtype;
* mode 1: ``out[row]`` = FY loss ``sum_j fy_entry(x_j, p_j, y_j, q_j)``, y the target
  probabilities or one-hot labels (``ignore_index`` rows: loss 0, stats ``[0, 0, 1]``);
* mode 2: ``out[row]`` = f-softmax value ``m + sum_j (p_j x_j - q f(p_j / q_j))``.

``stats [rows, 3] = [max theta, t, S0]`` (accumulation dtype; t = tau, tau + the pole of (f*)' for
reverse KL and JS, r = log(1 - (alpha - 1) tau) for the general alpha: fdiv_math.py ``start_tau_search``,
``sweep_point``) let the backward
``grad_rows / T * (p - y)`` recompute ``p`` without saving anything of size ``[rows, V]``.

One program per row walks the vocabulary in tiles of ``BLOCK`` entries: pass 1 finds the max (and
q at its first argmax, and the total q of the entries that are not -inf, for the bracket), then
each solver sweep is one read-only pass reducing S0 and S1 (tiles in the accumulation dtype,
totals in float64), then one output pass. The
solver's row scalars are float64; tiles are evaluated at t rounded to the accumulation dtype,
which is the t stored in the statistics, so the backward recomputes the same p. Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fdiv_ops import (
    FDIV_BWD_SCHEMA,
    FDIV_FWD_SCHEMA,
    FDIV_SHARD_SCHEMA,
    MODE_FY,
    MODE_SOFTARGMAX,
    NUM_FDIV_STATS,
    SHARD_PROBS,
    SHARD_SUMS,
    SOFTARGMAX_BWD_OP,
    SOFTARGMAX_BWD_SCHEMA,
    register_fdiv_ops,
    register_shard_op,
    register_softargmax_bwd_op,
)
from ..ops import accumulate_dtype
from .fdiv_math import (
    conj_grad_at,
    conj_grads_at,
    f_at_zero,
    fcoef,
    fy_entry,
    jacobian_weight,
    newton_power,
    q_f,
    resolve_f,
    start_tau_search,
    sweep_point,
    tau_step,
)
from .tiles import FDIV_TILE, tiling

# How the FY target is given (a constexpr of the kernels)
NO_TARGET, PROB_TARGET, LABEL_TARGET = 0, 1, 2


@triton.jit
def _load_params(inv_t, alpha, inv_am1, ref_value, tol, ACC: tl.constexpr):
    """The float64 kernel arguments [1/T, alpha, 1/(alpha - 1), reference_value, tol] as float64
    scalars (``zeros + x``: the interpreter passes Python floats), 1/T in the accumulation dtype."""
    zero = tl.zeros([], tl.float64)
    return (zero + inv_t).to(ACC), zero + alpha, zero + inv_am1, zero + ref_value, zero + tol


@triton.jit
def _tile_probs(l_row, q_row, cols, mask, inv_t, m, pt_t, pt_k, pt_m, inv_s0, ref_value, alpha_m1, inv_am1,
                F: tl.constexpr, HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """(x, q, p) of a tile: x = theta - max, p = q (f*)'(x - tau) / S0 at the sweep point (pt_t, pt_k, pt_m)
    (forward output and backward alike)."""
    x = _load_theta(l_row, cols, mask, inv_t, ACC) - m
    q = _load_q(q_row, cols, mask, ref_value, HAS_REF, ACC, BLOCK)
    return x, q, q * conj_grad_at(x, pt_t, pt_k, pt_m, alpha_m1, inv_am1, F) * inv_s0


@triton.jit
def _row_pointers(LOGITS, REF, TARGET, row, stride_l, stride_q, stride_y,
                  HAS_REF: tl.constexpr, TARGET_KIND: tl.constexpr):  # fmt: skip
    """The row's logits, reference and target pointers (the last two unread when absent)."""
    l_row = LOGITS + row * stride_l
    q_row = l_row
    y_row = l_row
    if HAS_REF:
        q_row = REF + row * stride_q
    if TARGET_KIND == 1:
        y_row = TARGET + row * stride_y
    return l_row, q_row, y_row


@triton.jit
def _load_theta(l_row, cols, mask, inv_t, ACC: tl.constexpr):
    """theta = logits / T: converted to the accumulation dtype first (fp16 / bf16), -inf off the row."""
    return tl.load(l_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t


@triton.jit
def _load_q(q_row, cols, mask, ref_value, HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """q of a tile: the reference tensor (accumulation dtype), or the constant reference_value."""
    if HAS_REF:
        q = tl.load(q_row + cols, mask=mask, other=1.0).to(ACC)
    else:
        q = tl.full([BLOCK], 0.0, ACC) + ref_value.to(ACC)
    return q


@triton.jit
def _load_y(y_row, cols, mask, label, ACC: tl.constexpr, TARGET: tl.constexpr, BLOCK: tl.constexpr):
    """The FY target of a tile: probabilities (any float dtype), a one-hot label, or 0 (mode 2)."""
    if TARGET == 1:
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(ACC)
    elif TARGET == 2:
        y = tl.where(cols == label, 1.0, 0.0).to(ACC)
    else:
        y = tl.zeros([BLOCK], ACC)
    return y


@triton.jit
def _sums(l_row, q_row, n_cols, V, m, pt_t, pt_k, pt_m, inv_t, ref_value, alpha_m1, inv_am1,
          F: tl.constexpr, HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One sweep over the row at a sweep point: S0 = sum q (f*)'(x - tau) and S1 = sum q (f*)''(x - tau)
    (S1' for the general alpha; S1 only where Newton needs it): each tile reduced in the accumulation
    dtype, the totals across tiles in float64."""
    s0 = tl.zeros([], tl.float64)
    s1 = tl.zeros([], tl.float64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < V
        x = _load_theta(l_row, cols, mask, inv_t, ACC) - m
        q = _load_q(q_row, cols, mask, ref_value, HAS_REF, ACC, BLOCK)
        if F == 0:
            s0 += tl.sum(q * conj_grad_at(x, pt_t, pt_k, pt_m, alpha_m1, inv_am1, F), axis=0).to(tl.float64)
        else:
            d1, d2 = conj_grads_at(x, pt_t, pt_k, pt_m, alpha_m1, inv_am1, F)
            s0 += tl.sum(q * d1, axis=0).to(tl.float64)
            s1 += tl.sum(q * d2, axis=0).to(tl.float64)
    return s0, s1


@triton.jit
def _fdiv_fwd_kernel(
    LOGITS, REF, TARGET, LABELS, OUT, STATS,
    inv_t: tl.float64, alpha: tl.float64, inv_am1: tl.float64, ref_value: tl.float64, tol: tl.float64,
    V, stride_l, stride_q, stride_y, stride_out, ignore_index, max_sweeps,
    F: tl.constexpr, MODE: tl.constexpr, HAS_REF: tl.constexpr, TARGET_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = STATS.dtype.element_ty
    F64: tl.constexpr = tl.float64
    NEG_INF = float("-inf")
    NAN = float("nan")
    inv_t, alpha64, inv_am1_64, ref_value, tol = _load_params(inv_t, alpha, inv_am1, ref_value, tol, ACC)
    alpha = alpha64.to(ACC)
    alpha_m1 = (alpha64 - 1.0).to(ACC)
    inv_am1 = inv_am1_64.to(ACC)
    l_row, q_row, y_row = _row_pointers(LOGITS, REF, TARGET, row, stride_l, stride_q, stride_y,
                                        HAS_REF, TARGET_KIND)  # fmt: skip
    offs = tl.arange(0, BLOCK)

    label = tl.zeros([], tl.int64)
    ignored = tl.zeros([], tl.int1)
    label_ok = tl.full([], 1, tl.int1)
    if TARGET_KIND == 2:
        label = tl.load(LABELS + row)
        ignored = label == ignore_index
        label_ok = (label >= 0) & (label < V)  # out of range: NaN loss (as the CPU kernels)
    n_cols = tl.where(ignored, 0, V)  # ignored rows read nothing

    # pass 1: max theta, its first argmax, NaN / +inf, and the total q over entries that are not -inf (and
    # their q-weighted sum of theta: Jensen's start of the search)
    m = tl.full([], NEG_INF, ACC)
    arg = tl.zeros([], tl.int32)
    has_nan = tl.zeros([], tl.int1)
    q_total = tl.zeros([], F64)
    q_theta = tl.zeros([], F64)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < V
        theta = _load_theta(l_row, cols, mask, inv_t, ACC)
        has_nan = has_nan | (tl.max((theta != theta).to(tl.int32), axis=0) > 0)
        tile_max = tl.max(theta, axis=0)
        tile_arg = tl.argmax(theta, axis=0)  # the first on ties
        raise_max = tile_max > m
        arg = tl.where(raise_max, start + tile_arg, arg)
        m = tl.where(raise_max, tile_max, m)
        if F != 0 or MODE == 2:  # the bracket; and the f-softmax value's sum of q f(0)
            finite = theta > NEG_INF
            if HAS_REF:  # noqa: SIM108  (a constexpr branch)
                q = tl.load(q_row + cols, mask=mask, other=0.0).to(ACC)
            else:
                q = tl.full([BLOCK], 1.0, ACC)  # (times reference_value below)
            q_total += tl.sum(tl.where(finite, q, 0.0), axis=0).to(F64)
            q_theta += tl.sum(tl.where(finite, q.to(F64) * theta.to(F64), 0.0), axis=0)  # (x_mean: m - m)
    m = tl.where(has_nan, NAN, m)  # the max of a row with a NaN is NaN; +inf with a +inf
    x_mean = q_theta / q_total - m.to(F64)
    if HAS_REF:
        q_max = tl.load(q_row + arg).to(F64)
    else:
        q_max = ref_value
        q_total = q_total * ref_value
    empty = (m == NEG_INF) & ~ignored  # all -inf: p = 0, loss 0, value -inf, stats [-inf, 0, 1]
    active = (m > NEG_INF) & (m < float("inf"))  # False for NaN / +inf rows (NaN out) and ignored rows
    m_row = m  # for the statistics
    if ACC == tl.float64:  # noqa: SIM300  (the resolution of x - tau (tau_step's smallest Newton step))
        EPS = tl.full([], 2.220446049250313e-16, F64)
    else:
        EPS = tl.full([], 1.1920928955078125e-07, F64)
    m = tl.where(active, m, 0.0)  # inactive rows evaluate nothing below (no -inf - -inf)

    # tau, and S0 at tau: KL in one sweep (tau = 0, S0 = sum q exp(x)); otherwise the safeguarded
    # Newton search from the left end of the bracket, at most max_sweeps evaluations
    if F == 0:
        zero_acc = tl.zeros([], ACC)
        s0, s1 = _sums(l_row, q_row, tl.where(active, V, 0), V, m, zero_acc, zero_acc, zero_acc, inv_t,
                       ref_value, alpha_m1, inv_am1, F, HAS_REF, ACC, BLOCK)  # fmt: skip
        tau = tl.zeros([], F64)
    else:
        lo, hi, lo0 = start_tau_search(q_max, q_total, x_mean, alpha64, inv_am1_64, F)
        c = newton_power(alpha64, F)
        # the answer: the evaluated point with S0 nearest 1 (C++ TauSearch::best_t: S0 may jump over 1)
        tau = lo
        s0 = tl.full([], float("nan"), F64)  # none yet
        nxt = lo  # the next point to evaluate
        sweeps = tl.zeros([], tl.int32)
        done = (~active).to(tl.int32)
        while done == 0:
            pt_t, pt_k, pt_m = sweep_point(nxt, alpha64, inv_am1_64, ACC, F)
            s0_now, s1 = _sums(l_row, q_row, V, V, m, pt_t, pt_k, pt_m, inv_t, ref_value, alpha_m1, inv_am1,
                               F, HAS_REF, ACC, BLOCK)  # fmt: skip
            sweeps += 1
            better = (s0 != s0) | (tl.abs(s0_now - 1.0) <= tl.abs(s0 - 1.0))  # a NaN only if first
            tau = tl.where(better, nxt, tau)
            s0 = tl.where(better, s0_now, s0)
            stop, nxt, lo, hi = tau_step(nxt, lo, hi, lo0, s0_now, s1, c, tol, EPS, F)
            done = (stop | (sweeps >= max_sweeps)).to(tl.int32)
    tau_acc = tl.where(active, tau, 0.0).to(ACC)
    pt_t, pt_k, pt_m = sweep_point(tau_acc.to(F64), alpha64, inv_am1_64, ACC, F)
    s0_acc = tl.where(active, s0, 1.0).to(ACC)
    inv_s0 = (1.0 / s0_acc.to(F64)).to(ACC)  # from the stored S0, as the backward

    # the statistics [m, tau, S0]: [-inf, 0, 1] for an all -inf row, [0, 0, 1] for an ignored one,
    # [m, m, m] for a row with a NaN (m = NaN) or a +inf (m = +inf)
    stats = STATS + row * 3
    bad = ~active & ~empty & ~ignored
    tl.store(stats + 0, tl.where(ignored, 0.0, m_row).to(ACC))
    tl.store(stats + 1, tl.where(bad, m_row, tau_acc).to(ACC))
    tl.store(stats + 2, tl.where(bad, m_row, s0_acc).to(ACC))

    # output pass
    n_eval = tl.where(active, V, 0)
    if MODE == 0:
        fill = tl.where(bad, NAN, 0.0)
        o_row = OUT + row * stride_out
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            load = cols < n_eval
            x, q, p = _tile_probs(l_row, q_row, cols, load, inv_t, m, pt_t, pt_k, pt_m, inv_s0, ref_value,
                                  alpha_m1, inv_am1, F, HAS_REF, ACC, BLOCK)  # fmt: skip
            p = tl.where(active, p, fill)
            tl.store(o_row + cols, p.to(OUT.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([], F64)
        for start in range(0, n_eval, BLOCK):
            cols = start + offs
            mask = cols < V
            x, q, p = _tile_probs(l_row, q_row, cols, mask, inv_t, m, pt_t, pt_k, pt_m, inv_s0, ref_value,
                                  alpha_m1, inv_am1, F, HAS_REF, ACC, BLOCK)  # fmt: skip
            if MODE == 1:
                y = _load_y(y_row, cols, mask, label, ACC, TARGET_KIND, BLOCK)
                term = fy_entry(x, p, y, q, alpha, inv_am1, F)
            else:  # the entries that are not -inf: p x - [q f(p/q) - q f(0)]; q f(0) taken off below
                term = tl.where(x == NEG_INF, 0.0, p * x - q_f(p, q, alpha, inv_am1, F))
            total += tl.sum(tl.where(mask, term, 0.0), axis=0).to(F64)
        if MODE == 1:
            result = tl.where(active, tl.where(label_ok, total, NAN), tl.where(bad, NAN, 0.0))
        else:
            value = m.to(F64) + total - f_at_zero(alpha64, F) * q_total
            result = tl.where(active, value, tl.where(bad, NAN, NEG_INF))
        tl.store(OUT + row, result.to(OUT.dtype.element_ty))


@triton.jit
def _fdiv_bwd_kernel(
    GRAD_ROWS, LOGITS, REF, TARGET, LABELS, STATS, GRAD,
    inv_t: tl.float64, alpha: tl.float64, inv_am1: tl.float64, ref_value: tl.float64, tol: tl.float64,
    V, stride_gr, stride_l, stride_q, stride_y, stride_g, ignore_index,
    F: tl.constexpr, HAS_REF: tl.constexpr, TARGET_KIND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = STATS.dtype.element_ty
    inv_t, alpha64, inv_am1_64, ref_value, tol = _load_params(inv_t, alpha, inv_am1, ref_value, tol, ACC)
    alpha_m1 = (alpha64 - 1.0).to(ACC)
    inv_am1 = inv_am1_64.to(ACC)
    stats = STATS + row * 3
    m = tl.load(stats + 0)
    pt_t, pt_k, pt_m = sweep_point(tl.load(stats + 1).to(tl.float64), alpha64, inv_am1_64, ACC, F)
    inv_s0 = (1.0 / tl.load(stats + 2).to(tl.float64)).to(ACC)
    g = tl.load(GRAD_ROWS + row * stride_gr).to(ACC) * inv_t
    label = tl.zeros([], tl.int64)
    # zero rows: ignored, all -inf, or a zero upstream gradient (except NaN rows); NaN rows: the
    # stats of a row with a NaN or +inf logit (m = NaN or +inf), or a label out of range
    zero = (m == float("-inf")) | ((g == 0.0) & (m == m))
    bad = ~((m < float("inf")) & (m == m))
    if TARGET_KIND == 2:
        label = tl.load(LABELS + row)
        zero = zero | (label == ignore_index)
        bad = bad | (label < 0) | (label >= V)
    fill = tl.where(zero, 0.0, float("nan"))
    compute = ~zero & ~bad
    m = tl.where(compute, m, 0.0)
    l_row, q_row, y_row = _row_pointers(LOGITS, REF, TARGET, row, stride_l, stride_q, stride_y,
                                        HAS_REF, TARGET_KIND)  # fmt: skip
    g_row = GRAD + row * stride_g
    offs = tl.arange(0, BLOCK)
    n_load = tl.where(compute, V, 0)  # rows not computed read nothing
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        load = cols < n_load
        _, _, p = _tile_probs(l_row, q_row, cols, load, inv_t, m, pt_t, pt_k, pt_m, inv_s0, ref_value,
                              alpha_m1, inv_am1, F, HAS_REF, ACC, BLOCK)  # fmt: skip
        y = _load_y(y_row, cols, load, label, ACC, TARGET_KIND, BLOCK)
        grad = tl.where(compute, (p - y) * g, fill)
        tl.store(g_row + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _fdiv_shard_kernel(
    LOGITS, REF, STATS, OUT,
    inv_t: tl.float64, alpha: tl.float64, inv_am1: tl.float64, ref_value: tl.float64,
    V, stride_l, stride_q, stride_out,
    F: tl.constexpr, MODE: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """fdiv_shard (C++ fdiv_shard_rows): a vocabulary shard at the given stats [m, t, S0] (m the max theta of
    the whole row). MODE 0: the shard's [S0, S1] at t (float64); 1: p. Rows whose m is not finite give 0."""
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = STATS.dtype.element_ty
    inv_t, alpha64, inv_am1_64, ref_value, no_tol = _load_params(inv_t, alpha, inv_am1, ref_value, 0.0, ACC)
    alpha_m1 = (alpha64 - 1.0).to(ACC)
    inv_am1 = inv_am1_64.to(ACC)
    stats = STATS + row * 3
    m = tl.load(stats + 0)
    active = (m > float("-inf")) & (m < float("inf"))
    m = tl.where(active, m, 0.0)
    pt_t, pt_k, pt_m = sweep_point(tl.load(stats + 1).to(tl.float64), alpha64, inv_am1_64, ACC, F)
    l_row, q_row, y_row = _row_pointers(LOGITS, REF, LOGITS, row, stride_l, stride_q, 0, HAS_REF, 0)
    n_eval = tl.where(active, V, 0)  # rows not computed read nothing (y_row: unread)
    if MODE == 0:
        s0, s1 = _sums(l_row, q_row, n_eval, V, m, pt_t, pt_k, pt_m, inv_t, ref_value, alpha_m1, inv_am1,
                       F, HAS_REF, ACC, BLOCK)  # fmt: skip
        tl.store(OUT + row * stride_out, s0)
        tl.store(OUT + row * stride_out + 1, s1)
    else:
        inv_s0 = (1.0 / tl.load(stats + 2).to(tl.float64)).to(ACC)
        offs = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            cols = start + offs
            load = cols < n_eval
            _, _, p = _tile_probs(l_row, q_row, cols, load, inv_t, m, pt_t, pt_k, pt_m, inv_s0, ref_value,
                                  alpha_m1, inv_am1, F, HAS_REF, ACC, BLOCK)  # fmt: skip
            tl.store(OUT + row * stride_out + cols, tl.where(active, p, 0.0).to(ACC), mask=cols < V)


@triton.jit
def _softargmax_bwd_kernel(
    GRAD, P, REF, OUT, alpha: tl.float64, inv_t: tl.float64, ref_value: tl.float64,
    V, stride_g, stride_p, stride_q, stride_out,
    F: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """f-softargmax's backward (C++ fdiv_softargmax_backward_rows): w (g - <w, g> / sum w) / T from the saved
    p* and the incoming g, w = jacobian_weight, g taken relative to g* at the largest w (where one entry
    holds most of the weight, g* - <w, g> / sum w cancels; sum w (g - g*) / sum w does not). Three passes:
    the largest w and its g, the two sums (float64 totals), the output."""
    row = tl.program_id(0).to(tl.int64)
    zero = tl.zeros([], tl.float64)
    alpha64 = zero + alpha
    two_minus_alpha = (2.0 - alpha64).to(ACC)
    alpha_m1 = (alpha64 - 1.0).to(ACC)
    ref_value = zero + ref_value
    g_row = GRAD + row * stride_g
    p_row = P + row * stride_p
    q_row = p_row  # (unread without a reference)
    if HAS_REF:
        q_row = REF + row * stride_q
    offs = tl.arange(0, BLOCK)
    top = tl.zeros([], ACC)
    g_star = tl.zeros([], ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        p = tl.maximum(tl.load(p_row + cols, mask=mask, other=0.0).to(ACC), 0.0)
        q = _load_q(q_row, cols, mask, ref_value, HAS_REF, ACC, BLOCK)
        w = jacobian_weight(p, q, two_minus_alpha, alpha_m1, F)
        tile_top = tl.max(w, axis=0)
        at = tl.argmax(w, axis=0)  # the first on ties
        g_at = tl.sum(tl.where(offs == at, tl.load(g_row + cols, mask=mask, other=0.0).to(ACC), 0.0), axis=0)
        raise_top = tile_top > top
        g_star = tl.where(raise_top, g_at, g_star)
        top = tl.maximum(top, tile_top)
    total = tl.zeros([], tl.float64)
    weighted = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        p = tl.maximum(tl.load(p_row + cols, mask=mask, other=0.0).to(ACC), 0.0)
        q = _load_q(q_row, cols, mask, ref_value, HAS_REF, ACC, BLOCK)
        w = jacobian_weight(p, q, two_minus_alpha, alpha_m1, F)
        dg = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC) - g_star  # NaN / inf g: the NaN row
        total += tl.sum(w, axis=0).to(tl.float64)
        weighted += tl.sum(tl.where(mask, w * dg, 0.0), axis=0).to(tl.float64)
    mean = tl.where(total > 0.0, weighted / tl.where(total > 0.0, total, 1.0), 0.0).to(ACC)
    scale = (zero + inv_t).to(ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        p = tl.maximum(tl.load(p_row + cols, mask=mask, other=0.0).to(ACC), 0.0)
        q = _load_q(q_row, cols, mask, ref_value, HAS_REF, ACC, BLOCK)
        w = jacobian_weight(p, q, two_minus_alpha, alpha_m1, F)
        dg = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC) - g_star
        tl.store(OUT + row * stride_out + cols, (w * (dg - mean) * scale).to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


FP_FUSION = False  # theta = logit / T rounded before the max shift (as the C++ kernels)


def _params(f, alpha, reference_value, temperature, tol) -> tuple[float, ...]:
    """(1/T, alpha, 1/(alpha - 1), reference_value, tol): float64 kernel arguments, no device copy."""
    a, inv_am1 = fcoef(f, alpha)
    return 1.0 / temperature, float(a), float(inv_am1), float(reference_value), float(tol)


def _check_common(logits, reference, target, labels, f, alpha, reference_value, temperature, mode):
    """The C++ make_fdiv_args checks; returns (F code, target kind)."""
    if logits.dim() != 2:
        raise ValueError(f"fdistill: logits must be [rows, vocab], got {tuple(logits.shape)}")
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError("fdistill: logits must have unit stride along the vocabulary")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"fdistill: temperature must be > 0, got {temperature}")
    if mode not in (0, 1, 2):
        raise ValueError(f"fdistill: mode must be 0, 1 or 2, got {mode}")
    code = resolve_f(f, alpha)
    rows, vocab = logits.shape
    acc = accumulate_dtype(logits.dtype)
    if reference is not None:
        ok = reference.dim() == 2 and reference.shape[1] == vocab
        ok = ok and (reference.shape[0] == rows or reference.stride(0) == 0)
        if not ok:
            raise ValueError(
                "fdistill: reference must be [rows, vocab] (row stride 0 to share one row), "
                f"got {tuple(reference.shape)}"
            )
        if reference.stride(1) != 1 and vocab > 1:
            raise ValueError("fdistill: reference must have unit stride along the vocabulary")
        if reference.dtype != acc:
            raise TypeError(f"fdistill: reference must be {acc}, got {reference.dtype}")
    elif not (reference_value > 0 and reference_value < float("inf")):
        raise ValueError(f"fdistill: reference_value must be > 0, got {reference_value}")
    kind = NO_TARGET
    if target is not None:
        if mode != MODE_FY:
            raise ValueError("fdistill: target is only read by the FY loss (mode 1)")
        if target.shape != logits.shape:
            shapes = f"{tuple(target.shape)} and logits {tuple(logits.shape)}"
            raise ValueError(f"fdistill: target {shapes} shapes differ")
        if target.stride(1) != 1 and vocab > 1:
            raise ValueError("fdistill: target must have unit stride along the vocabulary")
        kind = PROB_TARGET
    if labels is not None:
        if mode != MODE_FY or target is not None:
            raise ValueError("fdistill: labels are an FY-loss target (mode 1), exclusive with target")
        if labels.shape != (rows,):
            raise ValueError(f"fdistill: labels must be [{rows}], got {tuple(labels.shape)}")
        if labels.dtype != torch.int64:
            raise TypeError(f"fdistill: labels must be int64, got {labels.dtype}")
        kind = LABEL_TARGET
    if mode == MODE_FY and kind == NO_TARGET:
        raise ValueError("fdistill: the FY loss (mode 1) needs a target or labels")
    return code, kind


def fdiv_fwd_triton(
    logits,
    reference,
    target,
    labels,
    f,
    alpha,
    reference_value,
    temperature,
    ignore_index,
    max_sweeps,
    tol,
    mode,
):
    code, kind = _check_common(
        logits, reference, target, labels, f, alpha, reference_value, temperature, mode
    )
    if max_sweeps < 1:
        raise ValueError(f"fdistill: max_sweeps must be >= 1, got {max_sweeps}")
    if not tol >= 0:
        raise ValueError(f"fdistill: tol must be >= 0, got {tol}")
    rows, vocab = logits.shape
    acc = accumulate_dtype(logits.dtype)
    if mode == MODE_SOFTARGMAX:
        out = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    else:
        out = torch.empty(rows, dtype=acc, device=logits.device)
    stats = torch.empty((rows, NUM_FDIV_STATS), dtype=acc, device=logits.device)
    if rows > 0:
        block, warps = tiling(vocab, logits.dtype, FDIV_TILE)
        params = _params(f, alpha, reference_value, temperature, tol)
        labels = labels.contiguous() if labels is not None else None
        _fdiv_fwd_kernel[(rows,)](
            logits, reference, target, labels, out, stats, *params,
            vocab, logits.stride(0), 0 if reference is None else reference.stride(0),
            0 if target is None else target.stride(0), out.stride(0), ignore_index, max_sweeps,
            F=code, MODE=mode, HAS_REF=reference is not None, TARGET_KIND=kind, BLOCK=block,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return out, stats


def fdiv_bwd_triton(
    grad_rows,
    logits,
    reference,
    target,
    labels,
    stats,
    f,
    alpha,
    reference_value,
    temperature,
    ignore_index,
    mode,
):
    code, kind = _check_common(
        logits, reference, target, labels, f, alpha, reference_value, temperature, mode
    )
    if mode == MODE_SOFTARGMAX:
        raise ValueError("fdistill: fdiv_bwd is the backward of the FY loss and f-softmax (modes 1, 2)")
    rows, vocab = logits.shape
    acc = accumulate_dtype(logits.dtype)
    if grad_rows.shape != (rows,):
        raise ValueError(f"fdistill: grad_rows must be [{rows}], got {tuple(grad_rows.shape)}")
    if stats.shape != (rows, NUM_FDIV_STATS) or not stats.is_contiguous():
        raise ValueError(f"fdistill: stats must be a contiguous [{rows}, {NUM_FDIV_STATS}] tensor")
    if stats.dtype != acc:
        raise TypeError(f"fdistill: stats must be {acc}")
    grad = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    if rows > 0:
        block, warps = tiling(vocab, logits.dtype, FDIV_TILE)
        params = _params(f, alpha, reference_value, temperature, 0.0)
        grad_rows = grad_rows.to(acc)
        labels = labels.contiguous() if labels is not None else None
        _fdiv_bwd_kernel[(rows,)](
            grad_rows, logits, reference, target, labels, stats, grad, *params,
            vocab, grad_rows.stride(0), logits.stride(0), 0 if reference is None else reference.stride(0),
            0 if target is None else target.stride(0), grad.stride(0), ignore_index,
            F=code, HAS_REF=reference is not None, TARGET_KIND=kind, BLOCK=block,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return grad


def fdiv_shard_triton(logits, reference, stats, f, alpha, reference_value, temperature, mode):
    code, _ = _check_common(
        logits, reference, None, None, f, alpha, reference_value, temperature, MODE_SOFTARGMAX
    )
    if mode not in (SHARD_SUMS, SHARD_PROBS):
        raise ValueError(f"fdistill: fdiv_shard mode must be 0 (sums) or 1 (probabilities), got {mode}")
    rows, vocab = logits.shape
    acc = accumulate_dtype(logits.dtype)
    if stats.shape != (rows, NUM_FDIV_STATS) or not stats.is_contiguous():
        raise ValueError(f"fdistill: stats must be a contiguous [{rows}, {NUM_FDIV_STATS}] tensor")
    if stats.dtype != acc:
        raise TypeError(f"fdistill: stats must be {acc}")
    if mode == SHARD_SUMS:
        out = torch.empty((rows, 2), dtype=torch.float64, device=logits.device)
    else:
        out = torch.empty((rows, vocab), dtype=acc, device=logits.device)
    if rows > 0:
        block, warps = tiling(vocab, logits.dtype, FDIV_TILE)
        inv_t, a, inv_am1, ref_value, _ = _params(f, alpha, reference_value, temperature, 0.0)
        _fdiv_shard_kernel[(rows,)](
            logits, reference, stats, out, inv_t, a, inv_am1, ref_value,
            vocab, logits.stride(0), 0 if reference is None else reference.stride(0), out.stride(0),
            F=code, MODE=mode, HAS_REF=reference is not None, BLOCK=block,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return out


def fdiv_softargmax_bwd_triton(grad, p, reference, f, alpha, reference_value, temperature):
    code, _ = _check_common(p, reference, None, None, f, alpha, reference_value, temperature, MODE_SOFTARGMAX)
    if grad.shape != p.shape or (grad.stride(-1) != 1 and p.shape[1] > 1):
        raise ValueError(f"fdistill: grad must be {tuple(p.shape)} with unit stride along the vocabulary")
    if grad.dtype != p.dtype or grad.device != p.device:
        raise TypeError(f"fdistill: grad must be {p.dtype} on {p.device}")
    rows, vocab = p.shape
    out = torch.empty_like(p)
    if rows > 0:
        block, warps = tiling(vocab, p.dtype, FDIV_TILE)
        a, _ = fcoef(f, alpha)
        _softargmax_bwd_kernel[(rows,)](
            grad, p, reference, out, float(a), 1.0 / temperature, float(reference_value),
            vocab, grad.stride(0), p.stride(0), 0 if reference is None else reference.stride(0),
            out.stride(0), F=code, HAS_REF=reference is not None, BLOCK=block,
            ACC=tl.float64 if p.dtype == torch.float64 else tl.float32, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return out


# The same schemas as the C++ ops fdiv_fwd / fdiv_bwd, so one set of fakes and one autograd
# formula (fdistill/fdiv_ops.py) serve both.
_lib = torch.library.Library("fdistill", "FRAGMENT")
for _name, _schema, _impl in (
    ("fdiv_fwd_triton", FDIV_FWD_SCHEMA, fdiv_fwd_triton),
    ("fdiv_bwd_triton", FDIV_BWD_SCHEMA, fdiv_bwd_triton),
    ("fdiv_shard_triton", FDIV_SHARD_SCHEMA, fdiv_shard_triton),
    (SOFTARGMAX_BWD_OP + "_triton", SOFTARGMAX_BWD_SCHEMA, fdiv_softargmax_bwd_triton),
):
    _lib.define(_name + _schema)
    for _key in ("CPU", "CUDA"):  # CPU tensors only under TRITON_INTERPRET=1 (checked by the caller)
        _lib.impl(_name, _impl, _key)
register_fdiv_ops("fdiv_fwd_triton", "fdiv_bwd_triton")
register_shard_op("fdiv_shard_triton")
register_softargmax_bwd_op(SOFTARGMAX_BWD_OP + "_triton")


def fdiv_forward_op():
    """torch.ops.fdistill.fdiv_fwd_triton (the C++ fdiv_fwd schema)."""
    return torch.ops.fdistill.fdiv_fwd_triton


def fdiv_backward_op():
    """torch.ops.fdistill.fdiv_bwd_triton (the C++ fdiv_bwd schema)."""
    return torch.ops.fdistill.fdiv_bwd_triton

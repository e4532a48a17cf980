"""The divergence math on the Triton side: the formulas of csrc/include/fdistill/divergence_math.h.

Notation per row: ``s``, ``t`` are logits already divided by the temperature; ``ds = s - max(s)``,
``dt = t - max(t)``; ``ls``, ``lt`` the log-probabilities; ``q = exp(ls)`` the student,
``p = exp(lt)`` the teacher. Every function works on a tile (a block of vocabulary entries) in the
accumulation dtype. ``DIV`` is a ``tl.constexpr`` code from :data:`DIVERGENCE_CODES`, so each
divergence compiles to its own specialised kernel from one source.

Row statistics (``ROW_STATS`` = ``fdistill.ops.NUM_STATS`` per row, as the C++ kernels):
``[max s, log-sum s, max t, log-sum t, c0, c1]`` with ``c0``, ``c1`` as documented for ``kNumStats``
in the C++ header.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import ops as _ops

DIVERGENCE_CODES = {
    "forward_kl": 0,
    "reverse_kl": 1,
    "jeffreys": 2,
    "jsd": 3,
    "skew_kl": 4,
    "skew_reverse_kl": 5,
    "tv": 6,
    "alpha": 7,
}
# the op contract (fdistill/ops.py: NUM_STATS, NUM_PARTIALS) as constexprs that kernels can read
ROW_STATS = tl.constexpr(_ops.NUM_STATS)
ROW_PARTIALS = tl.constexpr(_ops.NUM_PARTIALS)
# alpha_form codes, as the C++ AlphaForm
ALPHA_STUDENT = tl.constexpr(0)
ALPHA_TEACHER = tl.constexpr(1)
ALPHA_LOG = tl.constexpr(2)


@triton.jit
def weighted(w, a, b):
    """w * (a - b), exactly 0 where the weight w is 0 (never 0 * inf)."""
    return tl.where(w > 0, w * (a - b), 0.0)


@triton.jit
def diff_error(a, b, d):
    """The rounding error of d = a - b (Knuth's two-sum: a - b = d + error exactly), 0 where d is
    infinite or NaN (the error term would be NaN)."""
    b_seen = a - d
    a_seen = d + b_seen
    err = (a - a_seen) - (b - b_seen)
    return tl.where(tl.abs(d) < float("inf"), err, 0.0)


@triton.jit
def exact_gap(s, t, ds, dt, m_s, m_t, k_hi, k_lo):
    """(ds - dt) - (k_hi + k_lo), ds = s - m_s, dt = t - m_t, rounded once where the result is small.

    ds - dt is formed exactly as a float pair (two-sum, plus the errors of ds and dt) before the
    constant is taken off: at large logits |ds - dt| ~ 100s and the plain difference would carry half
    an ulp of that into the reverse-KL gradient q (ls - lt - KL) wherever q ~ 1. Infinite or NaN
    differences pass through.
    """
    d = ds - dt
    err = diff_error(ds, dt, d) + (diff_error(s, m_s, ds) - diff_error(t, m_t, dt))
    return (d - k_hi) + (err - k_lo)


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)), -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    r = hi + tl.log(1.0 + tl.exp(lo - hi))
    return tl.where(hi == float("-inf"), float("-inf"), r)


@triton.jit
def log_mixture(ls, lt, log_wt, log_ws):
    """log(w_t p + w_s q) in log space: finite wherever p or q is, even when both underflow."""
    return log_add_exp(lt + log_wt, ls + log_ws)


@triton.jit
def mixture_ratio(lw, lx, lm):
    """w x / m = exp(lw + lx - log m) (skew_kl's q p / m, skew_reverse_kl's lambda q / m, both in [0, 1]) as
    one exp, where x / m alone can overflow; 0 where the mixture is empty, never NaN."""
    return tl.where(lm > float("-inf"), tl.exp((lw + lx) - lm), 0.0)


@triton.jit
def expm1(x):
    """exp(x) - 1 to about an ulp (as the C++ accurate_expm1): for |x| < 1/2 the degree-14 Taylor
    polynomial x (1 + x/2 (1 + x/3 (... (1 + x/14)))), truncation < 5e-17 relative; exp(x) - 1 beyond."""
    poly = 1.0 + x * (1.0 / 14.0)
    for k in tl.static_range(13, 1, -1):
        poly = 1.0 + x * (1.0 / k) * poly
    return tl.where(tl.abs(x) < 0.5, x * poly, tl.exp(x) - 1.0)


@triton.jit
def weighted_expm1(w, lw, x):
    """w expm1(x) for w = exp(lw), exactly 0 where w == 0; from x = 1/2 up as exp(lw + x) - w (no
    cancellation there), which overflows only where the term itself does."""
    term = tl.where(x < 0.5, w * expm1(x), tl.exp(lw + x) - w)
    return tl.where(w > 0, term, 0.0)


@triton.jit
def alpha_form(alpha):
    """ALPHA_STUDENT for |alpha| <= 1/2, ALPHA_TEACHER for |1 - alpha| <= 1/2, else ALPHA_LOG (the
    forms of A = sum p^alpha q^(1 - alpha): see the C++ alpha_form)."""
    student = (alpha >= -0.5) & (alpha <= 0.5)
    teacher = (alpha > 0.5) & (alpha <= 1.5)
    return tl.where(student, ALPHA_STUDENT, tl.where(teacher, ALPHA_TEACHER, ALPHA_LOG))


@triton.jit
def alpha_term(ls, lt, q, p, alpha, one_minus, form):
    """An entry's term of A - 1 in the Student / Teacher form: q expm1(alpha X) or p expm1(-(1 - alpha) X),
    X = lt - ls; ``one_minus`` is 1 - alpha rounded from float64."""
    x = lt - ls
    if form == ALPHA_STUDENT:
        term = weighted_expm1(q, ls, alpha * x)
    else:
        term = weighted_expm1(p, lt, -one_minus * x)
    return term


@triton.jit
def alpha_logit(s, t, alpha):
    """alpha t + (1 - alpha) s, -inf where both logits are -inf (a masked entry)."""
    z = alpha * t + (1.0 - alpha) * s
    return tl.where((s == float("-inf")) & (t == float("-inf")), float("-inf"), z)


@triton.jit
def second_pass_terms(ls, lt, q, p, param, log_wt, log_ws, DIV: tl.constexpr):
    """(loss integrand, integrand of the row scalar c0) of the two-pass divergences."""
    if DIV == 3:  # jsd
        lm = log_mixture(ls, lt, log_wt, log_ws)
        kl_q = weighted(q, ls, lm)
        loss = param * weighted(p, lt, lm) + (1.0 - param) * kl_q
        aux = kl_q
    elif DIV == 4:  # skew_kl: c0 = sum q p / m
        lm = log_mixture(ls, lt, log_wt, log_ws)
        loss = weighted(p, lt, lm)
        aux = mixture_ratio(ls, lt, lm)
    elif DIV == 5:  # skew_reverse_kl: c0 = sum q (ls - log m - lambda q / m)
        lm = log_mixture(ls, lt, log_wt, log_ws)
        loss = weighted(q, ls, lm)
        aux = loss - q * mixture_ratio(log_ws, ls, lm)
    else:  # tv: c0 = sum q sign(q - p)
        diff = q - p
        loss = 0.5 * tl.abs(diff)
        aux = tl.where(diff > 0, q, tl.where(diff < 0, -q, 0.0))
    return loss, aux


@triton.jit
def grad_entry(s, t, m_s, m_t, ds, dt, ls, lt, q, p, param, log_wt, log_ws, c0, c1, DIV: tl.constexpr):
    """dL/ds for each entry of a tile, before the upstream gradient and the 1/T factor."""
    if DIV == 0:  # forward_kl
        g = q - p
    elif DIV == 1:  # reverse_kl: q (ls - lt - KL) = q ((ds - dt) - (c0 + c1)), c0 + c1 a float pair
        g = tl.where(q > 0, q * exact_gap(s, t, ds, dt, m_s, m_t, c0, c1), 0.0)
    elif DIV == 2:  # jeffreys
        g = (1.0 - param) * (q - p) + param * tl.where(
            q > 0, q * exact_gap(s, t, ds, dt, m_s, m_t, c0, c1), 0.0
        )
    elif DIV == 3:  # jsd: (1 - beta) q (ls - log m - c0)
        lm = log_mixture(ls, lt, log_wt, log_ws)
        g = tl.where(q > 0, (1.0 - param) * q * (ls - lm - c0), 0.0)
    elif DIV == 4:  # skew_kl: -(1 - lambda) q (r - sum q r), r = p / m
        lm = log_mixture(ls, lt, log_wt, log_ws)
        g = (1.0 - param) * (q * c0 - mixture_ratio(ls, lt, lm))
    elif DIV == 5:  # skew_reverse_kl: q (g - sum q g), g = log(q/m) - lambda q/m
        lm = log_mixture(ls, lt, log_wt, log_ws)
        g = tl.where(q > 0, q * (ls - lm - mixture_ratio(log_ws, ls, lm) - c0), 0.0)
    elif DIV == 6:  # tv: 1/2 q (sigma - sum q sigma)
        diff = q - p
        sigma = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        g = 0.5 * q * (sigma - c0)
    else:  # alpha: (A / alpha) (q - r), r = softmax(alpha t + (1 - alpha) s) = q exp(alpha X) / A
        if (alpha_form(param) == ALPHA_STUDENT) & ~(c1 * param > 0):  # c1 = A - 1 (C++ alpha_grad_form)
            x = (dt - ds) - c0  # c0 = log-sum t - log-sum s: X exact where ds, dt are small
            g = (q * c1 - weighted_expm1(q, ls, param * x)) / param  # (q (A - 1) - q expm1(alpha X)) / alpha
        else:  # c1 = A / alpha
            g = c1 * (q - tl.exp(alpha_logit(ds, dt, param) - c0))
    return g

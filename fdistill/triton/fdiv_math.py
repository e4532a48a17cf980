"""The f-divergence math on the Triton side: the formulas of csrc/include/fdistill/fdiv_math.h.

For a generator ``f`` and a positive reference measure ``q`` (``u = p / q``, ``v = theta - tau``):
``p*_j = q_j (f*)'(theta_j - tau)`` with the scalar ``tau`` such that ``sum_j p*_j = 1``;
``g(tau) = sum_j q_j (f*)'(theta_j - tau) - 1`` is decreasing, and convex in tau for every family
below except alpha > 2, so Newton steps from the left bracket end approach the root from below; a
bracket keeps the steps safe for alpha > 2.

``F`` is a ``tl.constexpr`` code from :data:`F_CODES` (the C++ ``FKind``), so every family compiles
to its own specialised kernel from one source. Tile functions work in the accumulation dtype
(float32, float64 for float64 logits); the solver's row scalars (``tau``, the bracket, the sums
``S0``, ``S1``) are float64, as in the C++ ``TauSearch``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from fdistill.triton.math import expm1, weighted_expm1

# The C++ FKind values: alpha = 1.5 and alpha = 2 have cheaper closed forms as kinds of their own.
F_CODES = {"kl": 0, "reverse_kl": 1, "alpha": 2, "alpha15": 3, "alpha2": 4, "js": 5, "alpha_pow": 6}
MAX_ALPHA_POW = 8  # C++ kMaxAlphaPow: alpha = 1 + 1/n, n = 3..8, takes (1 + w)^n by multiplication


def alpha_pow_n(alpha: float) -> int:
    """n when 1 / (alpha - 1) is an integer 3..MAX_ALPHA_POW (to 1e-9 relative), else 0 (C++ alpha_pow_n)."""
    inv = 1 / (alpha - 1)
    n = math.floor(inv + 0.5)
    return n if 3 <= n <= MAX_ALPHA_POW and abs(inv - n) <= 1e-9 * n else 0


def resolve_f(f: str, alpha: float) -> int:
    """The F code of ``f`` (C++ ``resolve_f``): alpha = 1.5 and 2 get their own kinds."""
    if f in ("kl", "reverse_kl", "js"):
        return F_CODES[f]
    if f != "alpha":
        raise ValueError(f"fdistill: unknown f '{f}' (kl, reverse_kl, alpha, js)")
    if not (math.isfinite(alpha) and alpha > 0 and alpha != 1):
        raise ValueError(f"fdistill: alpha must be > 0 and != 1, got {alpha}")
    if alpha == 1.5:
        return F_CODES["alpha15"]
    if alpha == 2:
        return F_CODES["alpha2"]
    return F_CODES["alpha_pow"] if alpha_pow_n(alpha) else F_CODES["alpha"]


def fcoef(f: str, alpha: float) -> tuple[float, float]:
    """(alpha, 1 / (alpha - 1)) as the C++ ``make_fcoef(f == "alpha" ? alpha : 2)``."""
    a = alpha if f == "alpha" else 2.0
    return a, 1.0 / (a - 1.0)


# ----------------------------------------------------------------------------- solving for tau


@triton.jit
def f_prime(u, alpha, inv_am1, F: tl.constexpr):
    """f'(u) for u > 0, in float64: the ends of the bracket for tau. ``u^(alpha - 1)`` is
    ``exp((alpha - 1) log u)``, exactly ``sqrt(u)`` for alpha = 1.5 and ``u`` for alpha = 2."""
    if F == 0:  # kl: log u
        r = tl.log(u)
    elif F == 1:  # reverse_kl: 1 - 1/u
        r = 1.0 - 1.0 / u
    elif F == 5:  # js: log(2u / (u + 1))
        r = tl.log(2.0 * u / (u + 1.0))
    elif F == 3:
        r = (tl.sqrt(u) - 1.0) * inv_am1
    elif F == 4:
        r = (u - 1.0) * inv_am1
    else:  # (u^(alpha - 1) - 1) / (alpha - 1) as expm1: no cancellation near alpha = 1
        r = expm1((alpha - 1.0) * tl.log(u)) * inv_am1
    return r


@triton.jit
def newton_power(alpha, F: tl.constexpr):
    """c of phi = S0^c - 1: -1 for reverse KL, 1 for JS, alpha - 1 otherwise (float64)."""
    if F == 1:
        c = tl.full([], -1.0, tl.float64)
    elif F == 5:
        c = tl.full([], 1.0, tl.float64)
    else:
        c = alpha - 1.0
    return c


@triton.jit
def _shifted_tau_bound(q, alpha, inv_am1, F: tl.constexpr):
    """tau = -f'(1 / q) as the search variable t (C++ ``shifted_tau_bound``): q for reverse KL, log1p(q)
    for JS (the argmax's distance to the pole, without the cancellation of pole - f'(1/q)), r for the
    general alpha (``sweep_point``), -f'(1 / q) otherwise."""
    if F == 1:
        r = q
    elif F == 5:
        r = _log1p(q)
    elif F == 2 or F == 6:  # the general alpha's r = log(1 - (alpha - 1) tau) = -(alpha - 1) log q
        r = -(alpha - 1.0) * tl.log(q)
    else:
        r = -f_prime(1.0 / q, alpha, inv_am1, F)
    return r


@triton.jit
def start_tau_search(q_max, q_total, x_mean, alpha, inv_am1, F: tl.constexpr):
    """(lo, hi, tau_lo) of the kernels' search variable t (C++ ``start_tau_search``; sigma for reverse KL
    and JS, r for the general alpha): tau_lo = -f'(1 / q_max) (the argmax entry alone gives S0 = 1),
    tau_hi = -f'(1 / q_total) (every entry at most 1 / q_total), both inside the domain of (f*)'; then,
    where (f*)' is convex (alpha <= 2, reverse KL, JS), Jensen's tau_J = x_mean + tau_hi replaces lo when it
    lies inside the bracket. q_max is q at an argmax of theta, q_total the sum of q over the entries that are
    not -inf, x_mean their q-weighted mean of theta - max (float64)."""
    lo = _shifted_tau_bound(q_max, alpha, inv_am1, F)
    hi = _shifted_tau_bound(q_total, alpha, inv_am1, F)
    if F == 2 or F == 6:  # r_J = log(e^r_hi - (alpha - 1) x_mean)
        t_j = tl.log(tl.exp(hi) - (alpha - 1.0) * x_mean)
        convex = alpha <= 2.0
    else:
        t_j = hi + x_mean
        convex = True
    inside = convex & ((t_j - lo) * (t_j - hi) < 0.0)  # (false for NaN or inf)
    return tl.where(inside, t_j, lo), hi, lo


@triton.jit
def tau_step(tau, lo, hi, lo0, s0, s1, c, tol, eps, F: tl.constexpr):
    """One step of the safeguarded Newton search (C++ ``tau_step``), given S0 and
    S1 = -dS0/dtau = sum q (f*)''(x - tau) at tau (the general alpha: t = r and S1' = s S1, the same
    iterates in log s, ``sweep_point``). Returns (stop, tau, lo, hi): stop is true when
    |S0 - 1| <= tol, the Newton step is below the sweep's resolution (eps of the accumulation dtype
    times 1 + |tau|, sigma for the pole families, |r| + |c| for r; near a pole S0 moves in steps of
    eps S1), or the bracket cannot shrink further (the caller's answer is then the evaluated point with
    S0 nearest 1); otherwise tau is the next point to evaluate. lo0 is tau_lo (``start_tau_search``).
    Newton on phi = S0^c - 1, phi / phi' = -(S0 - S0^(1-c)) / (c S1), its numerator as
    -S0 expm1(-c log S0) (no cancellation for c = alpha - 1 near 0); a step outside (lo, hi)
    (alpha > 2, rounding, NaN from S0 = 0 or S1 = 0) falls back to bisection."""
    converged = tl.abs(s0 - 1.0) <= tol
    above = s0 > 1.0
    restart = ~above & (
        tau == lo
    )  # Jensen's start was not below the root: the bracket from tau_lo (lo0) again
    lo = tl.where(above, tau, tl.where(restart, lo0, lo))  # (updated also when converged: unused then)
    hi = tl.where(above, hi, tau)
    num = s0 * expm1(-c * tl.log(s0))
    # a step below what the sweep can resolve: p would not change (pole families: d = sigma - x at the
    # argmax resolves sigma relative to itself; the general alpha's r: the argmax's log (f*)' is r / c)
    if F == 1 or F == 5:
        nxt = tau - num / (c * s1)
        resolution = eps * tl.abs(tau)
    elif F == 2 or F == 6:  # t = r = log s: s_next = s (1 + num / S1'), S1' = s S1 (sweep_point)
        nxt = tau + _log1p(num / s1)
        resolution = eps * (tl.abs(tau) + tl.abs(c))
    else:
        nxt = tau - num / (c * s1)
        resolution = eps * (1.0 + tl.abs(tau))
    newton = (nxt - lo) * (
        nxt - hi
    ) < 0.0  # inside the bracket, either orientation (r's is reversed for alpha > 1)
    small = newton & (tl.abs(nxt - tau) <= resolution)
    nxt = tl.where(newton, nxt, 0.5 * (lo + hi))  # bisection; also catches NaN (S0 = 0 or S1 = 0)
    stop = converged | small | (nxt == lo) | (nxt == hi)  # or the bracket at rounding level
    tau = tl.where(stop, tau, nxt)
    return stop, tau, lo, hi


# ----------------------------------------------------------------------------- tile math


@triton.jit
def sweep_point(t, alpha, inv_am1, ACC: tl.constexpr, F: tl.constexpr):
    """(t, k, m) of a sweep at the float64 search variable t (C++ ``sweep_point``), all in ACC: t rounded
    to ACC first (the statistics' t, so the backward evaluates the same point). The general alpha (F = 2)
    searches r = log s, s = 1 - (alpha - 1) tau: (f*)'(x - tau) = exp(m + log1p(k x) / (alpha - 1)) with
    k = (alpha - 1) e^-r (clamped to ACC's range) and m = r / (alpha - 1); F = 6 (1 / (alpha - 1) = n) the
    same, with e^m in place of m (clamped): (f*)' = e^m (1 + k x)^n. The other kinds use t alone."""
    t_acc = t.to(ACC)
    if F == 2 or F == 6:
        r = t_acc.to(tl.float64)
        if ACC == tl.float64:  # noqa: SIM108, SIM300  (constexpr)
            lim = 1.7976931348623157e308
        else:
            lim = 3.4028234663852886e38
        k = tl.minimum(tl.maximum((alpha - 1.0) * tl.exp(-r), -lim), lim).to(ACC)
        if F == 2:  # noqa: SIM108  (constexpr)
            m = (r * inv_am1).to(ACC)
        else:
            m = tl.minimum(tl.exp(r * inv_am1), lim).to(ACC)
    else:
        k = t_acc
        m = t_acc
    return t_acc, k, m


@triton.jit
def conj_grad_at(x, t, k, m, alpha_m1, inv_am1, F: tl.constexpr):
    """(f*)'(x - tau) of a tile at a sweep point (``sweep_point``); masked entries (x = -inf) give 0."""
    if F == 2:  # w <= -1 (alpha > 1): outside the support; alpha < 1 gives w >= 0
        w = k * x
        r = tl.where(w > -1.0, tl.exp(m + _log1p(w) * inv_am1), 0.0)
    elif F == 6:  # m holds e^m
        b = _pow_base(x, k)
        r = m * (_int_pow(b, inv_am1, 1) * b)
    else:
        r = conj_grad(x - t, alpha_m1, inv_am1, F)
    return r


@triton.jit
def _pow_base(x, k):
    """F = 6's base 1 + k x, 0 outside the support (also for a NaN k x = 0 * -inf: masked)."""
    w = k * x
    return tl.where(w > -1.0, 1.0 + w, 0.0)


@triton.jit
def _int_pow(b, inv_am1, less: tl.constexpr):
    """b^(n - less), n = 1 / (alpha - 1) rounded (F = 6: n - 1 multiplications at most)."""
    n = (inv_am1 + 0.5).to(tl.int32) - less
    r = b
    for _ in range(1, n):
        r = r * b
    return r


@triton.jit
def conj_grads_at(x, t, k, m, alpha_m1, inv_am1, F: tl.constexpr):
    """(f*)' and the sweep's slope term of a tile: (f*)''(x - t), or (f*)' / (1 + w) for the general alpha
    (S1' = s S1: one log1p and one exp per entry)."""
    if F == 2:
        w = k * x
        inside = w > -1.0
        d1 = tl.where(inside, tl.exp(m + _log1p(w) * inv_am1), 0.0)
        d2 = tl.where(inside, d1 / (1.0 + w), 0.0)
    elif F == 6:  # e^m (1 + w)^(n - 1) and one more factor
        b = _pow_base(x, k)
        bn1 = _int_pow(b, inv_am1, 1)
        d1 = m * (bn1 * b)
        d2 = m * bn1
    else:
        d1 = conj_grad(x - t, alpha_m1, inv_am1, F)
        d2 = conj_grad2(x - t, alpha_m1, inv_am1, F)
    return d1, d2


@triton.jit
def conj_grad(v, alpha_m1, inv_am1, F: tl.constexpr):
    """(f*)'(v) of a tile for v = x - t (t the shifted tau: for reverse KL and JS v - pole, so -v = d is the
    distance to the pole); the bracket keeps v inside the domain. Masked entries (v = -inf) give 0.
    Every kind but the general alpha (``conj_grad_at``)."""
    if F == 0:  # kl: exp(v)
        r = tl.exp(v)
    elif F == 1:  # reverse_kl: 1 / (1 - (v + 1)) = 1 / d
        r = 1.0 / -v
    elif F == 3:  # alpha = 3/2: [1 + v/2]_+^2
        x = tl.maximum(1.0 + 0.5 * v, 0.0)
        r = x * x
    elif F == 4:  # alpha = 2: [1 + v]_+
        r = tl.maximum(1.0 + v, 0.0)
    else:  # js: e^(v + log 2) / (2 - e^(v + log 2)) = 1 / expm1(d)
        tl.static_assert(F == 5, "the general alpha is evaluated at a sweep point (conj_grad_at)")
        r = 1.0 / expm1(-v)
    return r


@triton.jit
def conj_grad2(v, alpha_m1, inv_am1, F: tl.constexpr):
    """(f*)''(v) of a tile (the Newton slope S1 = sum q (f*)''(x - tau))."""
    if F == 0:
        r = tl.exp(v)
    elif F == 1:
        w = 1.0 / -v
        r = w * w
    elif F == 3:
        r = tl.maximum(1.0 + 0.5 * v, 0.0)
    elif F == 4:
        r = tl.where(1.0 + v > 0.0, 1.0, 0.0)
    else:  # js: e^d / expm1(d)^2 = w (1 + w), w = 1 / expm1(d): 0 at d = inf
        tl.static_assert(F == 5, "the general alpha is evaluated at a sweep point (conj_grads_at)")
        w = 1.0 / expm1(-v)
        r = w * (1.0 + w)
    return r


@triton.jit
def _log1p(z):
    """log(1 + z) accurate for small z (Kahan: log(u) z / (u - 1), u = 1 + z rounded); +inf at z = +inf
    (a masked entry's (alpha - 1) v for alpha < 1), where Kahan's ratio is inf / inf."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.where(u < float("inf"), tl.log(u) * (z / (u - 1.0)), u))


@triton.jit
def jacobian_weight(p, q, two_minus_alpha, alpha_m1, F: tl.constexpr):
    """w = q (f*)''(theta - tau) = q / f''(p / q) of an entry in p = p* and q, 0 off the support (C++
    ``jacobian_weight``): kl p, reverse_kl p (p / q), js p (1 + p / q), alpha p^(2 - a) q^(a - 1) (sqrt(p q)
    at 3/2, q at 2). The weights of f-softargmax's Jacobian diag(w) - w w^T / sum w."""
    if F == 0:
        w = p
    elif F == 1:
        w = p * (p / q)
    elif F == 5:
        w = p * (1.0 + p / q)
    elif F == 3:
        w = tl.sqrt(p * q)
    elif F == 4:
        w = q
    else:
        w = tl.exp(two_minus_alpha * tl.log(p) + alpha_m1 * tl.log(q))
    return tl.where(p > 0.0, w, 0.0)


@triton.jit
def f_at_zero(alpha, F: tl.constexpr):
    """f(0) (C++ ``f_at_zero``): 1 for KL, 1/alpha, log 2 for JS; 0 for reverse KL (f(0) = inf: its
    q_f is the whole q f(p/q), only evaluated where p > 0)."""
    if F == 0:
        r = tl.full([], 1.0, tl.float64)
    elif F == 1:
        r = tl.full([], 0.0, tl.float64)
    elif F == 5:
        r = tl.full([], 0.6931471805599453, tl.float64)
    else:
        r = 1.0 / alpha
    return r


@triton.jit
def q_f(p, q, alpha, inv_am1, F: tl.constexpr):
    """q f(p/q) - q f(0) (C++ ``q_f``): 0 at p = 0, so sums over a vocabulary where most entries have
    p = 0 (or p ~ y) add no O(q) terms that would cancel. Reverse KL: q f(p/q) (p > 0)."""
    p_log_ratio = tl.where(p > 0.0, p * (tl.log(p) - tl.log(q)), 0.0)
    if F == 0:  # p log(p/q) - p
        r = p_log_ratio - p
    elif F == 1:  # p - q - q log(p/q)
        r = p - q - q * (tl.log(p) - tl.log(q))
    elif F == 5:  # p log(p/q) - (p + q) log1p(p/q) + p log 2
        r = p_log_ratio - (p + q) * _log1p(p / q) + p * 0.6931471805599453
    elif F == 3:  # (q^(1-a) p^a - a p) / (a (a - 1)), q^(1-a) p^a = p (p/q)^(a-1) = p sqrt(p/q)
        r = (p * tl.sqrt(p / q) - alpha * p) * inv_am1 / alpha
    elif F == 4:  # the same at a = 2: p^2 / q
        r = (p * (p / q) - alpha * p) * inv_am1 / alpha
    else:  # (p expm1((a - 1) log(p/q)) / (a - 1) - p) / a: no cancellation near a = 1; 0 at p = 0
        lp = tl.log(p)
        r = (weighted_expm1(p, lp, (lp - tl.log(q)) / inv_am1) * inv_am1 - p) / alpha
    return r


@triton.jit
def fy_entry(theta, p, y, q, alpha, inv_am1, F: tl.constexpr):
    """The FY loss integrand (p - y) theta - [q f(p/q) - q f(y/q)] of one entry (theta may be the
    max-shifted logits: the sum is shift-invariant as sum p = sum y = 1). Entries with p = y add
    exactly 0. Masked entries (theta = -inf) are outside the simplex: 0, or +inf where y > 0 (the
    target has mass the model cannot reach). Reverse KL: D_f(y, q) is dropped (a constant in theta,
    infinite as soon as y has a zero, as one-hot labels do), so the term is (p - y) theta - q f(p/q)."""
    masked = theta == float("-inf")
    outside = tl.where(y > 0.0, float("inf"), 0.0)
    if F == 1:
        r = tl.where(masked, outside, (p - y) * theta - q_f(p, q, alpha, inv_am1, F))
    else:
        term = (p - y) * theta - (q_f(p, q, alpha, inv_am1, F) - q_f(y, q, alpha, inv_am1, F))
        r = tl.where(masked, outside, tl.where(p == y, 0.0, term))
    return r

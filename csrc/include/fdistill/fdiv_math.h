// f-divergence math (Roulet et al. 2025) shared by the CPU and CUDA kernels of the
// f-softargmax and the Fenchel–Young losses. Templated over the value type V like
// divergence_math.h (Ops<V> supplies the primitives); no torch headers.
//
// For a generator f and a positive reference measure q (u = p / q, v = theta - tau):
//   p*_j = q_j (f*)'(theta_j - tau),  tau such that sum_j p*_j = 1;
//   g(tau) = sum_j q_j (f*)'(theta_j - tau) - 1 is decreasing and convex in tau for every
//   family below except alpha > 2, so Newton steps from a left end of the bracket (tau_lo, or
//   Jensen's bound) approach the root from below; a bracket keeps the steps safe for alpha > 2.
//   The search runs in a variable t per family (kFDivStats): tau, sigma = tau + pole, or
//   r = log(1 - (alpha - 1) tau), the same Newton iterates in each.
#pragma once

#include <cfloat>

#include "fdistill/divergence_math.h"

namespace fdistill {

// Families, with the alpha values that have cheaper closed forms as kinds of their own.
enum class FKind : int32_t {
  KL = 0,         // (f*)'(v) = exp(v): tau in closed form, p = softmax with reference q
  ReverseKL = 1,  // 1 / (1 - v), v < 1
  Alpha = 2,      // [1 + (a - 1) v]_+^(1 / (a - 1)), any a > 0, a != 1
  Alpha15 = 3,    // a = 3/2: [1 + v/2]_+^2
  Alpha2 = 4,     // a = 2:   [1 + v]_+
  JS = 5,         // exp(v) / (2 - exp(v)), v < log 2
  AlphaPow = 6,   // a = 1 + 1/n, n = 3..kMaxAlphaPow (4/3, 1.25, 1.2, ...): [1 + (a - 1) v]_+^n by multiplication
};

// The largest n of AlphaPow: n - 1 multiplications per entry instead of an exp and a log1p (the power's
// relative rounding grows as n eps).
constexpr int kMaxAlphaPow = 8;

// n when 1 / (alpha - 1) is an integer 3..kMaxAlphaPow (to 1e-9 relative: 4/3 as a double), else 0.
FDISTILL_HD int alpha_pow_n(double alpha) {
  const double inv = 1 / (alpha - 1), n = std::floor(inv + 0.5);
  return n >= 3 && n <= kMaxAlphaPow && std::fabs(inv - n) <= 1e-9 * n ? static_cast<int>(n) : 0;
}

struct FCoef {
  double alpha = 1.5;
  double inv_am1 = 2;  // 1 / (alpha - 1)
  int pow_n = 0;       // alpha_pow_n
};

FDISTILL_HD FCoef make_fcoef(double alpha) { return FCoef{alpha, 1.0 / (alpha - 1.0), alpha_pow_n(alpha)}; }

// f'(u) for u > 0, in double: the ends of the bracket for tau.
FDISTILL_HD double f_prime(FKind k, const FCoef& c, double u) {
  switch (k) {
    case FKind::KL: return std::log(u);
    case FKind::ReverseKL: return 1 - 1 / u;
    case FKind::JS: return std::log(2 * u / (u + 1));
    default: return std::expm1((c.alpha - 1) * std::log(u)) * c.inv_am1;  // (u^(a-1) - 1) / (a - 1)
  }
}

// ---------------------------------------------------------------- solving for tau
// Per-row statistics of the f-divergence ops: [max theta, t, S0], so that
// p_j = q_j (f*)'(theta_j - max - tau) / S0 (S0 = the sum at the final tau: the output is
// renormalised). theta = logits / T. The kernels search t = tau + pole (shifted_tau_bound): for the
// families whose (f*)' has a pole (reverse_kl at v = 1, js at v = log 2) t = sigma, the argmax's distance
// to the pole, and (f*)'(v) is written in d = sigma - x, exact however close to the pole (sigma = q_max
// ~ 1e-30 for a tiny reference measure, where tau = -1 + 1e-30 rounds to -1; sigma ~ 4e-6 at V = 256001,
// where float32's tau carried 3% of it).
// The general alpha family searches t = r = log(1 - (a - 1) tau) instead (SweepPoint).
constexpr int kFDivStats = 3;

// Whether the kernels' t is tau + pole (reverse_kl: pole 1, js: log 2) rather than tau.
FDISTILL_HD constexpr bool has_pole(FKind k) { return k == FKind::ReverseKL || k == FKind::JS; }

// Whether the kernels' t is r = log s, s = 1 - (a - 1) tau (the general alpha family, SweepPoint).
FDISTILL_HD constexpr bool has_log_scale(FKind k) { return k == FKind::Alpha || k == FKind::AlphaPow; }

// Safeguarded Newton on phi(tau) = S0(tau)^c - 1, S0(tau) = sum_j q_j (f*)'(x_j - tau),
// x = theta - max theta. phi has the root of S0 = 1 and is convex or concave in the way
// that makes Newton from the left end of the bracket monotone: c = alpha - 1 makes
// S0^c a weighted power sum (sum q x^(1/c))^c of functions affine in tau (a norm for
// 1 < alpha <= 2; linear when one entry dominates or alpha = 2), and c = -1 does the
// same for reverse KL (alpha -> 0); JS takes c = 1 (S0 itself is convex). Steps that
// leave the bracket [lo, hi] (alpha > 2, rounding) fall back to bisection. The first point is tau_lo
// or Jensen's bound (start_tau_search), both below the root.
//
// In r = log s (the general alpha family) the Newton iterates are the same: s is affine in tau,
// s_next = s (1 + S0 expm1(-c log S0) / S1') with S1' = s S1 (SweepPoint), so r_next = r + log1p(that).
// In r the bracket may be reversed (r decreases with tau for alpha > 1).
struct TauSearch {
  double lo, hi;   // S0(lo) >= 1 >= S0(hi)
  double lo0;      // tau_lo: lo again if Jensen's start turns out above the root (rounding of x_mean)
  double tau;      // the next point to evaluate (the search variable t, see kFDivStats)
  double c;        // the Newton power
  double eps;      // machine epsilon of the sums' terms: a Newton step below eps times the resolution is noise
  bool relative;   // a pole family: t = sigma is resolved to eps sigma (d = sigma - x at the argmax)
  bool log_scale;  // t = r: resolved to eps (|r| + |c|) (the argmax's log (f*)' is r / c)
  // The evaluated point with S0 nearest 1: the answer (p is renormalised by its S0). Where S0 jumps over 1
  // (alpha >> 1: an entry entering the support adds q (1e-308)^(1/(a-1)), half its q at a = 1000) the
  // bisection ends on either side; this keeps the smaller renormalisation.
  double best_t, best_s0;
};

FDISTILL_HD double newton_power(FKind k, const FCoef& c) {
  switch (k) {
    case FKind::ReverseKL: return -1;
    case FKind::JS: return 1;
    default: return c.alpha - 1;
  }
}

// tau = -f'(1 / q) as the search variable t, an end of the bracket: for the pole families
// -f'(1 / q) + pole without its cancellation (reverse_kl: 1 - (1 - q) = q; js: log 2 - log(2 / (1 + q)) =
// log1p(q)); for the general alpha r = log(1 - (a - 1) tau) = log(q^(1 - a)) = -(a - 1) log q.
FDISTILL_HD double shifted_tau_bound(FKind k, const FCoef& c, double q) {
  switch (k) {
    case FKind::ReverseKL: return q;
    case FKind::JS: return std::log1p(q);
    case FKind::Alpha:
    case FKind::AlphaPow: return -(c.alpha - 1) * std::log(q);
    default: return -f_prime(k, c, 1 / q);
  }
}

// Whether (f*)' is convex (every family but KL, which needs no search, and alpha > 2).
FDISTILL_HD bool convex_conj_grad(FKind k, const FCoef& c) {
  return k == FKind::ReverseKL || k == FKind::JS || (k != FKind::KL && c.alpha <= 2);
}

// q_max: q at an argmax of theta; q_total: sum of q over the entries that are not -inf; x_mean: their
// q-weighted mean of x = theta - max theta. tau_lo = -f'(1 / q_max) (the argmax entry alone gives S0 = 1),
// tau_hi = -f'(1 / q_total) (every entry at most 1 / q_total): both keep (f*)' inside its domain (in t:
// shifted_tau_bound). For a convex (f*)', Jensen's S0(tau) >= q_total (f*)'(x_mean - tau) is 1 at
// tau_J = x_mean + tau_hi (r_J = log(e^r_hi - (a - 1) x_mean)), a left end nearer the root when it lies
// inside the bracket: about one Newton sweep fewer from V ~ 32k entries of similar q (at tau_lo S0 ~ V).
FDISTILL_HD TauSearch start_tau_search(FKind k, const FCoef& c, double q_max, double q_total, double x_mean,
                                       double eps) {
  TauSearch s;
  s.lo = s.lo0 = shifted_tau_bound(k, c, q_max);
  s.hi = shifted_tau_bound(k, c, q_total);
  if (convex_conj_grad(k, c)) {
    const double t_j = has_log_scale(k) ? std::log(std::exp(s.hi) - (c.alpha - 1) * x_mean) : s.hi + x_mean;
    if ((t_j - s.lo) * (t_j - s.hi) < 0) s.lo = t_j;  // (false for NaN or inf)
  }
  s.tau = s.lo;
  s.c = newton_power(k, c);
  s.eps = eps;
  s.relative = has_pole(k);
  s.log_scale = has_log_scale(k);
  s.best_t = s.lo;
  s.best_s0 = NAN;  // none yet
  return s;
}

// Given S0 and S1 = -dS0/dtau = sum q (f*)''(x - tau) at s.tau (S1' for t = r): true when |S0 - 1| <= tol,
// when the Newton step is below the sweep's resolution (eps (1 + |tau|); eps sigma for the pole families,
// eps (|r| + |c|) for r: near a pole of (f*)' S0 moves in steps of eps S1, so tol may be out of reach), or
// when the bracket cannot shrink further; then (s.best_t, s.best_s0) is the answer (the caller renormalises
// p by that S0). Otherwise moves s.tau.
FDISTILL_HD bool tau_step(TauSearch& s, double s0, double s1, double tol) {
  if (s.best_s0 != s.best_s0 || std::fabs(s0 - 1) <= std::fabs(s.best_s0 - 1)) {  // a NaN only if first
    s.best_t = s.tau, s.best_s0 = s0;
  }
  if (std::fabs(s0 - 1) <= tol) return true;
  if (s0 > 1) {
    s.lo = s.tau;
  } else {
    s.hi = s.tau;
    if (s.tau == s.lo) s.lo = s.lo0;  // Jensen's start was not below the root: the bracket from tau_lo again
  }
  // phi / phi' with phi = S0^c - 1, phi' = -c S0^(c-1) S1: the step (S0 - S0^(1-c)) / (c S1), its numerator
  // as -S0 expm1(-c log S0) (no cancellation for c = alpha - 1 near 0)
  const double num = s0 * std::expm1(-s.c * std::log(s0));
  double next = s.log_scale ? s.tau + std::log1p(num / s1) : s.tau - num / (s.c * s1);
  const double resolution = s.relative    ? std::fabs(s.tau)
                            : s.log_scale ? std::fabs(s.tau) + std::fabs(s.c)
                                          : 1 + std::fabs(s.tau);
  if (!((next - s.lo) * (next - s.hi) < 0)) {  // outside the bracket (either orientation)
    next = 0.5 * (s.lo + s.hi);  // bisection; also catches NaN (S0 = 0 or S1 = 0)
  } else if (std::fabs(next - s.tau) <= s.eps * resolution) {
    return true;  // a step below what the sweep can resolve: p would not change
  }
  if (next == s.lo || next == s.hi) return true;  // bracket at rounding level
  s.tau = next;
  return false;
}

// (f*)'(v) and (f*)''(v) of a tile for v = x - t (t the shifted tau: for reverse_kl and js v - pole, so
// -v = d = sigma - x >= sigma > 0 is the distance to the pole); the bracket keeps v inside the domain.
// Every kind but the general alpha, whose sweeps take r = log s instead (SweepPoint, conj_grad_at).
template <FKind K, class V>
FDISTILL_HD V conj_grad(V v, V alpha_m1, V inv_am1) {
  using O = Ops<V>;
  const V one = O::splat(1), zero = O::splat(0);
  if constexpr (K == FKind::KL) {
    return O::exp(v);
  } else if constexpr (K == FKind::ReverseKL) {  // 1 / (1 - (v + 1)) = 1 / d
    return one / (zero - v);
  } else if constexpr (K == FKind::Alpha15) {
    const V x = O::max(one + O::splat(0.5) * v, zero);
    return x * x;
  } else if constexpr (K == FKind::Alpha2) {
    return O::max(one + v, zero);
  } else {
    static_assert(K == FKind::JS, "the general alpha is evaluated at a SweepPoint (conj_grad_at)");
    return one / accurate_expm1(zero - v);  // e^(v + log 2) / (2 - e^(v + log 2)) = 1 / expm1(d)
  }
}

template <FKind K, class V>
FDISTILL_HD V conj_grad2(V v, V alpha_m1, V inv_am1) {
  using O = Ops<V>;
  const V one = O::splat(1), zero = O::splat(0);
  if constexpr (K == FKind::KL) {
    return O::exp(v);
  } else if constexpr (K == FKind::ReverseKL) {
    const V r = one / (zero - v);
    return r * r;
  } else if constexpr (K == FKind::Alpha15) {
    return O::max(one + O::splat(0.5) * v, zero);
  } else if constexpr (K == FKind::Alpha2) {
    return O::where(O::gt(one + v, zero), one, zero);
  } else {  // js: e^d / expm1(d)^2 = r (1 + r), r = 1 / expm1(d): 0 at d = inf
    static_assert(K == FKind::JS, "the general alpha is evaluated at a SweepPoint (conj_grads_at)");
    const V r = one / accurate_expm1(zero - v);
    return r * (one + r);
  }
}

// w = q (f*)''(theta - tau) = q / f''(p / q) of an entry, written in p = p* and q (0 off the support): the
// weights of f-softargmax's Jacobian, J = diag(w) - w w^T / sum w (implicit differentiation of sum p = 1).
//   kl: p,  reverse_kl: p^2 / q,  js: p (p + q) / q,  alpha: p^(2 - a) q^(a - 1) (sqrt(p q) at a = 3/2, q at 2)
// (p (p / q): p^2 would underflow first); 2 - a and a - 1 as rounded from the double a.
template <FKind K, class V>
FDISTILL_HD V jacobian_weight(V p, V q, V two_minus_alpha, V alpha_m1) {
  using O = Ops<V>;
  const V zero = O::splat(0), one = O::splat(1);
  V w;
  if constexpr (K == FKind::KL) {
    w = p;
  } else if constexpr (K == FKind::ReverseKL) {
    w = p * (p / q);
  } else if constexpr (K == FKind::JS) {
    w = p * (one + p / q);
  } else if constexpr (K == FKind::Alpha15) {
    w = O::sqrt(p * q);
  } else if constexpr (K == FKind::Alpha2) {
    w = q;
  } else {
    w = O::exp(two_minus_alpha * O::log(p) + alpha_m1 * O::log(q));
  }
  return O::where(O::gt(p, zero), w, zero);
}

// Where a sweep evaluates (f*)'(x - tau) given the search variable t (kFDivStats):
// - every kind but the general alpha: at v = x - t (tau, or the pole distance for reverse_kl and js);
// - the general alpha: t = r = log s, s = 1 - (a - 1) tau > 0 the argmax's base 1 + (a - 1) v. An entry's
//   base is s + (a - 1) x = s (1 + w) with w = k x, k = (a - 1) e^-r, so
//     (f*)'(x - tau) = exp(m + log1p(w) / (a - 1)),  m = r / (a - 1),
//   and the sweep's slope S1' = s S1 = sum q (f*)' / (1 + w). No cancellation for alpha < 1 (w >= 0, where
//   s ~ q_max^(1 - a) is tiny for a tiny reference measure and tau's 1 + (a - 1) v lost it) and no overflow
//   for alpha >> 1 (tau's bracket end (1 - q^(1 - a)) / (a - 1) overflows at a = 1000, r's is -(a - 1) log q).
// t is rounded to the accumulation type A first, as the statistics store it: the backward evaluates the
// same point.
// AlphaPow (1 / (a - 1) = n): (f*)'(x - tau) = e^m (1 + w)^n, its slope term e^m (1 + w)^(n - 1), by
// multiplication.
struct SweepPoint {
  double t;   // v = x - t
  double k;   // alpha: w = k x (clamped to A's range: at k = +-inf the argmax's w = 0 * inf is NaN)
  double m;   // alpha: the log of the argmax's (f*)'
  double em;  // AlphaPow: e^m (clamped to A's range)
};

template <class A>
FDISTILL_HD SweepPoint sweep_point(FKind kind, const FCoef& c, double t) {
  const double r = static_cast<double>(static_cast<A>(t));
  if (!has_log_scale(kind)) return {r, 0, 0, 0};
  const double lim = sizeof(A) == 8 ? DBL_MAX : FLT_MAX, m = r * c.inv_am1;
  return {r, std::fmin(std::fmax((c.alpha - 1) * std::exp(-r), -lim), lim), m, std::fmin(std::exp(m), lim)};
}

// A SweepPoint and the coefficients as tile values (vector splats or scalars).
template <class V>
struct TilePoint {
  V t, k, m, em, alpha_m1, inv_am1;
  int pow_n;
};

template <class V>
FDISTILL_HD TilePoint<V> tile_point(const SweepPoint& p, const FCoef& c) {
  using O = Ops<V>;
  return {O::splat(p.t),           O::splat(p.k),         O::splat(p.m), O::splat(p.em),
          O::splat(c.alpha - 1), O::splat(c.inv_am1), c.pow_n};
}

// b^n for n >= 1 (n - 1 multiplications: n <= kMaxAlphaPow).
template <class V>
FDISTILL_HD V int_pow(V b, int n) {
  V r = b;
  for (int i = 1; i < n; ++i) r = r * b;
  return r;
}

// AlphaPow's base 1 + w of an entry, 0 outside the support (w <= -1; also a NaN w = 0 * -inf: masked).
template <class V>
FDISTILL_HD V pow_base(V x, const TilePoint<V>& p) {
  using O = Ops<V>;
  const V w = p.k * x;
  return O::where(O::gt(w, O::splat(-1)), O::splat(1) + w, O::splat(0));
}

// (f*)'(x - tau) of a tile at the sweep point (masked entries, x = -inf, give 0).
template <FKind K, class V>
FDISTILL_HD V conj_grad_at(V x, const TilePoint<V>& p) {
  using O = Ops<V>;
  if constexpr (K == FKind::Alpha) {  // w <= -1 (a > 1): outside the support; a < 1 gives w >= 0
    const V w = p.k * x;
    return O::where(O::gt(w, O::splat(-1)), O::exp(p.m + O::log1p(w) * p.inv_am1), O::splat(0));
  } else if constexpr (K == FKind::AlphaPow) {
    return p.em * int_pow(pow_base(x, p), p.pow_n);
  } else {
    return conj_grad<K>(x - p.t, p.alpha_m1, p.inv_am1);
  }
}

// (f*)' and the sweep's slope term together: (f*)''(x - t), or (f*)' / (1 + w) for the general alpha
// (S1' above: one log1p and one exp per entry; AlphaPow: n - 1 multiplications).
template <FKind K, class V>
FDISTILL_HD void conj_grads_at(V x, const TilePoint<V>& p, V& d1, V& d2) {
  using O = Ops<V>;
  if constexpr (K == FKind::Alpha) {
    const V w = p.k * x, one = O::splat(1), zero = O::splat(0);
    const auto inside = O::gt(w, O::splat(-1));
    d1 = O::where(inside, O::exp(p.m + O::log1p(w) * p.inv_am1), zero);
    d2 = O::where(inside, d1 / (one + w), zero);
  } else if constexpr (K == FKind::AlphaPow) {  // (1 + w)^(n - 1) and one more factor
    const V b = pow_base(x, p), bn1 = int_pow(b, p.pow_n - 1);
    d1 = p.em * (bn1 * b);
    d2 = p.em * bn1;
  } else {
    d1 = conj_grad<K>(x - p.t, p.alpha_m1, p.inv_am1);
    d2 = conj_grad2<K>(x - p.t, p.alpha_m1, p.inv_am1);
  }
}

// f(0): the value of q f(p/q) / q at p = 0 (an entry outside the support). Reverse KL's is +inf;
// its q_f below is the whole q f(p/q) (it is only evaluated where p > 0).
FDISTILL_HD double f_at_zero(FKind k, const FCoef& c) {
  switch (k) {
    case FKind::KL: return 1;
    case FKind::ReverseKL: return 0;
    case FKind::JS: return 0.69314718055994530942;  // log 2
    default: return 1 / c.alpha;
  }
}

// q f(p/q) - q f(0): 0 at p = 0, so sums over a vocabulary where most entries have p = 0 (or
// p ~ y) add no O(q) terms that would cancel. With f(0) = f_at_zero:
//   kl:    p log(p/q) - p
//   alpha: (q^(1-a) p^a - a p) / (a (a - 1)) = (p expm1((a - 1) log(p/q)) / (a - 1) - p) / a (no cancellation
//          near a = 1; a = 3/2 and 2 in closed form)
//   js:    p log(p/q) - (p + q) log1p(p/q) + p log 2
//   reverse_kl: q f(p/q) = p - q - q log(p/q) (p > 0)
template <FKind K, class V>
FDISTILL_HD V q_f(V p, V q, V alpha, V inv_am1) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  // p log(p/q), 0 at p = 0 (KL and JS only: the vector logs are calls the compiler keeps)
  auto p_log_ratio = [&]() { return O::where(O::gt(p, zero), p * (O::log(p) - O::log(q)), zero); };
  if constexpr (K == FKind::KL) {
    return p_log_ratio() - p;
  } else if constexpr (K == FKind::ReverseKL) {
    return p - q - q * (O::log(p) - O::log(q));
  } else if constexpr (K == FKind::JS) {
    return p_log_ratio() - (p + q) * O::log1p(p / q) + p * O::splat(0.69314718055994530942);
  } else if constexpr (K == FKind::Alpha15 || K == FKind::Alpha2) {  // pa = q^(1-a) p^a = p (p/q)^(a-1)
    const V pa = K == FKind::Alpha15 ? p * O::sqrt(p / q) : p * (p / q);
    return (pa - alpha * p) * inv_am1 / alpha;
  } else {  // p ((p/q)^(a-1) - 1) = w expm1(x), w = p, x = (a - 1) log(p/q); 0 at p = 0
    const V lp = O::log(p);
    return (weighted_expm1(p, lp, (lp - O::log(q)) / inv_am1) * inv_am1 - p) / alpha;
  }
}

// The FY loss integrand (p - y) theta - [q f(p/q) - q f(y/q)] of one entry (f(0) cancels) (theta may be the
// max-shifted logits: the sum is shift-invariant as sum p = sum y = 1). Entries with p = y add
// exactly 0. Masked entries (theta = -inf) are outside the simplex: 0, or +inf where y > 0 (the
// target has mass the model cannot reach). Reverse KL: D_f(y, q) is dropped (a constant in theta,
// infinite as soon as y has a zero, as one-hot labels do), so the term is (p - y) theta - q f(p/q).
// kTarget = false: y = 0 everywhere (the labels' rows before their label entry is swapped in), without
// the q f(y/q) terms.
template <FKind K, bool kTarget = true, class V>
FDISTILL_HD V fy_entry(V theta, V p, V y, V q, V alpha, V inv_am1) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  const auto masked = O::eq(theta, O::splat(-kInf));
  const V outside = kTarget ? O::where(O::gt(y, zero), O::splat(kInf), zero) : zero;
  if constexpr (K == FKind::ReverseKL) {
    return O::where(masked, outside, (p - y) * theta - q_f<K>(p, q, alpha, inv_am1));
  } else {
    const V q_f_y = kTarget ? q_f<K>(y, q, alpha, inv_am1) : zero;
    const V term = (p - y) * theta - (q_f<K>(p, q, alpha, inv_am1) - q_f_y);
    return O::where(masked, outside, O::where(O::eq(p, y), zero, term));
  }
}

}  // namespace fdistill

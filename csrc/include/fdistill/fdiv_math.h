// f-divergence math (Roulet et al. 2025) shared by the CPU and CUDA kernels of the
// f-softargmax and the Fenchel–Young losses. Templated over the value type V like
// divergence_math.h (Ops<V> supplies the primitives); no torch headers.
//
// For a generator f and a positive reference measure q (u = p / q, v = theta - tau):
//   p*_j = q_j (f*)'(theta_j - tau),  tau such that sum_j p*_j = 1;
//   g(tau) = sum_j q_j (f*)'(theta_j - tau) - 1 is decreasing and convex in tau for every
//   family below except alpha > 2, so Newton steps from the left bracket end approach the
//   root from below; a bracket keeps the steps safe for alpha > 2.
#pragma once

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
};

struct FCoef {
  double alpha = 1.5;
  double inv_am1 = 2;  // 1 / (alpha - 1)
};

FDISTILL_HD FCoef make_fcoef(double alpha) { return FCoef{alpha, 1.0 / (alpha - 1.0)}; }

// f'(u) for u > 0, in double: the ends of the bracket for tau.
FDISTILL_HD double f_prime(FKind k, const FCoef& c, double u) {
  switch (k) {
    case FKind::KL: return std::log(u);
    case FKind::ReverseKL: return 1 - 1 / u;
    case FKind::JS: return std::log(2 * u / (u + 1));
    default: return (std::pow(u, c.alpha - 1) - 1) * c.inv_am1;
  }
}

// (f*)'(v) and (f*)''(v) of a tile; the bracket keeps v inside the domain.
template <FKind K, class V>
FDISTILL_HD V conj_grad(V v, V alpha_m1, V inv_am1) {
  using O = Ops<V>;
  const V one = O::splat(1), zero = O::splat(0);
  if constexpr (K == FKind::KL) {
    return O::exp(v);
  } else if constexpr (K == FKind::ReverseKL) {
    return one / (one - v);
  } else if constexpr (K == FKind::Alpha15) {
    const V x = O::max(one + O::splat(0.5) * v, zero);
    return x * x;
  } else if constexpr (K == FKind::Alpha2) {
    return O::max(one + v, zero);
  } else if constexpr (K == FKind::JS) {
    const V e = O::exp(v);
    return e / (O::splat(2) - e);
  } else {  // x^(1/(a-1)) = exp(log(x) / (a - 1)); x = 0 gives 0 for a > 1
    const V x = O::max(one + alpha_m1 * v, zero);
    return O::where(O::gt(x, zero), O::exp(O::log(x) * inv_am1), zero);
  }
}

template <FKind K, class V>
FDISTILL_HD V conj_grad2(V v, V alpha_m1, V inv_am1) {
  using O = Ops<V>;
  const V one = O::splat(1), zero = O::splat(0);
  if constexpr (K == FKind::KL) {
    return O::exp(v);
  } else if constexpr (K == FKind::ReverseKL) {
    const V r = one / (one - v);
    return r * r;
  } else if constexpr (K == FKind::Alpha15) {
    return O::max(one + O::splat(0.5) * v, zero);
  } else if constexpr (K == FKind::Alpha2) {
    return O::where(O::gt(one + v, zero), one, zero);
  } else if constexpr (K == FKind::JS) {
    const V e = O::exp(v), d = O::splat(2) - e;
    return O::splat(2) * e / (d * d);
  } else {  // x^(1/(a-1) - 1) = x^((2 - a)/(a - 1))
    const V x = O::max(one + alpha_m1 * v, zero);
    return O::where(O::gt(x, zero), O::exp(O::log(x) * (inv_am1 - one)), zero);
  }
}

// q f(u) - q f(u0) for u = p/q, u0 = y/q: the FY loss integrand D_f(p, q) - D_f(y, q) per entry,
// exactly 0 where p = y (so the many entries with p = y = 0 add nothing: no cancellation at large V).
// For reverse KL, f(0) = inf: D_f(y, q) is dropped (a constant in theta) and this is q f(p/q).
template <FKind K, class V>
FDISTILL_HD V q_f(V p, V q, V alpha, V inv_am1) {
  using O = Ops<V>;
  const V zero = O::splat(0), one = O::splat(1);
  if constexpr (K == FKind::KL) {  // q f(p/q) = p log(p/q) - p + q
    return O::where(O::gt(p, zero), p * (O::log(p) - O::log(q)), zero) - p + q;
  } else if constexpr (K == FKind::ReverseKL) {  // p - q - q log(p/q)
    return p - q - q * (O::log(p) - O::log(q));
  } else if constexpr (K == FKind::JS) {  // p log(p/q) - (p+q) log((p+q)/(2q))
    const V s = p + q;
    return O::where(O::gt(p, zero), p * (O::log(p) - O::log(q)), zero) - s * (O::log(s) - O::log(O::splat(2) * q));
  } else {  // (q^(1-a) p^a - q - a (p - q)) / (a (a - 1))
    const V pa = O::where(O::gt(p, zero), O::exp(alpha * O::log(p) + (one - alpha) * O::log(q)), zero);
    return (pa - q - alpha * (p - q)) * inv_am1 / alpha;
  }
}

// The FY loss integrand (p - y) theta - [q f(p/q) - q f(y/q)] of one entry. Masked entries
// (theta = -inf) are outside the simplex and contribute 0; so do entries with p = y, exactly.
template <FKind K, class V>
FDISTILL_HD V fy_entry(V theta, V p, V y, V q, V alpha, V inv_am1) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  const auto masked = O::eq(theta, O::splat(-kInf));
  if constexpr (K == FKind::ReverseKL) {
    return O::where(masked, zero, (p - y) * theta - q_f<K>(p, q, alpha, inv_am1));
  } else {
    const V term = (p - y) * theta - (q_f<K>(p, q, alpha, inv_am1) - q_f<K>(y, q, alpha, inv_am1));
    return O::where(O::eq(p, y), zero, O::where(masked, zero, term));
  }
}

}  // namespace fdistill

// Token-level divergence math shared by the CPU and CUDA kernels.
//
// Every formula is written once, as a template over a value type V: a scalar
// (float, double; CPU and CUDA) or a SIMD vector (CPU, see csrc/cpu/vec_ops.h).
// The primitives a type must provide live in Ops<V>. No torch headers here, so
// .cu files that include this compile in seconds.
//
// Notation per row (one token): s, t are the student and teacher logits already
// divided by the temperature; ls = s - LSE(s), lt = t - LSE(t); q = exp(ls) is
// the student, p = exp(lt) the teacher. Formulas: docs/divergences.md.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FDISTILL_HD __host__ __device__ __forceinline__
#else
#define FDISTILL_HD inline
#endif

namespace fdistill {

// +infinity usable in host and device code (numeric_limits is host-only in nvcc).
constexpr double kInf = static_cast<double>(INFINITY);

enum class Divergence : int32_t {
  ForwardKL = 0,      // KL(p || q)
  ReverseKL = 1,      // KL(q || p)
  Jeffreys = 2,       // (1 - beta) KL(p||q) + beta KL(q||p)
  JSD = 3,            // beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
  SkewKL = 4,         // KL(p || lambda p + (1-lambda) q)
  SkewReverseKL = 5,  // KL(q || lambda q + (1-lambda) p)
  TV = 6,             // 1/2 sum |p - q|
  Alpha = 7,          // Amari alpha: (1 - sum p^a q^(1-a)) / (a (1-a))
};
constexpr int kNumDivergences = 8;

// Divergences whose loss needs the normalised log-probabilities of every entry
// (a mixture, an absolute value, alpha's expm1 terms), hence a second pass over the row.
FDISTILL_HD constexpr bool needs_second_pass(Divergence d) {
  return d == Divergence::JSD || d == Divergence::SkewKL ||
         d == Divergence::SkewReverseKL || d == Divergence::TV || d == Divergence::Alpha;
}

// How the alpha divergence forms A = sum p^a q^(1-a) (docs/divergences.md, "Amari alpha"); X = lt - ls.
//   Student (|a| <= 1/2):     A - 1 = sum q expm1(a X)         exact near a = 0, no 1 - A cancellation
//   Teacher (|1 - a| <= 1/2): A - 1 = sum p expm1(-(1 - a) X)  exact near a = 1
//   Log (elsewhere):          log A = LSE(a t + (1 - a) s) - a LSE(t) - (1 - a) LSE(s), and the loss in
//                             log space: there a term can overflow while the loss (A - 1) / (a (a - 1)) does not.
// In the first two |a (1 - a)| <= 3/4, so a term overflows only where the loss does too.
enum class AlphaForm : int32_t { Student = 0, Teacher = 1, Log = 2 };

FDISTILL_HD AlphaForm alpha_form(double a) {
  if (a >= -0.5 && a <= 0.5) return AlphaForm::Student;
  return a > 0.5 && a <= 1.5 ? AlphaForm::Teacher : AlphaForm::Log;
}

// The gradient's form of a row, from its c1: the Student form's (q (A - 1) - q expm1(a X)) / a where
// A - 1 is stored (c1 a <= 0: A <= 1 iff a > 0), the ratio form (A / a)(q - r) where A / a is (c1 a > 0:
// a Student row whose A is not near 1: q - r does not cancel there, while T = q expm1(a X) carries
// the rounding of log(A r) in its exponent).
FDISTILL_HD AlphaForm alpha_grad_form(double a, double c1) {
  const AlphaForm f = alpha_form(a);
  return f == AlphaForm::Student && c1 * a > 0 ? AlphaForm::Teacher : f;
}

// Per-row statistics saved by the forward for the backward: O(1) per token.
// [0] max(s), [1] log sum exp(s - max(s)), [2] max(t), [3] log sum exp(t - max(t)),
// [4] c0, [5] c1. The log-sum-exp is kept as (max, log-sum) so that
// ls = (s - max) - log-sum loses nothing when the logits are large (1e4 in
// float32: LSE itself would carry an error of half an ulp, 5e-4). c0, c1:
//   reverse_kl, jeffreys: c0 + c1 = KL(q||p) + (LSE(s) - max s) - (LSE(t) - max t), so that
//                         ls - lt - KL = (ds - dt) - c0 - c1 (ds = s - max s, dt = t - max t): taken
//                         relative to the maxima (logits ~1e20 would cancel LSE(s) - LSE(t) away),
//                         summed in double and kept as a float pair (c1 the rounding error of c0),
//                         since |c0| ~ 100s at large logits and q (ds - dt - c0) needs it exactly
//   jsd:                  c0 = sum q (ls - log m)
//   skew_kl:              c0 = sum q p / m
//   skew_reverse_kl:      c0 = sum q (ls - log m - lambda q / m)
//   tv:                   c0 = sum q sign(q - p)
//   alpha:                Student form (see alpha_form) where |A - 1| <= 1/2: c0 = log-sum_t - log-sum_s,
//                         c1 = A - 1 (A = sum p^a q^(1-a)); else: c0 = LSE(alpha (t - max t) + (1-alpha) (s - max s)),
//                         c1 = A / alpha (alpha_grad_form tells them apart)
constexpr int kNumStats = 6;

// Below this the mixture m = w_t p + w_s q is formed in log space (log_mixture): p and q are exact to a
// few ulps down to the float minimum (1.2e-38), so above 2^-90 a term lost to underflow is < 1e-11 of m.
constexpr double kMixtureFloor = 8.077935669463161e-28;  // 2^-90

// Scalar coefficients of a divergence, fixed for a call.
struct DivCoef {
  double param;          // beta (jeffreys, jsd), lambda (skew*), alpha (alpha)
  double log_w_teacher;  // log of the teacher's weight in the mixture m
  double log_w_student;  // log of the student's weight in the mixture m
  double w_teacher, w_student;  // the weights themselves (0 outside the mixture divergences)
  // m at or below which an entry's mixture is formed in log space: kMixtureFloor, or +inf (every entry)
  // when a weight is 0, where log m = lt + log w_t (or ls + log w_s) exactly and KL(p || p) is 0
  double mixture_floor;
};

FDISTILL_HD DivCoef make_coef(Divergence d, double param) {
  const double ninf = -kInf;
  auto safe_log = [ninf](double w) { return w > 0 ? std::log(w) : ninf; };
  DivCoef c{param, ninf, ninf, 0, 0, kInf};
  if (d == Divergence::JSD || d == Divergence::SkewKL) {  // skew_kl: m = lambda p + (1 - lambda) q
    c.w_teacher = param;
    c.w_student = 1 - param;
  } else if (d == Divergence::SkewReverseKL) {  // m = lambda q + (1 - lambda) p
    c.w_teacher = 1 - param;
    c.w_student = param;
  }
  c.log_w_teacher = safe_log(c.w_teacher);
  c.log_w_student = safe_log(c.w_student);
  if (c.w_teacher > 0 && c.w_student > 0) c.mixture_floor = kMixtureFloor;
  return c;
}

// ---------------------------------------------------------------- primitives
template <class V>
struct Ops;  // exp, log, log1p, abs, max, min, where, comparisons, splat

template <class S>
struct ScalarOps {
  using Mask = bool;
  static FDISTILL_HD S splat(double x) { return static_cast<S>(x); }
  static FDISTILL_HD S exp(S x) { return std::exp(x); }
  static FDISTILL_HD S log(S x) { return std::log(x); }
  static FDISTILL_HD S log1p(S x) { return std::log1p(x); }
  static FDISTILL_HD S sqrt(S x) { return std::sqrt(x); }
  static FDISTILL_HD S abs(S x) { return std::fabs(x); }
  static FDISTILL_HD S max(S a, S b) { return (a > b || a != a) ? a : b; }  // NaN wins
  static FDISTILL_HD S min(S a, S b) { return (a < b || a != a) ? a : b; }
  static FDISTILL_HD bool gt(S a, S b) { return a > b; }
  static FDISTILL_HD bool lt(S a, S b) { return a < b; }
  static FDISTILL_HD bool eq(S a, S b) { return a == b; }
  static FDISTILL_HD bool both(bool a, bool b) { return a && b; }
  static FDISTILL_HD bool all(bool m) { return m; }  // every lane of a mask
  static FDISTILL_HD S where(bool m, S a, S b) { return m ? a : b; }
};
template <>
struct Ops<float> : ScalarOps<float> {};
template <>
struct Ops<double> : ScalarOps<double> {};

// ---------------------------------------------------------------- per entry
// The rounding error of d = a - b (Knuth's two-sum: a - b = d + error exactly), 0 where d is
// infinite or NaN (the error term would be NaN).
template <class V>
FDISTILL_HD V diff_error(V a, V b, V d) {
  using O = Ops<V>;
  const V b_seen = a - d;  // the b and a that d accounts for
  const V a_seen = d + b_seen;
  const V err = (a - a_seen) - (b - b_seen);
  return O::where(O::lt(O::abs(d), O::splat(kInf)), err, O::splat(0));
}

template <class V>
struct Entry {
  V s, t;    // logits (over the temperature)
  V ds, dt;  // logits minus the row max
  V ds_err, dt_err;  // their rounding errors: s - max_s = ds + ds_err exactly (0 where not finite)
  V ls, lt;  // log-probabilities
  V q, p;    // probabilities
};

// A row's log-sum-exps as (max, log of the sum of exp(x - max)), broadcast to V.
template <class V>
struct RowLSE {
  V max_s, log_sum_s, max_t, log_sum_t;
};

template <class V>
FDISTILL_HD RowLSE<V> make_row_lse(double max_s, double log_sum_s, double max_t, double log_sum_t) {
  using O = Ops<V>;
  return RowLSE<V>{O::splat(max_s), O::splat(log_sum_s), O::splat(max_t), O::splat(log_sum_t)};
}

// An entry's logit terms (everything but q and p).
template <class V>
FDISTILL_HD Entry<V> entry_logits(V s, V t, const RowLSE<V>& r) {
  Entry<V> e;
  e.s = s;
  e.t = t;
  e.ds = s - r.max_s;  // exact for s near the max (Sterbenz), whatever the magnitude
  e.dt = t - r.max_t;
  e.ds_err = diff_error(s, r.max_s, e.ds);  // (compiled away where unused)
  e.dt_err = diff_error(t, r.max_t, e.dt);
  e.ls = e.ds - r.log_sum_s;
  e.lt = e.dt - r.log_sum_t;
  return e;
}

template <class V>
FDISTILL_HD Entry<V> make_entry(V s, V t, const RowLSE<V>& r) {
  Entry<V> e = entry_logits(s, t, r);
  e.q = Ops<V>::exp(e.ls);
  e.p = Ops<V>::exp(e.lt);
  return e;
}

// An entry whose probabilities are known already (the CPU row cache: q = exp(s - shift) times a
// per-tile factor exp(shift - max_s - log_sum_s), no exp here).
template <class V>
FDISTILL_HD Entry<V> make_entry(V s, V t, V q, V p, const RowLSE<V>& r) {
  Entry<V> e = entry_logits(s, t, r);
  e.q = q;
  e.p = p;
  return e;
}

// w * (a - b), and exactly 0 where the weight w is 0 (never 0 * inf).
template <class V>
FDISTILL_HD V weighted(V w, V a, V b) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  return O::where(O::gt(w, zero), w * (a - b), zero);
}

// (ds - dt) - (k_hi + k_lo) of an entry, rounded once where the result is small: ds - dt
// is formed exactly as a float pair (two-sum, plus the errors of ds and dt) before the
// constant is taken off. At large logits |ds - dt| ~ 100s, and the plain difference would
// carry half an ulp of that into q (ls - lt - KL), the reverse-KL gradient, wherever q ~ 1.
// Infinite or NaN differences pass through unchanged.
template <class V>
FDISTILL_HD V exact_gap(const Entry<V>& e, V k_hi, V k_lo) {
  const V d = e.ds - e.dt;
  const V err = diff_error(e.ds, e.dt, d) + (e.ds_err - e.dt_err);
  return (d - k_hi) + (err - k_lo);
}

// log(exp(a) + exp(b)), -inf when both are -inf.
template <class V>
FDISTILL_HD V log_add_exp(V a, V b) {
  using O = Ops<V>;
  const V hi = O::max(a, b), lo = O::min(a, b);
  const V ninf = O::splat(-kInf);
  const V r = hi + O::log1p(O::exp(lo - hi));
  return O::where(O::eq(hi, ninf), ninf, r);
}

// log m for the mixture m = w_t p + w_s q, formed in log space so that it stays
// finite wherever p or q is positive, even when both underflow in fp32.
template <class V>
FDISTILL_HD V log_mixture(const Entry<V>& e, V log_wt, V log_ws) {
  return log_add_exp(e.lt + log_wt, e.ls + log_ws);
}

// expm1(x) for |x| < 1/2 by the degree-14 Taylor polynomial x (1 + x/2 (1 + x/3 (... (1 + x/14)))),
// truncation |x|^14 / 15! < 5e-17 relative.
template <class V>
FDISTILL_HD V expm1_taylor(V x) {
  using O = Ops<V>;
  const V one = O::splat(1);
  V poly = one;
  for (int k = 14; k >= 2; --k) poly = one + x * O::splat(1.0 / k) * poly;
  return x * poly;
}

// exp(x) - 1 to about an ulp from exp alone (no vector expm1): the Taylor polynomial for |x| < 1/2,
// beyond, exp(x) - 1, which cancels nothing there (|exp(x) - 1| >= 0.39).
template <class V>
FDISTILL_HD V accurate_expm1(V x) {
  using O = Ops<V>;
  return O::where(O::lt(O::abs(x), O::splat(0.5)), expm1_taylor(x), O::exp(x) - O::splat(1));
}

// w expm1(x) for a weight w = exp(lw), exactly 0 where w == 0, with one exp: the Taylor polynomial for
// |x| < 1/2, w (exp(x) - 1) below, and from x = 1/2 up exp(lw + x) - w (no cancellation there), which
// overflows only where the term itself does.
template <class V>
FDISTILL_HD V weighted_expm1(V w, V lw, V x) {
  using O = Ops<V>;
  const V zero = O::splat(0), half = O::splat(0.5);
  const auto below = O::lt(x, half);
  const V y = O::exp(O::where(below, x, lw + x));
  const V term = O::where(O::lt(O::abs(x), half), w * expm1_taylor(x), O::where(below, w * (y - O::splat(1)), y - w));
  return O::where(O::gt(w, zero), term, zero);
}

// alpha t + (1 - alpha) s, -inf where both logits are -inf (masked entry).
template <class V>
FDISTILL_HD V alpha_logit(V s, V t, V alpha, V one_minus_alpha) {
  using O = Ops<V>;
  const V ninf = O::splat(-kInf);
  const V z = alpha * t + one_minus_alpha * s;
  return O::where(O::both(O::eq(s, ninf), O::eq(t, ninf)), ninf, z);
}

// Coefficients broadcast to V once per row.
template <class V>
struct RowCoef {
  V param, one_minus, log_wt, log_ws, w_t, w_s, mixture_floor;
  V c0, c1;  // row statistics c0, c1 (see kNumStats)
  AlphaForm alpha_form;  // alpha's gradient form of the row (alpha_grad_form; the sum's form when c1 = 0)
};

template <class V>
FDISTILL_HD RowCoef<V> make_row_coef(const DivCoef& c, double c0, double c1) {
  using O = Ops<V>;
  return RowCoef<V>{O::splat(c.param),     O::splat(1 - c.param),     O::splat(c.log_w_teacher),
                    O::splat(c.log_w_student), O::splat(c.w_teacher), O::splat(c.w_student),
                    O::splat(c.mixture_floor), O::splat(c0),          O::splat(c1),
                    alpha_grad_form(c.param, c1)};
}

// The mixture of an entry: log m, and w x / m for x = p or q (mixture_ratio). From the entry's p and q,
// m and 1/m take one log and one division, where the log-space form takes an exp and a log1p (and
// w x / m one more exp); lanes with m at or below the floor (DivCoef::mixture_floor), or NaN, take the
// log-space forms.
template <class V>
struct Mixture {
  V lm, inv_m;
  typename Ops<V>::Mask direct;  // lanes formed from p and q
  bool all_direct;
};

template <class V>
FDISTILL_HD Mixture<V> mixture(const Entry<V>& e, const RowCoef<V>& k) {
  using O = Ops<V>;
  const V m = k.w_t * e.p + k.w_s * e.q;
  Mixture<V> r{O::log(m), O::splat(1) / m, O::gt(m, k.mixture_floor), false};
  r.all_direct = O::all(r.direct);
  if (!r.all_direct) r.lm = O::where(r.direct, r.lm, log_mixture(e, k.log_wt, k.log_ws));
  return r;
}

// w x / m for w = exp(lw) and x = exp(lx) (p or q), 0 where m is empty. In log space as one exp: x / m
// alone can overflow where w x / m (at most 1 when w x is a term of m) does not.
template <class V>
FDISTILL_HD V mixture_ratio(V w, V lw, V x, V lx, const Mixture<V>& mix) {
  using O = Ops<V>;
  const V direct = w * (x * mix.inv_m);
  if (mix.all_direct) return direct;
  const V zero = O::splat(0);
  const V logspace = O::where(O::gt(mix.lm, O::splat(-kInf)), O::exp((lw + lx) - mix.lm), zero);
  return O::where(mix.direct, direct, logspace);
}

// X = lt - ls of an entry as (dt - ds) - c0, c0 = log-sum_t - log-sum_s (alpha_log_sum_gap): exact where
// ds, dt are small, where lt - ls would carry the rounding of both log-sums.
template <class V>
FDISTILL_HD V alpha_x(const Entry<V>& e, const RowCoef<V>& k) {
  return (e.dt - e.ds) - k.c0;
}

// alpha's c0 in its Student form (and in the second pass of every form): the gap of the log-sums as the row
// statistics round them, stats[3] - stats[1].
template <class acc_t>
FDISTILL_HD double alpha_log_sum_gap(double log_sum_s, double log_sum_t) {
  const double s = static_cast<acc_t>(log_sum_s), t = static_cast<acc_t>(log_sum_t);
  return static_cast<acc_t>(t - s);
}

// An entry's term of A - 1 in the alpha divergence's Student / Teacher form (see alpha_form):
// q expm1(a X) or p expm1(-(1 - a) X); 1 - a as rounded from double (k.one_minus).
template <class V>
FDISTILL_HD V alpha_term(const Entry<V>& e, const RowCoef<V>& k) {
  const V x = alpha_x(e, k);
  if (k.alpha_form == AlphaForm::Student) return weighted_expm1(e.q, e.ls, k.param * x);
  return weighted_expm1(e.p, e.lt, (Ops<V>::splat(0) - k.one_minus) * x);
}

// alpha's gradient in the Student form from the entry's term T = q expm1(alpha X) (alpha_term):
// (q (A - 1) - T) / alpha, c1 = A - 1: no O(alpha) cancellation in q - r.
template <class V>
FDISTILL_HD V alpha_grad_from_term(V q, V term, const RowCoef<V>& k) {
  return (q * k.c1 - term) / k.param;
}

// The mixture divergences and TV take their gradient in the form dL/ds = grad_from_part(q, u, k) with
// u = grad_part(e, k) free of the row scalar c0, so the pass that finds c0 can store u and the
// gradient pass needs neither the logits nor an exp:
//   jsd:             (1 - beta) q (u - c0),  u = ls - log m              (0 where q == 0)
//   skew_kl:         (1 - lambda) (q c0 - u),  u = q p / m
//   skew_reverse_kl: q (u - c0),  u = log(q/m) - lambda q/m (the +1 cancels) (0 where q == 0)
//   tv:              1/2 q (u - c0),  u = sign(q - p), sign(0) = 0
FDISTILL_HD constexpr bool has_grad_part(Divergence d) {
  return d == Divergence::JSD || d == Divergence::SkewKL || d == Divergence::SkewReverseKL ||
         d == Divergence::TV;
}

// Second pass of the two-pass divergences: the loss integrand, the integrand of the row scalar c0
// that the gradient needs and, for the divergences above, grad_part (one mixture for all three).
template <Divergence D, class V>
FDISTILL_HD void second_pass_terms(const Entry<V>& e, const RowCoef<V>& k, V& loss, V& aux, V& part) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  part = zero;
  if constexpr (D == Divergence::JSD) {
    const V lm = log_mixture(e, k.log_wt, k.log_ws);  // log space: ls - lm cancels the rounding of ls
    const V kl_q = weighted(e.q, e.ls, lm);
    loss = k.param * weighted(e.p, e.lt, lm) + k.one_minus * kl_q;
    aux = kl_q;
    part = e.ls - lm;
  } else if constexpr (D == Divergence::SkewKL) {
    const Mixture<V> mix = mixture(e, k);
    loss = weighted(e.p, e.lt, mix.lm);
    aux = part = mixture_ratio(e.q, e.ls, e.p, e.lt, mix);  // q p / m
  } else if constexpr (D == Divergence::SkewReverseKL) {
    const Mixture<V> mix = mixture(e, k);
    const V r = mixture_ratio(k.w_s, k.log_ws, e.q, e.ls, mix);  // lambda q / m, in [0, 1]
    loss = weighted(e.q, e.ls, mix.lm);
    // q (log(q/m) - lambda q/m); the "+1" of the integrand cancels in the gradient.
    aux = loss - e.q * r;
    part = e.ls - mix.lm - r;
  } else if constexpr (D == Divergence::TV) {
    const V diff = e.q - e.p, one = O::splat(1);
    loss = O::splat(0.5) * O::abs(diff);
    aux = O::where(O::gt(diff, zero), e.q, O::where(O::lt(diff, zero), zero - e.q, zero));
    part = O::where(O::gt(diff, zero), one, O::where(O::lt(diff, zero), zero - one, zero));
  } else if constexpr (D == Divergence::Alpha) {  // the terms of A - 1 (none in the Log form)
    loss = k.alpha_form == AlphaForm::Log ? zero : alpha_term(e, k);
    aux = zero;
  } else {
    loss = zero;
    aux = zero;
  }
}

template <Divergence D, class V>
FDISTILL_HD void second_pass_terms(const Entry<V>& e, const RowCoef<V>& k, V& loss, V& aux) {
  V part;  // (computed away)
  second_pass_terms<D>(e, k, loss, aux, part);
}

template <Divergence D, class V>
FDISTILL_HD V grad_part(const Entry<V>& e, const RowCoef<V>& k) {
  V loss, aux, part;  // (loss and aux computed away)
  second_pass_terms<D>(e, k, loss, aux, part);
  return part;
}

template <Divergence D, class V>
FDISTILL_HD V grad_from_part(V q, V u, const RowCoef<V>& k) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  if constexpr (D == Divergence::JSD) return O::where(O::gt(q, zero), k.one_minus * q * (u - k.c0), zero);
  if constexpr (D == Divergence::SkewKL) return k.one_minus * (q * k.c0 - u);
  if constexpr (D == Divergence::SkewReverseKL) return O::where(O::gt(q, zero), q * (u - k.c0), zero);
  if constexpr (D == Divergence::TV) return O::splat(0.5) * q * (u - k.c0);
  return zero;
}

// dL/ds for one entry (before the upstream gradient and the 1/T factor).
template <Divergence D, class V>
FDISTILL_HD V grad_entry(const Entry<V>& e, const RowCoef<V>& k) {
  using O = Ops<V>;
  const V zero = O::splat(0);
  // q (ls - lt - KL(q||p)) = q ((ds - dt) - (c0 + c1)), 0 where q == 0
  auto reverse_kl_grad = [&]() { return O::where(O::gt(e.q, zero), e.q * exact_gap(e, k.c0, k.c1), zero); };
  if constexpr (D == Divergence::ForwardKL) {
    return e.q - e.p;
  } else if constexpr (D == Divergence::ReverseKL) {
    return reverse_kl_grad();
  } else if constexpr (D == Divergence::Jeffreys) {
    return k.one_minus * (e.q - e.p) + k.param * reverse_kl_grad();
  } else if constexpr (has_grad_part(D)) {
    return grad_from_part<D>(e.q, grad_part<D>(e, k), k);
  } else {  // Alpha: (A / alpha) (q - r), r = softmax(alpha t + (1 - alpha) s) = q exp(alpha X) / A
    if (k.alpha_form == AlphaForm::Student) return alpha_grad_from_term(e.q, alpha_term(e, k), k);
    const V r = O::exp(alpha_logit(e.ds, e.dt, k.param, k.one_minus) - k.c0);
    return k.c1 * (e.q - r);  // c1 = A / alpha
  }
}

// ---------------------------------------------------------------- per row
// Running (max, sum exp(x - max)) of an online log-sum-exp, plus optional
// sums weighted by exp(x - max) that are rescaled with it.
struct OnlineLSE {
  double max = -kInf;
  double sum = 0;
  double weighted = 0;  // sum exp(x - max) * w(x)
  // A fixed shift for the weights w(x): the first finite max of the row, so that
  // terms like (t - ref_t) - (s - ref_s) stay small when logits carry a large offset.
  double ref = 0;
  bool has_ref = false;

  // The shift to subtract before exponentiating (finite even for an all -inf row).
  FDISTILL_HD double shift() const { return max == -kInf ? 0 : max; }

  // Raise the running max to at least m, rescaling the sums; returns the new shift.
  FDISTILL_HD double raise(double m) {
    if (m > max) {
      const double scale = std::exp(max - m);  // 0 when max was -inf
      sum *= scale;
      weighted *= scale;
      max = m;
      if (!has_ref && m < kInf) {
        ref = m;
        has_ref = true;
      }
    } else if (m != m) {
      max = m;  // NaN logits poison the row
    }
    return shift();
  }

  // -inf for an all -inf row, NaN when a logit was NaN.
  FDISTILL_HD double lse() const {
    if (max == -kInf) return -kInf;
    if (!(max < kInf)) return NAN;  // a NaN or +inf logit
    return max + std::log(sum);
  }

  // LSE - ref, without the cancellation of two large numbers.
  FDISTILL_HD double lse_minus_ref() const { return (max - ref) + std::log(sum); }

  // Merge the sums (m, s, w) of another slice of the row, taken relative to the same reference
  // (associative): both rescaled to the larger max (NaN wins, an all -inf slice adds 0).
  FDISTILL_HD void add(double m, double s, double w) {
    const double top = Ops<double>::max(max, m);
    auto scale = [top](double x) { return x == -kInf ? 0.0 : std::exp(x - top); };
    const double mine = scale(max), theirs = scale(m);
    sum = sum * mine + s * theirs;
    weighted = weighted * mine + w * theirs;
    max = top;
  }
};

// The row's sums after all passes, reduced to the loss and the saved statistics.
struct RowSums {
  OnlineLSE s, t, z;  // student, teacher, alpha mixture logit
  double loss2 = 0;   // second-pass loss sum
  double aux2 = 0;    // second-pass row scalar
};

// The first-pass sums of one row over a slice of its vocabulary (a vocabulary shard) as kNumPartials
// doubles, merged across slices by merge_partials:
//   [0..4] student: max, sum exp(s - max), weighted sum, reference (the slice's first finite max), has_ref
//   [5..9] teacher: the same
//   [10, 11] alpha mixture logit alpha (t - ref_t) + (1 - alpha) (s - ref_s): max, sum exp(z - max)
// (weighted sums: reverse KL exp(s - max_s) ((s - ref_s) - (t - ref_t)), forward KL exp(t - max_t)
// ((t - ref_t) - (s - ref_s)), as OnlineLSE::weighted).
constexpr int kNumPartials = 12;

FDISTILL_HD void store_partials(const RowSums& r, double* out) {
  const OnlineLSE* sides[2] = {&r.s, &r.t};
  for (int i = 0; i < 2; ++i) {
    double* o = out + 5 * i;
    o[0] = sides[i]->max;
    o[1] = sides[i]->sum;
    o[2] = sides[i]->weighted;
    o[3] = sides[i]->ref;
    o[4] = sides[i]->has_ref ? 1 : 0;
  }
  out[10] = r.z.max;
  out[11] = r.z.sum;
}

// The RowSums of a whole row from the partials of its n slices (parts[i * stride]; the same, up to
// rounding, however the row was split): the references are the first slice's that has one, and each
// slice's weighted sums and mixture logit are re-based to them exactly in double,
//   (s - R_s) - (t - R_t) = ((s - ref_s) - (t - ref_t)) + (ref_s - R_s) - (ref_t - R_t).
// A slice without a reference (all -inf on that side) has sums 0 or +inf there: the shift is moot.
FDISTILL_HD RowSums merge_partials(const double* parts, int64_t n, int64_t stride, double alpha) {
  RowSums r;
  for (int64_t i = 0; i < n; ++i) {
    const double* p = parts + i * stride;
    if (!r.s.has_ref && p[4] != 0) r.s.ref = p[3], r.s.has_ref = true;
    if (!r.t.has_ref && p[9] != 0) r.t.ref = p[8], r.t.has_ref = true;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double* p = parts + i * stride;
    const double ds = p[3] - r.s.ref, dt = p[8] - r.t.ref;
    r.s.add(p[0], p[1], p[2] + p[1] * (ds - dt));
    r.t.add(p[5], p[6], p[7] + p[6] * (dt - ds));
    r.z.add(p[10] + (alpha * dt + (1 - alpha) * ds), p[11], 0);
  }
  return r;
}

// How a row is treated, from its two log-sum-exps:
//   Normal;
//   Empty: student and teacher logits all -inf (a padding row): loss 0, gradient 0;
//   Undefined: only one of them all -inf (no distribution), or a NaN / +inf logit:
//              loss NaN, gradient NaN (propagated, never hidden).
enum class RowKind { Normal, Empty, Undefined };

FDISTILL_HD RowKind row_kind(double lse_s, double lse_t) {
  auto finite = [](double x) { return x > -kInf && x < kInf; };  // false for NaN
  if (lse_s == -kInf && lse_t == -kInf) return RowKind::Empty;
  return finite(lse_s) && finite(lse_t) ? RowKind::Normal : RowKind::Undefined;
}

// Finish a row: returns the loss and writes stats[kNumStats].
template <Divergence D, class acc_t>
FDISTILL_HD acc_t finish_row(const RowSums& r, const DivCoef& c, acc_t* stats) {
  const double log_sum_s = std::log(r.s.sum), log_sum_t = std::log(r.t.sum);
  stats[0] = static_cast<acc_t>(r.s.max);
  stats[1] = static_cast<acc_t>(log_sum_s);
  stats[2] = static_cast<acc_t>(r.t.max);
  stats[3] = static_cast<acc_t>(log_sum_t);
  stats[4] = 0;
  stats[5] = 0;
  switch (row_kind(r.s.lse(), r.t.lse())) {
    case RowKind::Empty: return 0;
    case RowKind::Undefined: return static_cast<acc_t>(NAN);
    case RowKind::Normal: break;
  }
  // weighted sums hold E[(t - ref_t) - (s - ref_s)] * sum, so
  // KL(p||q) = E_p[t - s] - LSE(t) + LSE(s) = w_t / z_t - ((LSE(t) - ref_t) - (LSE(s) - ref_s))
  const double lse_gap = r.t.lse_minus_ref() - r.s.lse_minus_ref();
  const double fkl = r.t.weighted / r.t.sum - lse_gap;
  const double rkl = r.s.weighted / r.s.sum + lse_gap;
  double loss = 0;
  if constexpr (D == Divergence::ForwardKL) {
    loss = fkl;
  } else if constexpr (D == Divergence::ReverseKL || D == Divergence::Jeffreys) {
    loss = D == Divergence::ReverseKL ? rkl : (1 - c.param) * fkl + c.param * rkl;
    const double c0 = rkl + log_sum_s - log_sum_t;  // KL(q||p) + (LSE(s) - max s) - (LSE(t) - max t)
    stats[4] = static_cast<acc_t>(c0);
    stats[5] = static_cast<acc_t>(c0 - static_cast<double>(stats[4]));
  } else if constexpr (D == Divergence::Alpha) {
    // z was accumulated as alpha (t - ref_t) + (1 - alpha) (s - ref_s); shift it to the row maxima:
    // log A = LSE(alpha (t - max t) + (1 - alpha)(s - max s)) - alpha log_sum_t - (1 - alpha) log_sum_s
    if (r.z.max == kInf) {  // alpha outside (0, 1) and disjoint supports: A and the loss are infinite
      stats[4] = stats[5] = static_cast<acc_t>(kInf);
      return static_cast<acc_t>(kInf);
    }
    const double a = c.param;
    const double lse_z = r.z.lse() - a * (r.t.max - r.t.ref) - (1 - a) * (r.s.max - r.s.ref);
    const double log_a = lse_z - a * log_sum_t - (1 - a) * log_sum_s;
    const AlphaForm form = alpha_form(a);
    stats[4] = static_cast<acc_t>(lse_z);
    if (form == AlphaForm::Log) {
      // a outside [0, 1]: A >= 1 and (1 - A) / (a (1 - a)) = exp(log A - log(a (a - 1))) (1 - 1/A),
      // finite wherever the loss is, even where A (or A / a) is not
      stats[5] = static_cast<acc_t>(std::copysign(std::exp(log_a - std::log(std::fabs(a))), a));
      loss = std::exp(log_a - std::log(a * (a - 1))) * -std::expm1(-log_a);
    } else {
      const double a_minus_1 = r.loss2;  // sum of alpha_term over the row
      loss = -a_minus_1 / (a * (1 - a));
      // The gradient's scalars. A is good to its last bits as 1 + (A - 1) where A >= 1/2, as exp(log A)
      // below. The Student form needs A - 1 (q - r is O(a) where A is near 1) and the stored log-sums'
      // gap (its X = (dt - ds) - c0 is exact where ds, dt are small); a row whose A is not near 1 (but
      // not 0) takes the ratio form instead, marked by the sign of c1 = A / a.
      const acc_t ratio = static_cast<acc_t>((a_minus_1 >= -0.5 ? 1 + a_minus_1 : std::exp(log_a)) / a);
      if (form == AlphaForm::Student && (std::fabs(a_minus_1) <= 0.5 || !(ratio * a > 0))) {
        stats[4] = static_cast<acc_t>(alpha_log_sum_gap<acc_t>(log_sum_s, log_sum_t));
        stats[5] = static_cast<acc_t>(a_minus_1);
      } else {
        stats[5] = ratio;
      }
    }
  } else {
    loss = r.loss2;
    stats[4] = static_cast<acc_t>(r.aux2);
  }
  return static_cast<acc_t>(loss);
}

}  // namespace fdistill

// Ops<V> for ATen's SIMD vectors, so the formulas of divergence_math.h run
// vectorised on the CPU. Included once per instruction set (see kernels.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "fdistill/divergence_math.h"

namespace fdistill {
// Per instruction set, like ATen's Vectorized: each row_kernels_<isa>.cpp gets its own copy,
// so no inline function here has one name and two bodies across files.
namespace CPU_CAPABILITY {

// exp of float lanes to about 1 ulp, about as cheap as ATen's exp_u20 (whose error reaches
// 4e-5 relative, hundreds of ulps, near x = -7: enough to move the KL statistics at large logits).
//   exp(x) = 2^n exp(r),  n = round(x / ln 2),  r = x - n ln 2 in two steps (Cody-Waite),
//   |r| <= ln(2)/2, exp(r) by its degree-7 Taylor polynomial (truncation 5e-9 relative).
// 0 below log(FLT_MIN) (and at -inf; results there would be subnormal), +inf above
// 127 ln 2 (where 2^n would overflow; exp is at most 2^127 * 1.41 there), NaN kept (it
// propagates through the clamp and the polynomial).
inline at::vec::Vectorized<float> exp_float(const at::vec::Vectorized<float>& x) {
  using Vf = at::vec::Vectorized<float>;
  using Vi = at::vec::Vectorized<int32_t>;
  const Vf lo(-87.3365478515625f), hi(88.02969193111305f);  // log(FLT_MIN), 127 ln 2
  const Vf xc = at::vec::minimum(at::vec::maximum(x, lo), hi);
  const Vf n = (xc * Vf(1.44269504088896341f)).round();
  Vf r = at::vec::fmadd(n, Vf(-0.693145751953125f), xc);  // ln 2 = 0.693145751953125 + 1.42860682e-6
  r = at::vec::fmadd(n, Vf(-1.428606765330187e-06f), r);
  Vf p(1.f / 5040);
  p = at::vec::fmadd(p, r, Vf(1.f / 720));
  p = at::vec::fmadd(p, r, Vf(1.f / 120));
  p = at::vec::fmadd(p, r, Vf(1.f / 24));
  p = at::vec::fmadd(p, r, Vf(1.f / 6));
  p = at::vec::fmadd(p, r, Vf(0.5f));
  p = at::vec::fmadd(p, r, Vf(1.f));
  p = at::vec::fmadd(p, r, Vf(1.f));
  // 2^n from the exponent bits, n in [-126, 127]
  const Vf scale = at::vec::cast<float>((at::vec::convert_to_int_of_same_size(n) + Vi(127)) << Vi(23));
  const Vf y = Vf::blendv(p * scale, Vf(0.f), x < lo);
  return Vf::blendv(y, Vf(std::numeric_limits<float>::infinity()), x > hi);
}

template <class S>
struct VecOps {
  using V = at::vec::Vectorized<S>;
  using Mask = V;  // comparisons give all-ones lanes
  static V splat(double x) { return V(static_cast<S>(x)); }
  static V exp(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      return exp_float(x);
    } else {
      return x.exp();
    }
  }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }  // propagates NaN
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V gt(const V& a, const V& b) { return a > b; }
  static V lt(const V& a, const V& b) { return a < b; }
  static V eq(const V& a, const V& b) { return a == b; }
  static V both(const V& a, const V& b) { return a & b; }
  static bool all(const V& m) { return m.zero_mask() == 0; }  // no lane 0 (a lane is 0 or all ones)
  static V where(const V& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace CPU_CAPABILITY

template <>
struct Ops<at::vec::Vectorized<float>> : CPU_CAPABILITY::VecOps<float> {};
template <>
struct Ops<at::vec::Vectorized<double>> : CPU_CAPABILITY::VecOps<double> {};

}  // namespace fdistill

// Ops<V> for ATen's SIMD vectors, so the formulas of divergence_math.h run
// vectorised on the CPU. Included once per instruction set (see kernels.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "fdistill/divergence_math.h"

namespace fdistill {

template <class S>
struct VecOps {
  using V = at::vec::Vectorized<S>;
  using Mask = V;  // comparisons give all-ones lanes
  static V splat(double x) { return V(static_cast<S>(x)); }
  static V exp(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      return x.exp_u20();  // <= 20 ulp, 0 below log(FLT_MIN) (and at -inf)
    } else {
      return x.exp();
    }
  }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }  // propagates NaN
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V gt(const V& a, const V& b) { return a > b; }
  static V lt(const V& a, const V& b) { return a < b; }
  static V eq(const V& a, const V& b) { return a == b; }
  static V both(const V& a, const V& b) { return a & b; }
  static V where(const V& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

template <>
struct Ops<at::vec::Vectorized<float>> : VecOps<float> {};
template <>
struct Ops<at::vec::Vectorized<double>> : VecOps<double> {};

}  // namespace fdistill

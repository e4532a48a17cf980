// CPU row kernels of the f-divergence operators (fdiv_args.h), compiled once per
// instruction set next to the divergence kernels (row_kernels_<isa>.cpp include
// this file after row_kernels.h, whose helpers it uses).
//
// Per row: the logits are scaled and copied once into a buffer in the accumulation
// type (L2-resident up to V ~ 256k in fp32), max-shifted, and every sweep of the
// tau search reads that buffer, not the logits.
#pragma once

#include <cmath>
#include <vector>

#include "cpu/row_kernels.h"
#include "fdistill/fdiv_args.h"

namespace fdistill::cpu {
namespace CPU_CAPABILITY {

// Sum of vector terms in double: float lanes hold at most kFlush terms each
// before they are added to the double total (S0 must be good to ~1e-7 for the
// tolerance on sum p - 1; lanes over a whole 32k row would lose ~1e-5).
template <class acc_t>
struct ChunkedSum {
  static constexpr int kFlush = 16;
  Vectorized<acc_t> lanes = Vectorized<acc_t>(acc_t(0));
  int count = 0;
  double total = 0;
  void add(const Vectorized<acc_t>& v) {
    lanes += v;
    if (++count == kFlush) flush();
  }
  double flush() {
    total += horizontal_sum(lanes);
    lanes = Vectorized<acc_t>(acc_t(0));
    count = 0;
    return total;
  }
};

// One row: x = theta - max theta (padded with -inf), q (padded; null when constant).
template <class acc_t>
struct FDivRow {
  acc_t* x;
  const acc_t* q;  // null: the constant reference value
  acc_t q_value;
  int64_t padded;  // a whole number of vectors
  Vectorized<acc_t> q_at(int64_t i) const { return q ? Vectorized<acc_t>::loadu(q + i) : Vectorized<acc_t>(q_value); }
};

// (S0, S1) = sum q ((f*)'(x - tau), (f*)''(x - tau)) at the search variable t (S1' for the general alpha:
// SweepPoint), and the terms q (f*)'(x - tau) of S0 into terms (padded length): p before its normalisation
// when t is the answer (a store per entry, against a pass with exp and log1p per entry to form p again).
template <FKind K, class acc_t>
void conj_sums(const FDivRow<acc_t>& r, const FCoef& c, double t, double& s0, double& s1, acc_t* terms) {
  using Vec = Vectorized<acc_t>;
  const TilePoint<Vec> pt = tile_point<Vec>(sweep_point<acc_t>(K, c, t), c);
  ChunkedSum<acc_t> sum0, sum1;
  for (int64_t i = 0; i < r.padded; i += Vec::size()) {
    const Vec x = Vec::loadu(r.x + i), q = r.q_at(i);
    Vec d1, d2;
    if constexpr (K == FKind::KL) {
      d1 = conj_grad_at<K>(x, pt);
    } else {
      conj_grads_at<K>(x, pt, d1, d2);
      sum1.add(q * d2);
    }
    const Vec term = q * d1;
    sum0.add(term);
    if (terms) term.store(terms + i);
  }
  s0 = sum0.flush();
  s1 = sum1.flush();
}

// p = q (f*)'(x - tau) / S0 at the search variable t, into dst (acc_t, padded length); the same bits as
// scale_terms on conj_sums's terms at t.
template <FKind K, class acc_t>
void write_probs(const FDivRow<acc_t>& r, const FCoef& c, double t, double s0, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  const TilePoint<Vec> pt = tile_point<Vec>(sweep_point<acc_t>(K, c, t), c);
  const Vec inv_s0 = Vec(static_cast<acc_t>(1 / s0));
  for (int64_t i = 0; i < r.padded; i += Vec::size()) {
    (r.q_at(i) * conj_grad_at<K>(Vec::loadu(r.x + i), pt) * inv_s0).store(dst + i);
  }
}

// dst = terms / S0 in place (padded length): conj_sums's terms at the answer made p.
template <class acc_t>
void scale_terms(acc_t* dst, int64_t padded, double s0) {
  using Vec = Vectorized<acc_t>;
  const Vec inv_s0 = Vec(static_cast<acc_t>(1 / s0));
  for (int64_t i = 0; i < padded; i += Vec::size()) (Vec::loadu(dst + i) * inv_s0).store(dst + i);
}

template <class acc_t>
struct RowScratch {
  std::vector<acc_t> x, q, p, y;
  void reserve(int64_t n) {
    x.resize(n);
    q.resize(n);
    p.resize(n);
    y.resize(n);
  }
};

// The row's reference measure q in buf.q (padding 1: x = -inf there carries no mass), or null for the
// constant a.reference_value.
template <class acc_t>
const acc_t* load_reference(const FDivArgs& a, int64_t row, int64_t padded, RowScratch<acc_t>& buf) {
  if (a.reference == nullptr) return nullptr;
  const auto* q = static_cast<const acc_t*>(a.reference) + row * a.reference_stride;
  std::copy(q, q + a.vocab, buf.q.data());
  std::fill(buf.q.data() + a.vocab, buf.q.data() + padded, acc_t(1));
  return buf.q.data();
}

// Loads theta = logits / T into x (padded with -inf).
template <class scalar_t, class acc_t>
void load_theta(const FDivArgs& a, int64_t row, FDivRow<acc_t>& r, RowScratch<acc_t>& buf) {
  const auto* src = static_cast<const scalar_t*>(a.logits) + row * a.logits_stride;
  r.x = buf.x.data();
  r.padded = load_scaled(src, a.vocab, static_cast<acc_t>(a.inv_temperature), r.x);
}

// x = theta - m (m finite), and the row's reference measure.
template <class acc_t>
void shift_row(const FDivArgs& a, int64_t row, acc_t m, FDivRow<acc_t>& r, RowScratch<acc_t>& buf) {
  using Vec = Vectorized<acc_t>;
  const Vec shift = Vec(m);
  for (int64_t i = 0; i < r.padded; i += Vec::size()) (Vec::loadu(r.x + i) - shift).store(r.x + i);
  r.q = load_reference(a, row, r.padded, buf);
  r.q_value = static_cast<acc_t>(a.reference_value);
}

// Loads theta = logits / T into x, returns its max (NaN when the row has a NaN or
// +inf, -inf when every entry is -inf) and shifts x by it.
template <class scalar_t, class acc_t>
acc_t load_shifted(const FDivArgs& a, int64_t row, FDivRow<acc_t>& r, RowScratch<acc_t>& buf) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  load_theta<scalar_t>(a, row, r, buf);
  Vec vmax = O::splat(-kInf);
  for (int64_t i = 0; i < r.padded; i += Vec::size()) vmax = O::max(vmax, Vec::loadu(r.x + i));
  const acc_t m = horizontal_max(vmax);
  if (m > -kInf && m < kInf) shift_row(a, row, m, r, buf);
  return m;
}

// Solves for tau; returns (t, S0 at t) (TauSearch's best point), and whether terms (padded length) holds that
// point's q (f*)'(x - tau) (the last sweep's: scale_terms makes them p). KL: tau = 0 and S0 = sum q exp(x)
// (closed form).
template <FKind K, class acc_t>
bool solve_tau(const FDivArgs& a, const FDivRow<acc_t>& r, double& tau, double& s0, acc_t* terms) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  double s1 = 0;
  if constexpr (K == FKind::KL) {
    tau = 0;
    conj_sums<K>(r, a.coef, tau, s0, s1, terms);
    return true;
  }
  // the bracket needs q at an argmax (x = 0), the total q of the entries that are not -inf and their
  // q-weighted sum of x (Jensen's start)
  double q_max = r.q_value;
  int64_t argmax = 0;
  while (r.x[argmax] != 0) ++argmax;
  if (r.q) q_max = r.q[argmax];
  ChunkedSum<acc_t> live_q, live_qx;
  const Vec zero = O::splat(0), ninf = O::splat(-kInf);
  for (int64_t i = 0; i < r.padded; i += Vec::size()) {
    const Vec x = Vec::loadu(r.x + i), q = r.q_at(i);
    const auto live = O::gt(x, ninf);
    live_q.add(O::where(live, q, zero));
    live_qx.add(O::where(live, q * x, zero));
  }
  const double q_total = live_q.flush(), x_mean = live_qx.flush() / q_total;
  TauSearch search = start_tau_search(K, a.coef, q_max, q_total, x_mean, std::numeric_limits<acc_t>::epsilon());
  double last = search.tau;
  for (int64_t sweep = 0;; ++sweep) {
    last = search.tau;
    conj_sums<K>(r, a.coef, last, s0, s1, terms);
    if (tau_step(search, s0, s1, a.tol) || sweep + 1 >= a.max_sweeps) break;
  }
  tau = search.best_t;
  s0 = search.best_s0;
  return tau == last;
}

// The FY target row as probabilities in acc_t (padding 0), or null when there is none.
template <class acc_t>
const acc_t* load_target(const FDivArgs& a, int64_t row, int64_t padded, RowScratch<acc_t>& buf) {
  if (a.target == nullptr) return nullptr;
  acc_t* yb = buf.y.data();
  auto load = [&](auto* base) {
    using src_t = std::remove_const_t<std::remove_pointer_t<decltype(base)>>;
    const src_t* src = base + row * a.target_stride;
    constexpr bool kVectorised = std::is_same_v<src_t, acc_t> ||
                                 (std::is_same_v<acc_t, float> && !std::is_same_v<src_t, double>);
    if constexpr (kVectorised) {
      load_scaled(src, a.vocab, acc_t(1), yb);
    } else {  // a target dtype other than the logits' (rare): convert entry by entry
      for (int64_t j = 0; j < a.vocab; ++j) yb[j] = static_cast<acc_t>(static_cast<float>(src[j]));
    }
  };
  switch (a.target_dtype) {
    case DType::Float32: load(static_cast<const float*>(a.target)); break;
    case DType::Float64: load(static_cast<const double*>(a.target)); break;
    case DType::BFloat16: load(static_cast<const c10::BFloat16*>(a.target)); break;
    case DType::Float16: load(static_cast<const c10::Half*>(a.target)); break;
  }
  std::fill(yb + a.vocab, yb + padded, acc_t(0));
  return yb;
}

inline bool label_in_range(const FDivArgs& a, int64_t row) {
  const int64_t k = a.labels[row];
  return k >= 0 && k < a.vocab;
}

inline bool fdiv_row_ignored(const FDivArgs& a, int64_t row) {
  return a.labels != nullptr && a.labels[row] == a.ignore_index;
}

// Loss integrand sums of mode FYLoss / SoftmaxValue over the row, with p in buf.p.
template <FKind K, class acc_t>
double row_value(const FDivArgs& a, int64_t row, const FDivRow<acc_t>& r, RowScratch<acc_t>& buf) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  const Vec alpha = O::splat(a.coef.alpha), inv_am1 = O::splat(a.coef.inv_am1), zero = O::splat(0);
  const Vec ninf = O::splat(-kInf);
  ChunkedSum<acc_t> sum;
  const acc_t* p = buf.p.data();
  if (a.mode == FDivMode::SoftmaxValue) {
    // sum over live entries of p x - q f(p/q) = sum (p x - [q f(p/q) - q f(0)]) - f(0) sum q
    ChunkedSum<acc_t> live_q;
    for (int64_t i = 0; i < r.padded; i += Vec::size()) {
      const Vec x = Vec::loadu(r.x + i), pv = Vec::loadu(p + i), q = r.q_at(i);
      const auto masked = O::eq(x, ninf);
      sum.add(O::where(masked, zero, pv * x - q_f<K>(pv, q, alpha, inv_am1)));
      live_q.add(O::where(masked, zero, q));
    }
    return sum.flush() - f_at_zero(K, a.coef) * live_q.flush();
  }
  if (const acc_t* y = load_target(a, row, r.padded, buf)) {
    for (int64_t i = 0; i < r.padded; i += Vec::size()) {
      sum.add(fy_entry<K>(Vec::loadu(r.x + i), Vec::loadu(p + i), Vec::loadu(y + i), r.q_at(i), alpha, inv_am1));
    }
  } else {
    for (int64_t i = 0; i < r.padded; i += Vec::size()) {
      sum.add(fy_entry<K, false>(Vec::loadu(r.x + i), Vec::loadu(p + i), zero, r.q_at(i), alpha, inv_am1));
    }
  }
  double loss = sum.flush();
  if (a.labels != nullptr) {  // one-hot y: swap the y = 0 term of the label entry for its y = 1 term
    if (!label_in_range(a, row)) return NAN;
    const int64_t k = a.labels[row];
    const acc_t qk = r.q ? r.q[k] : r.q_value, al = static_cast<acc_t>(a.coef.alpha), ia = static_cast<acc_t>(a.coef.inv_am1);
    loss += static_cast<double>(fy_entry<K, true, acc_t>(r.x[k], p[k], acc_t(1), qk, al, ia)) -
            static_cast<double>(fy_entry<K, true, acc_t>(r.x[k], p[k], acc_t(0), qk, al, ia));
  }
  return loss;
}

template <FKind K, class scalar_t, class acc_t>
void fdiv_forward_rows(const FDivArgs& a, int64_t begin, int64_t end) {
  RowScratch<acc_t> buf;
  buf.reserve(a.vocab + Vectorized<acc_t>::size());
  auto* stats = static_cast<acc_t*>(a.stats);
  for (int64_t row = begin; row < end; ++row) {
    acc_t* st = stats + row * kFDivStats;
    scalar_t* probs = a.mode == FDivMode::SoftArgmax ? static_cast<scalar_t*>(a.out) + row * a.out_stride : nullptr;
    acc_t* value = a.mode == FDivMode::SoftArgmax ? nullptr : static_cast<acc_t*>(a.out) + row;
    if (fdiv_row_ignored(a, row)) {
      st[0] = 0, st[1] = 0, st[2] = 1;
      *value = 0;
      continue;
    }
    FDivRow<acc_t> r;
    const acc_t m = load_shifted<scalar_t, acc_t>(a, row, r, buf);
    if (!(m > -kInf && m < kInf)) {  // all -inf: p = 0, loss 0, value -inf; NaN / +inf: NaN
      const bool empty = m == -kInf;
      st[0] = m, st[1] = empty ? 0 : m, st[2] = empty ? 1 : m;
      if (probs) std::fill(probs, probs + a.vocab, scalar_t(empty ? 0.0f : NAN));
      if (value) *value = empty ? (a.mode == FDivMode::FYLoss ? 0 : -kInf) : NAN;
      continue;
    }
    double tau = 0, s0 = 1;
    const bool have_terms = solve_tau<K, acc_t>(a, r, tau, s0, buf.p.data());
    s0 = static_cast<double>(static_cast<acc_t>(s0));  // the stored S0, as the backward divides by
    if (have_terms) {
      scale_terms(buf.p.data(), r.padded, s0);
    } else {
      write_probs<K>(r, a.coef, tau, s0, buf.p.data());
    }
    st[0] = m, st[1] = static_cast<acc_t>(tau), st[2] = static_cast<acc_t>(s0);
    if (probs) {
      store_converted(buf.p.data(), a.vocab, probs);
    } else {
      const double v = row_value<K, acc_t>(a, row, r, buf);
      *value = static_cast<acc_t>(a.mode == FDivMode::SoftmaxValue ? m + v : v);
    }
  }
}

// grad_logits = grad_rows / T (p - y), p recomputed from the stats.
template <FKind K, class scalar_t, class acc_t>
void fdiv_backward_rows(const FDivArgs& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  RowScratch<acc_t> buf;
  buf.reserve(a.vocab + Vec::size());
  const auto* stats = static_cast<const acc_t*>(a.stats);
  const auto* grad_rows = static_cast<const acc_t*>(a.grad_rows);
  for (int64_t row = begin; row < end; ++row) {
    scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * a.grad_stride;
    const acc_t* st = stats + row * kFDivStats;
    const acc_t g = grad_rows[row * a.grad_rows_stride] * static_cast<acc_t>(a.inv_temperature);
    const acc_t m = st[0];
    if (fdiv_row_ignored(a, row) || m == -kInf || (g == 0 && m == m)) {
      std::fill(out, out + a.vocab, scalar_t(0));
      continue;
    }
    FDivRow<acc_t> r;
    const acc_t m_now = load_shifted<scalar_t, acc_t>(a, row, r, buf);
    if (!(m_now > -kInf && m_now < kInf) || m != m_now) {  // a NaN / +inf row (or stats not of these logits)
      std::fill(out, out + a.vocab, scalar_t(NAN));
      continue;
    }
    acc_t* p = buf.p.data();
    write_probs<K>(r, a.coef, st[1], st[2], p);
    const Vec scale = O::splat(g);
    if (const acc_t* y = load_target(a, row, r.padded, buf)) {
      for (int64_t i = 0; i < r.padded; i += Vec::size()) ((Vec::loadu(p + i) - Vec::loadu(y + i)) * scale).store(p + i);
    } else {
      for (int64_t i = 0; i < r.padded; i += Vec::size()) (Vec::loadu(p + i) * scale).store(p + i);
      if (a.labels != nullptr) {
        if (!label_in_range(a, row)) {
          std::fill(out, out + a.vocab, scalar_t(NAN));
          continue;
        }
        p[a.labels[row]] -= g;
      }
    }
    store_converted(p, a.vocab, out);
  }
}

// f-softargmax's backward (fdiv_softargmax_bwd): grad_logits = w (g - <w, g> / sum w) / T from the saved
// p* and the incoming g (a.logits holds p*), w = jacobian_weight, kept in the row buffer between sweeps.
// g is taken relative to its value g* at the largest w: where one entry holds most of the weight,
// g* - <w, g> / sum w cancels to O(the other entries' weight), and as sum w (g - g*) / sum w it does not
// (fp32: 1e-5 of that entry's gradient instead of 2%). Entries with w = 0 (p* = 0, or NaN: the
// reference's convention) get 0 where g is finite, and so does an empty row.
template <FKind K, class scalar_t, class acc_t>
void fdiv_softargmax_backward_rows(const FDivArgs& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  RowScratch<acc_t> buf;
  buf.reserve(a.vocab + Vec::size());
  const Vec two_minus_alpha = O::splat(2 - a.coef.alpha), alpha_m1 = O::splat(a.coef.alpha - 1);
  const Vec zero = O::splat(0), q_value = O::splat(a.reference_value);
  acc_t* w_buf = buf.x.data();
  acc_t* g_buf = buf.y.data();
  for (int64_t row = begin; row < end; ++row) {
    const auto* p_row = static_cast<const scalar_t*>(a.logits) + row * a.logits_stride;
    const auto* g_row = static_cast<const scalar_t*>(a.grad_out) + row * a.grad_out_stride;
    const int64_t padded = load_scaled(p_row, a.vocab, acc_t(1), buf.p.data());
    load_scaled(g_row, a.vocab, acc_t(1), g_buf);
    std::fill(g_buf + a.vocab, g_buf + padded, acc_t(0));  // (padding: w = 0, no 0 * -inf)
    const acc_t* q = load_reference(a, row, padded, buf);
    Vec w_max = zero;
    for (int64_t i = 0; i < padded; i += Vec::size()) {
      const Vec p = O::max(Vec::loadu(buf.p.data() + i), zero);  // the padding's -inf is p = 0
      const Vec w = jacobian_weight<K>(p, q ? Vec::loadu(q + i) : q_value, two_minus_alpha, alpha_m1);
      w.store(w_buf + i);
      w_max = O::max(w_max, w);
    }
    const acc_t top = horizontal_max(w_max);
    int64_t star = 0;
    while (star < a.vocab && !(w_buf[star] == top)) ++star;
    const Vec g_star = O::splat(star < a.vocab && top > 0 ? g_buf[star] : acc_t(0));
    ChunkedSum<acc_t> total, weighted;
    for (int64_t i = 0; i < padded; i += Vec::size()) {
      const Vec w = Vec::loadu(w_buf + i);
      const Vec dg = Vec::loadu(g_buf + i) - g_star;  // a NaN / inf g makes the row NaN, as the composed product
      dg.store(g_buf + i);
      total.add(w);
      weighted.add(w * dg);
    }
    const double sum_w = total.flush(), sum_wg = weighted.flush();
    const Vec mean = O::splat(sum_w > 0 ? sum_wg / sum_w : 0), inv_t = O::splat(a.inv_temperature);
    for (int64_t i = 0; i < padded; i += Vec::size()) {
      (Vec::loadu(w_buf + i) * (Vec::loadu(g_buf + i) - mean) * inv_t).store(g_buf + i);
    }
    store_converted(g_buf, a.vocab, static_cast<scalar_t*>(a.grad_logits) + row * a.grad_stride);
  }
}

// fdiv_shard: a vocabulary shard at the given stats [m, t, S0] (m the max theta of the whole row): the shard's
// sums of a sweep at t (ShardSums), or its p (ShardProbs). Rows whose m is not finite give 0 (the caller
// flags them); entries above m would be outside the bracket's domain (the caller passes the true max).
template <FKind K, class scalar_t, class acc_t>
void fdiv_shard_rows(const FDivArgs& a, int64_t begin, int64_t end) {
  RowScratch<acc_t> buf;
  buf.reserve(a.vocab + Vectorized<acc_t>::size());
  const auto* stats = static_cast<const acc_t*>(a.stats);
  for (int64_t row = begin; row < end; ++row) {
    const acc_t* st = stats + row * kFDivStats;
    double* sums = a.mode == FDivMode::ShardSums ? static_cast<double*>(a.out) + row * a.out_stride : nullptr;
    acc_t* probs = a.mode == FDivMode::ShardProbs ? static_cast<acc_t*>(a.out) + row * a.out_stride : nullptr;
    const acc_t m = st[0];
    if (!(m > -kInf && m < kInf)) {
      if (sums) sums[0] = sums[1] = 0;
      if (probs) std::fill(probs, probs + a.vocab, acc_t(0));
      continue;
    }
    FDivRow<acc_t> r;
    load_theta<scalar_t>(a, row, r, buf);
    shift_row(a, row, m, r, buf);
    if (sums) {
      conj_sums<K>(r, a.coef, st[1], sums[0], sums[1], static_cast<acc_t*>(nullptr));
    } else {
      write_probs<K>(r, a.coef, st[1], st[2], buf.p.data());
      std::copy(buf.p.data(), buf.p.data() + a.vocab, probs);
    }
  }
}

// Runtime (f kind, dtype) -> template instantiation; the entry points of this instruction set.
template <template <FKind, class, class> class Fn>
void dispatch_fdiv(const FDivArgs& a, int64_t begin, int64_t end) {
  auto by_dtype = [&](auto kind) {
    constexpr FKind K = decltype(kind)::value;
    switch (a.dtype) {
      case DType::Float32: return Fn<K, float, float>::run(a, begin, end);
      case DType::Float64: return Fn<K, double, double>::run(a, begin, end);
      case DType::BFloat16: return Fn<K, c10::BFloat16, float>::run(a, begin, end);
      case DType::Float16: return Fn<K, c10::Half, float>::run(a, begin, end);
    }
  };
  switch (a.kind) {
    case FKind::KL: return by_dtype(std::integral_constant<FKind, FKind::KL>{});
    case FKind::ReverseKL: return by_dtype(std::integral_constant<FKind, FKind::ReverseKL>{});
    case FKind::Alpha: return by_dtype(std::integral_constant<FKind, FKind::Alpha>{});
    case FKind::Alpha15: return by_dtype(std::integral_constant<FKind, FKind::Alpha15>{});
    case FKind::Alpha2: return by_dtype(std::integral_constant<FKind, FKind::Alpha2>{});
    case FKind::AlphaPow: return by_dtype(std::integral_constant<FKind, FKind::AlphaPow>{});
    case FKind::JS: return by_dtype(std::integral_constant<FKind, FKind::JS>{});
  }
}

template <FKind K, class scalar_t, class acc_t>
struct FDivForwardFn {
  static void run(const FDivArgs& a, int64_t b, int64_t e) { fdiv_forward_rows<K, scalar_t, acc_t>(a, b, e); }
};
template <FKind K, class scalar_t, class acc_t>
struct FDivBackwardFn {
  static void run(const FDivArgs& a, int64_t b, int64_t e) { fdiv_backward_rows<K, scalar_t, acc_t>(a, b, e); }
};
template <FKind K, class scalar_t, class acc_t>
struct FDivSoftargmaxBackwardFn {
  static void run(const FDivArgs& a, int64_t b, int64_t e) {
    fdiv_softargmax_backward_rows<K, scalar_t, acc_t>(a, b, e);
  }
};

template <FKind K, class scalar_t, class acc_t>
struct FDivShardFn {
  static void run(const FDivArgs& a, int64_t b, int64_t e) { fdiv_shard_rows<K, scalar_t, acc_t>(a, b, e); }
};

void fdiv_forward_rows(const FDivArgs& a, int64_t begin, int64_t end) { dispatch_fdiv<FDivForwardFn>(a, begin, end); }
void fdiv_shard_rows(const FDivArgs& a, int64_t begin, int64_t end) { dispatch_fdiv<FDivShardFn>(a, begin, end); }
void fdiv_backward_rows(const FDivArgs& a, int64_t begin, int64_t end) { dispatch_fdiv<FDivBackwardFn>(a, begin, end); }
void fdiv_softargmax_backward_rows(const FDivArgs& a, int64_t begin, int64_t end) {
  dispatch_fdiv<FDivSoftargmaxBackwardFn>(a, begin, end);
}

}  // namespace CPU_CAPABILITY
}  // namespace fdistill::cpu

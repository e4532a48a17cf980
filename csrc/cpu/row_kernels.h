// The CPU row kernels, written once and compiled once per instruction set:
// row_kernels_{default,avx2,avx512}.cpp set CPU_CAPABILITY and include this file,
// so every function below lands in namespace fdistill::cpu::<CAPABILITY> (ATen's
// own scheme for its vectorised kernels). cpu_dispatch.cpp picks one at run time.
//
// Each row is processed in chunks of kChunk entries held in a stack buffer:
// the chunk is converted to the accumulation type and scaled by 1/T once, its
// maximum found, and the online log-sum-exp updated with one rescale per chunk.
// The first pass keeps exp(s - shift), exp(t - shift) of the row in a per-thread cache (RowCache:
// 2 x V floats, in L2 at V = 32k), so the second pass and the gradient take q and p by one multiply:
// two exps per logit in all for the KLs (four before), and the gradient of the mixture divergences
// from one stored value per entry (grad_part; alpha's Student form: its term of A - 1).
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/vec_ops.h"
#include "fdistill/row_args.h"

namespace fdistill::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

constexpr int64_t kChunk = 2048;

template <class acc_t>
acc_t horizontal_max(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int i = 1; i < Vectorized<acc_t>::size(); ++i) m = Ops<acc_t>::max(m, lanes[i]);
  return m;
}

template <class acc_t>
double horizontal_sum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double s = 0;
  for (int i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// Float lanes widened to two vectors of doubles (the low and the high half).
inline void widen(const Vectorized<float>& v, Vectorized<double>& lo, Vectorized<double>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
#else
  alignas(64) float f[Vectorized<float>::size()];
  alignas(64) double d[Vectorized<float>::size()];
  v.store(f);
  for (int i = 0; i < Vectorized<float>::size(); ++i) d[i] = f[i];
  lo = Vectorized<double>::loadu(d);
  hi = Vectorized<double>::loadu(d + Vectorized<double>::size());
#endif
}

// sum_i w_i and sum_i w_i ((s_i - ref_s) - (t_i - ref_t)) in double lanes (w_i = 0 terms are 0).
// The reverse-KL gradient q ((s - t) - c0) cancels to a few ulps of c0 wherever
// q ~ 1, and c0 = (sum w gap) / (sum w) ~ 100s at large logits: a relative error
// of 4e-8 in either sum (float lanes adding to a lane that holds ~1) is 1e-5 there.
template <class acc_t>
struct GapSums {
  using Vd = Vectorized<double>;
  Vd weight = Vd(0.0), weighted_gap = Vd(0.0);
  Vd ref_s, ref_t;
  GapSums(double ref_s, double ref_t) : ref_s(ref_s), ref_t(ref_t) {}
  void add(const Vectorized<acc_t>& w, const Vectorized<acc_t>& s, const Vectorized<acc_t>& t) {
    using O = Ops<Vectorized<acc_t>>;
    const Vectorized<acc_t> zero = O::splat(0), live = O::gt(w, zero);
    const Vectorized<acc_t> sm = O::where(live, s, zero), tm = O::where(live, t, zero);  // no 0 * inf
    if constexpr (std::is_same_v<acc_t, double>) {
      accumulate(w, sm, tm);
    } else {
      Vd w0, w1, s0, s1, t0, t1;
      widen(w, w0, w1);
      widen(sm, s0, s1);
      widen(tm, t0, t1);
      accumulate(w0, s0, t0);
      accumulate(w1, s1, t1);
    }
  }
  void accumulate(const Vd& w, const Vd& s, const Vd& t) {
    weight += w;
    // each difference exact in double (float operands): no cancellation of (s - t) - (ref_s - ref_t)
    // when the logits dwarf their differences (s ~ 1e20)
    weighted_gap = at::vec::fmadd(w, (s - ref_s) - (t - ref_t), weighted_gap);
  }
};

// dst[0:n] = src[0:n] / T in acc_t, padded with -inf to a whole number of
// vectors (a -inf entry contributes exactly 0 to every formula). Returns the
// padded length.
template <class scalar_t, class acc_t>
int64_t load_scaled(const scalar_t* src, int64_t n, acc_t inv_t, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec scale(inv_t);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v = Vec::loadu(src + i);
    } else {
      at::vec::load_to_float<scalar_t>(src + i, v);  // upcast before any arithmetic
    }
    (v * scale).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * inv_t;
  for (; i % W; ++i) dst[i] = -std::numeric_limits<acc_t>::infinity();
  return i;
}

template <class scalar_t, class acc_t>
void store_converted(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using Vec = Vectorized<float>;
    constexpr int64_t W = Vec::size();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + W)).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// The first pass's exps of one row, per thread: es[i] = exp(s_i - M_s[c]), et likewise, for entry i
// of chunk c = i / kChunk (each chunk's padded span at c * kChunk), M[c] the running max after chunk c
// (kept in shift_s, shift_t). With the row's (max, log-sum) known, q_i = es[i] * chunk_factor(M_s[c]). The second pass of the
// mixture divergences overwrites es with q and et with grad_part; alpha's overwrites et with its terms alpha_term.
template <class acc_t>
struct RowCache {
  std::vector<acc_t> es, et;
  std::vector<double> shift_s, shift_t;
  acc_t* s_chunk(int64_t c) { return es.data() + c * kChunk; }
  acc_t* t_chunk(int64_t c) { return et.data() + c * kChunk; }
  const acc_t* s_chunk(int64_t c) const { return es.data() + c * kChunk; }
  const acc_t* t_chunk(int64_t c) const { return et.data() + c * kChunk; }

  static RowCache& for_vocab(int64_t vocab) {
    thread_local RowCache cache;
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    if (static_cast<int64_t>(cache.shift_s.size()) < chunks) {
      cache.es.resize(chunks * kChunk);
      cache.et.resize(chunks * kChunk);
      cache.shift_s.resize(chunks);
      cache.shift_t.resize(chunks);
    }
    return cache;
  }
};

// The factor that turns a chunk's cached exps into probabilities (see RowCache), from the running max
// after the chunk: 0 while it is -inf (the exps, taken at shift 0, are 0; the factor would overflow).
inline double chunk_factor(double running_max, double max, double log_sum) {
  return running_max == -kInf ? 0.0 : std::exp((running_max - max) - log_sum);
}

// The maxima of a chunk's two buffers (padded with -inf to whole vectors).
template <class acc_t>
void chunk_maxima(const acc_t* bs, const acc_t* bt, int64_t padded, acc_t& max_s, acc_t& max_t) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  Vec ms = O::splat(-kInf), mt = ms;
  for (int64_t i = 0; i < padded; i += Vec::size()) {
    ms = O::max(ms, Vec::loadu(bs + i));
    mt = O::max(mt, Vec::loadu(bt + i));
  }
  max_s = horizontal_max(ms);
  max_t = horizontal_max(mt);
}

template <class scalar_t>
struct RowView {
  const scalar_t* s;
  const scalar_t* t;
};

template <class scalar_t>
RowView<scalar_t> row_view(const RowArgs& a, int64_t row) {
  return {static_cast<const scalar_t*>(a.student) + row * a.student_stride,
          static_cast<const scalar_t*>(a.teacher) + row * a.teacher_stride};
}

inline bool ignored(const RowArgs& a, int64_t row) {
  return a.labels != nullptr && a.labels[row] == a.ignore_index;
}

// First pass: online log-sum-exps of s and t and, for the one-pass divergences,
// the sums that give their loss (E_p[t - s], E_q[s - t], LSE(alpha t + (1-alpha) s)).
// With a cache, each chunk's exps and shifts are kept in it (see RowCache).
template <Divergence D, class scalar_t, class acc_t>
void first_pass(const RowArgs& a, RowView<scalar_t> row, RowSums& r, RowCache<acc_t>* cache = nullptr) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  constexpr int64_t W = Vec::size();
  constexpr bool kForward = D == Divergence::ForwardKL || D == Divergence::Jeffreys;
  constexpr bool kReverse = D == Divergence::ReverseKL || D == Divergence::Jeffreys;
  constexpr bool kAlpha = D == Divergence::Alpha;
  alignas(64) acc_t bs[kChunk], bt[kChunk], bz[kAlpha ? kChunk : 1];
  const acc_t inv_t = static_cast<acc_t>(a.inv_temperature);
  const Vec alpha = O::splat(a.coef.param), one_minus_alpha = O::splat(1 - a.coef.param);
  const Vec ninf = O::splat(-std::numeric_limits<double>::infinity());

  for (int64_t start = 0; start < a.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, a.vocab - start);
    const int64_t padded = load_scaled(row.s + start, n, inv_t, bs);
    load_scaled(row.t + start, n, inv_t, bt);

    acc_t max_s, max_t;
    chunk_maxima(bs, bt, padded, max_s, max_t);
    const Vec shift_s = O::splat(r.s.raise(max_s));
    const Vec shift_t = O::splat(r.t.raise(max_t));
    acc_t* cs = nullptr;
    acc_t* ct = nullptr;
    if (cache != nullptr) {
      const int64_t c = start / kChunk;
      cache->shift_s[c] = r.s.max;
      cache->shift_t[c] = r.t.max;
      cs = cache->s_chunk(c);
      ct = cache->t_chunk(c);
    }
    const Vec ref_s = O::splat(r.s.ref), ref_t = O::splat(r.t.ref);  // fixed once the row has a finite max
    Vec shift_z = O::splat(0);
    if constexpr (kAlpha) {
      Vec max_z = ninf;
      for (int64_t i = 0; i < padded; i += W) {
        const Vec z = alpha_logit(Vec::loadu(bs + i) - ref_s, Vec::loadu(bt + i) - ref_t, alpha, one_minus_alpha);
        z.store(bz + i);
        max_z = O::max(max_z, z);
      }
      shift_z = O::splat(r.z.raise(horizontal_max(max_z)));
    }

    Vec sum_s = O::splat(0), sum_t = sum_s, w_t = sum_s, sum_z = sum_s;
    GapSums<acc_t> w_s(r.s.ref, r.t.ref);  // gap (s - ref_s) - (t - ref_t) weighted by exp(s - shift_s)
    for (int64_t i = 0; i < padded; i += W) {
      const Vec s = Vec::loadu(bs + i), t = Vec::loadu(bt + i);
      const Vec es = O::exp(s - shift_s), et = O::exp(t - shift_t);
      if (cs != nullptr) {
        es.store(cs + i);
        et.store(ct + i);
      }
      if constexpr (kReverse) {
        w_s.add(es, s, t);
      } else {
        sum_s += es;
      }
      sum_t += et;
      if constexpr (kForward) w_t += weighted(et, t - ref_t, s - ref_s);
      if constexpr (kAlpha) sum_z += O::exp(Vec::loadu(bz + i) - shift_z);
    }
    r.s.sum += kReverse ? horizontal_sum(w_s.weight) : horizontal_sum(sum_s);
    r.t.sum += horizontal_sum(sum_t);
    if constexpr (kForward) r.t.weighted += horizontal_sum(w_t);
    if constexpr (kReverse) r.s.weighted += horizontal_sum(w_s.weighted_gap);
    if constexpr (kAlpha) r.z.sum += horizontal_sum(sum_z);
  }
}

// The chunk factors of a row (see RowCache) from its (max, log-sum) as stored in acc_t.
template <class acc_t>
struct ChunkFactors {
  double max_s, log_sum_s, max_t, log_sum_t;
  ChunkFactors(double max_s, double log_sum_s, double max_t, double log_sum_t)
      : max_s(static_cast<acc_t>(max_s)), log_sum_s(static_cast<acc_t>(log_sum_s)),
        max_t(static_cast<acc_t>(max_t)), log_sum_t(static_cast<acc_t>(log_sum_t)) {}
  acc_t s(double running_max) const { return static_cast<acc_t>(chunk_factor(running_max, max_s, log_sum_s)); }
  acc_t t(double running_max) const { return static_cast<acc_t>(chunk_factor(running_max, max_t, log_sum_t)); }
};

// Second pass (mixture divergences and TV), with the log-sum-exps known: adds the row's sums of the
// loss and of the row scalar c0 to loss2, aux2. With a cache (filled by first_pass) q and p come from
// it, and with store_part each chunk's q and grad_part (alpha: its terms) are written back over it for grad_row.
template <Divergence D, class scalar_t, class acc_t>
void second_pass(const RowArgs& a, RowView<scalar_t> row, double max_s, double log_sum_s, double max_t,
                 double log_sum_t, double& loss2, double& aux2, RowCache<acc_t>* cache = nullptr,
                 bool store_part = false) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  constexpr int64_t W = Vec::size();
  alignas(64) acc_t bs[kChunk], bt[kChunk];
  const acc_t inv_t = static_cast<acc_t>(a.inv_temperature);
  const RowLSE<Vec> lse = make_row_lse<Vec>(max_s, log_sum_s, max_t, log_sum_t);
  const ChunkFactors<acc_t> factors(max_s, log_sum_s, max_t, log_sum_t);
  // c0: alpha's log-sum gap as the gradient takes it (alpha_x), so that its stored terms are the gradient's
  const RowCoef<Vec> k = make_row_coef<Vec>(a.coef, alpha_log_sum_gap<acc_t>(log_sum_s, log_sum_t), 0);
  for (int64_t start = 0; start < a.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, a.vocab - start), c = start / kChunk;
    const int64_t padded = load_scaled(row.s + start, n, inv_t, bs);
    load_scaled(row.t + start, n, inv_t, bt);
    Vec loss = O::splat(0), aux = loss;
    if (cache != nullptr) {
      acc_t* cs = cache->s_chunk(c);
      acc_t* ct = cache->t_chunk(c);
      const Vec fs = O::splat(factors.s(cache->shift_s[c])), ft = O::splat(factors.t(cache->shift_t[c]));
      for (int64_t i = 0; i < padded; i += W) {
        const Vec q = Vec::loadu(cs + i) * fs, p = Vec::loadu(ct + i) * ft;
        const Entry<Vec> e = make_entry(Vec::loadu(bs + i), Vec::loadu(bt + i), q, p, lse);
        Vec l, x, u;
        second_pass_terms<D>(e, k, l, x, u);
        loss += l;
        aux += x;
        if constexpr (has_grad_part(D)) {
          if (store_part) {
            q.store(cs + i);
            u.store(ct + i);
          }
        } else if constexpr (D == Divergence::Alpha) {
          if (store_part) l.store(ct + i);  // the Student form's gradient needs q and this term only
        }
      }
    } else {
      for (int64_t i = 0; i < padded; i += W) {
        const Entry<Vec> e = make_entry(Vec::loadu(bs + i), Vec::loadu(bt + i), lse);
        Vec l, x;
        second_pass_terms<D>(e, k, l, x);
        loss += l;
        aux += x;
      }
    }
    loss2 += horizontal_sum(loss);
    aux2 += horizontal_sum(aux);
  }
}

// g * dL/ds of one row (g holds the upstream gradient and the 1/T) into out, from the row's
// statistics. Rows with no distribution get NaN, ignored and empty rows 0. May alias the
// student row: each chunk is read into bs before its gradient is stored. With a cache (this row's,
// from forward_rows) q and p are read from it, the mixture divergences' gradient from the
// stored q and grad_part alone, and alpha's Student form from q and its stored terms.
template <Divergence D, class scalar_t, class acc_t>
void grad_row(const RowArgs& a, RowView<scalar_t> view, const acc_t* st, acc_t g, bool ignored_row,
              scalar_t* out, const RowCache<acc_t>* cache = nullptr) {
  using Vec = Vectorized<acc_t>;
  using O = Ops<Vec>;
  constexpr int64_t W = Vec::size();
  const RowKind kind = row_kind(st[0] + st[1], st[2] + st[3]);
  if (ignored_row || kind == RowKind::Empty || (g == 0 && kind == RowKind::Normal)) {
    std::fill(out, out + a.vocab, scalar_t(0));
    return;
  }
  if (kind == RowKind::Undefined) {
    std::fill(out, out + a.vocab, scalar_t(NAN));
    return;
  }
  alignas(64) acc_t bs[kChunk], bt[kChunk];
  const acc_t inv_t = static_cast<acc_t>(a.inv_temperature);
  const RowLSE<Vec> lse = make_row_lse<Vec>(st[0], st[1], st[2], st[3]);
  const ChunkFactors<acc_t> factors(st[0], st[1], st[2], st[3]);
  const Vec scale = O::splat(g);
  const RowCoef<Vec> k = make_row_coef<Vec>(a.coef, st[4], st[5]);
  // Without a cache (the two-pass backward) q and p are formed as first_pass caches them: exp(x - the
  // running max) times the chunk's factor, so both paths give the same bits.
  constexpr bool kAlpha = D == Divergence::Alpha;
  // with a cache; not on a row whose loss is infinite (c0 = c1 = inf: its second pass stored terms of the
  // finite gap, while the two-pass backward forms them with c0 = inf, so both take that path)
  const bool alpha_from_terms = kAlpha && k.alpha_form == AlphaForm::Student && st[4] < kInf;
  const bool needs_logits = D != Divergence::ForwardKL && !has_grad_part(D) && !alpha_from_terms;
  OnlineLSE run_s, run_t;  // the running maxima of first_pass
  for (int64_t start = 0; start < a.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, a.vocab - start), c = start / kChunk;
    const int64_t padded = (n + W - 1) / W * W;
    if (cache == nullptr || needs_logits) {
      load_scaled(view.s + start, n, inv_t, bs);
      load_scaled(view.t + start, n, inv_t, bt);
    }
    if (cache == nullptr) {  // the gradient reuses the student buffer
      acc_t max_s, max_t;
      chunk_maxima(bs, bt, padded, max_s, max_t);
      const Vec shift_s = O::splat(run_s.raise(max_s)), shift_t = O::splat(run_t.raise(max_t));
      const Vec fs = O::splat(factors.s(run_s.max)), ft = O::splat(factors.t(run_t.max));
      for (int64_t i = 0; i < padded; i += W) {
        const Vec s = Vec::loadu(bs + i), t = Vec::loadu(bt + i);
        const Entry<Vec> e = make_entry(s, t, O::exp(s - shift_s) * fs, O::exp(t - shift_t) * ft, lse);
        (grad_entry<D>(e, k) * scale).store(bs + i);
      }
    } else if constexpr (has_grad_part(D)) {
      const acc_t* q = cache->s_chunk(c);  // q and grad_part, stored by second_pass
      const acc_t* u = cache->t_chunk(c);
      for (int64_t i = 0; i < padded; i += W) {
        (grad_from_part<D>(Vec::loadu(q + i), Vec::loadu(u + i), k) * scale).store(bs + i);
      }
    } else {
      const acc_t* es = cache->s_chunk(c);
      const acc_t* et = cache->t_chunk(c);  // alpha: its terms (second_pass), p is not read
      const Vec fs = O::splat(factors.s(cache->shift_s[c])), ft = O::splat(factors.t(cache->shift_t[c]));
      for (int64_t i = 0; i < padded; i += W) {
        const Vec q = Vec::loadu(es + i) * fs;
        Vec g;
        if (alpha_from_terms) {
          g = alpha_grad_from_term(q, Vec::loadu(et + i), k);
        } else if (needs_logits) {
          const Vec p = kAlpha ? O::splat(0) : Vec::loadu(et + i) * ft;
          g = grad_entry<D>(make_entry(Vec::loadu(bs + i), Vec::loadu(bt + i), q, p, lse), k);
        } else {
          Entry<Vec> e;
          e.q = q;
          e.p = Vec::loadu(et + i) * ft;
          g = grad_entry<D>(e, k);
        }
        (g * scale).store(bs + i);
      }
    }
    store_converted(bs, n, out + start);
  }
}

template <class scalar_t>
scalar_t* grad_out_row(const RowArgs& a, int64_t row) {
  return static_cast<scalar_t*>(a.grad_student) + row * a.grad_stride;
}

// Loss and statistics of each row and, when a.grad_student is set (the one-pass op), its gradient
// times a.grad_scale right after, while the row is still in cache: the logits are read from
// memory once for the loss and the gradient together.
template <Divergence D, class scalar_t, class acc_t>
void forward_rows(const RowArgs& a, int64_t begin, int64_t end) {
  auto* loss = static_cast<acc_t*>(a.loss);
  auto* stats = static_cast<acc_t*>(a.stats);
  const acc_t g = static_cast<acc_t>(a.grad_scale * a.inv_temperature);
  // The row cache wherever a later pass reads the row again.
  RowCache<acc_t>* cache = (a.grad_student != nullptr || needs_second_pass(D))
                               ? &RowCache<acc_t>::for_vocab(a.vocab)
                               : nullptr;
  for (int64_t row = begin; row < end; ++row) {
    acc_t* st = stats + row * kNumStats;
    const auto view = row_view<scalar_t>(a, row);
    if (ignored(a, row)) {
      loss[row] = 0;
      std::fill(st, st + kNumStats, acc_t(0));
    } else {
      RowSums r;
      first_pass<D, scalar_t, acc_t>(a, view, r, cache);
      if constexpr (needs_second_pass(D)) {
        // alpha's Log form (|alpha - 1/2| > 1) has its loss from the first pass's sums alone
        const bool second = D != Divergence::Alpha || alpha_form(a.coef.param) != AlphaForm::Log;
        if (second && row_kind(r.s.lse(), r.t.lse()) == RowKind::Normal) {
          second_pass<D, scalar_t, acc_t>(a, view, r.s.max, std::log(r.s.sum), r.t.max, std::log(r.t.sum), r.loss2,
                                          r.aux2, cache, a.grad_student != nullptr);
        }
      }
      loss[row] = finish_row<D, acc_t>(r, a.coef, st);
    }
    if (a.grad_student != nullptr) {
      grad_row<D, scalar_t, acc_t>(a, view, st, g, ignored(a, row), grad_out_row<scalar_t>(a, row), cache);
    }
  }
}

template <Divergence D, class scalar_t, class acc_t>
void backward_rows(const RowArgs& a, int64_t begin, int64_t end) {
  const auto* stats = static_cast<const acc_t*>(a.stats);
  const auto* grad_loss = static_cast<const acc_t*>(a.grad_loss);
  const acc_t inv_t = static_cast<acc_t>(a.inv_temperature);
  for (int64_t row = begin; row < end; ++row) {
    const acc_t g = grad_loss[row * a.grad_loss_stride] * inv_t;
    grad_row<D, scalar_t, acc_t>(a, row_view<scalar_t>(a, row), stats + row * kNumStats, g, ignored(a, row),
                                 grad_out_row<scalar_t>(a, row));
  }
}

// ---------------------------------------------------------------- vocabulary-parallel ops
// partial -> merge -> finish: each rank's partial pass over its shard, the partials of every rank
// merged and finished into the loss and statistics (merge_partials, finish_row), a second pass with
// those statistics where the divergence needs one (its sums added over the ranks), finished again.

// The first-pass partials of each row of a vocabulary slice (ignored rows: an empty slice).
template <Divergence D, class scalar_t, class acc_t>
void partial_rows(const RowArgs& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    RowSums r;
    if (!ignored(a, row)) first_pass<D, scalar_t, acc_t>(a, row_view<scalar_t>(a, row), r);
    store_partials(r, a.partials + row * kNumPartials);
  }
}

// Loss and statistics of each row from the partials of its a.parts slices ([parts, rows,
// kNumPartials]) and, for the two-pass divergences, the second-pass sums over the whole row.
template <Divergence D, class scalar_t, class acc_t>
void finish_rows(const RowArgs& a, int64_t begin, int64_t end) {
  auto* loss = static_cast<acc_t*>(a.loss);
  auto* stats = static_cast<acc_t*>(a.stats);
  for (int64_t row = begin; row < end; ++row) {
    acc_t* st = stats + row * kNumStats;
    if (ignored(a, row)) {
      loss[row] = 0;
      std::fill(st, st + kNumStats, acc_t(0));
      continue;
    }
    RowSums r = merge_partials(a.partials + row * kNumPartials, a.parts, a.rows * kNumPartials, a.coef.param);
    if (a.second != nullptr) {
      r.loss2 = a.second[2 * row];
      r.aux2 = a.second[2 * row + 1];
    }
    loss[row] = finish_row<D, acc_t>(r, a.coef, st);
  }
}

// The second-pass sums (loss, aux) of each row of a slice from the whole row's statistics (0 for the
// one-pass divergences and for rows that are ignored or not Normal, as forward_rows).
template <Divergence D, class scalar_t, class acc_t>
void second_rows(const RowArgs& a, int64_t begin, int64_t end) {
  const auto* stats = static_cast<const acc_t*>(a.stats);
  for (int64_t row = begin; row < end; ++row) {
    double* out = a.second + 2 * row;
    out[0] = out[1] = 0;
    const acc_t* st = stats + row * kNumStats;
    if constexpr (needs_second_pass(D)) {
      if (!ignored(a, row) && row_kind(st[0] + st[1], st[2] + st[3]) == RowKind::Normal) {
        second_pass<D, scalar_t, acc_t>(a, row_view<scalar_t>(a, row), st[0], st[1], st[2], st[3], out[0], out[1]);
      }
    }
  }
}

// Runtime (divergence, dtype) -> template instantiation.
template <template <Divergence, class, class> class Fn>
void dispatch(const RowArgs& a, int64_t begin, int64_t end) {
  auto by_dtype = [&](auto div_tag) {
    constexpr Divergence D = decltype(div_tag)::value;
    switch (a.dtype) {
      case DType::Float32: return Fn<D, float, float>::run(a, begin, end);
      case DType::Float64: return Fn<D, double, double>::run(a, begin, end);
      case DType::BFloat16: return Fn<D, c10::BFloat16, float>::run(a, begin, end);
      case DType::Float16: return Fn<D, c10::Half, float>::run(a, begin, end);
    }
  };
  using DV = Divergence;
  switch (a.divergence) {
    case DV::ForwardKL: return by_dtype(std::integral_constant<DV, DV::ForwardKL>{});
    case DV::ReverseKL: return by_dtype(std::integral_constant<DV, DV::ReverseKL>{});
    case DV::Jeffreys: return by_dtype(std::integral_constant<DV, DV::Jeffreys>{});
    case DV::JSD: return by_dtype(std::integral_constant<DV, DV::JSD>{});
    case DV::SkewKL: return by_dtype(std::integral_constant<DV, DV::SkewKL>{});
    case DV::SkewReverseKL: return by_dtype(std::integral_constant<DV, DV::SkewReverseKL>{});
    case DV::TV: return by_dtype(std::integral_constant<DV, DV::TV>{});
    case DV::Alpha: return by_dtype(std::integral_constant<DV, DV::Alpha>{});
  }
}

template <Divergence D, class scalar_t, class acc_t>
struct ForwardFn {
  static void run(const RowArgs& a, int64_t b, int64_t e) { forward_rows<D, scalar_t, acc_t>(a, b, e); }
};
template <Divergence D, class scalar_t, class acc_t>
struct BackwardFn {
  static void run(const RowArgs& a, int64_t b, int64_t e) { backward_rows<D, scalar_t, acc_t>(a, b, e); }
};

template <Divergence D, class scalar_t, class acc_t>
struct PartialFn {
  static void run(const RowArgs& a, int64_t b, int64_t e) { partial_rows<D, scalar_t, acc_t>(a, b, e); }
};
template <Divergence D, class scalar_t, class acc_t>
struct SecondFn {
  static void run(const RowArgs& a, int64_t b, int64_t e) { second_rows<D, scalar_t, acc_t>(a, b, e); }
};
template <Divergence D, class scalar_t, class acc_t>
struct FinishFn {
  static void run(const RowArgs& a, int64_t b, int64_t e) { finish_rows<D, scalar_t, acc_t>(a, b, e); }
};

void divergence_forward_rows(const RowArgs& a, int64_t begin, int64_t end) {
  dispatch<ForwardFn>(a, begin, end);
}
void divergence_backward_rows(const RowArgs& a, int64_t begin, int64_t end) {
  dispatch<BackwardFn>(a, begin, end);
}
void divergence_partial_rows(const RowArgs& a, int64_t begin, int64_t end) {
  dispatch<PartialFn>(a, begin, end);
}
void divergence_second_rows(const RowArgs& a, int64_t begin, int64_t end) {
  dispatch<SecondFn>(a, begin, end);
}
void divergence_finish_rows(const RowArgs& a, int64_t begin, int64_t end) {
  dispatch<FinishFn>(a, begin, end);
}

}  // namespace CPU_CAPABILITY
}  // namespace fdistill::cpu

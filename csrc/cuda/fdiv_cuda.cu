// CUDA kernels of the f-divergence operators (fdiv_args.h): f-softargmax, Fenchel–Young
// loss and f-softmax value. Raw pointers, no torch headers (fdiv_cuda_op.cpp is the torch side).
//
// Forward: one thread block per row (grid-stride over rows).
//   pass 1   theta = logits / T (kept in dynamic shared memory when the row fits), a block
//            reduction of (max, first argmax, sum of q over the entries that are not -inf);
//   sweeps   S0, S1 = sum q (f*)'(x - tau), sum q (f*)''(x - tau), x = theta - max, summed in
//            double and reduced over the block; thread 0 runs tau_step and broadcasts tau
//            (KL: one sweep, tau = 0 and S0 = sum q exp(x), as the CPU kernels do);
//   output   p = q (f*)'(x - tau) / S0, or the row's FY loss / f-softmax value (a third reduction).
// Backward: elementwise, grid (vocabulary chunks, rows), p recomputed from the stats.
// Every read of the logits from global memory (pass 1, sweeps and output without the shared-memory
// row, the backward) loads 16 bytes at a time where aligned (RowSplit).
// Same per-row semantics as the CPU kernels (csrc/cpu/fdiv_kernels.h).
#include "cuda/fdiv_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fdistill::cuda {
namespace {

// Forward block size upper bound. Launch bounds (512 threads, 1 block) allow 128 registers a thread:
// 1024 threads capped them at 64 and the alpha / double instantiations spilled; so does ptxas's
// default 64-register target for 512 threads without the block count.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kBwdThreads = 256;
constexpr int kBwdMinBlocks = 4;  // up to 64 registers (without a count ptxas took ~40 and spilled bf16 alpha)
constexpr int kBwdPerThread = 8;  // entries per backward thread (a block covers 2048 entries)

// ---------------------------------------------------------------- conversions
template <class A, class T>
__device__ __forceinline__ A to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(v));
  } else {
    return static_cast<A>(v);
  }
}

template <class T, class A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// theta = logit / T rounded on its own: never fused into an FMA with the max shift that
// follows (nvcc contracts by default), so that x = theta - max is the same whether theta was
// kept in shared memory or re-read, in the backward, and on the CPU (x = 0 exactly at the max).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <class T, class A>
__device__ __forceinline__ A theta_of(T logit, A inv_t) {
  return mul_rn(to_acc<A>(logit), inv_t);
}

// Target probabilities in their own dtype (uniform branch per launch).
template <class A>
__device__ __forceinline__ A load_target(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::Float64: return static_cast<A>(static_cast<const double*>(base)[i]);
    case DType::BFloat16: return to_acc<A>(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::Float16: return to_acc<A>(static_cast<const __half*>(base)[i]);
    default: return static_cast<A>(static_cast<const float*>(base)[i]);
  }
}

// ---------------------------------------------------------------- block reductions
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums of a and b over the block, valid in thread 0. Ends with a barrier-free read of the
// scratch by warp 0: the caller must __syncthreads before the next reduction.
__device__ __forceinline__ void block_sum2(double& a, double& b, double* sh_a, double* sh_b) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sh_a[warp] = a;
    sh_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    a = warp_sum(lane < nw ? sh_a[lane] : 0.0);
    b = warp_sum(lane < nw ? sh_b[lane] : 0.0);
  }
}

// (max, first index of the max) with NaN winning: the max pass of a row.
template <class A>
__device__ __forceinline__ void arg_combine(A& m, int& i, A m2, int i2) {
  if (m2 != m2) {
    if (m == m || i2 < i) m = m2, i = i2;
  } else if (m2 > m || (m2 == m && i2 < i)) {
    m = m2, i = i2;
  }
}

template <class A>
struct MaxScratch {
  A m[kMaxWarps];
  int i[kMaxWarps];
  double q[kMaxWarps], qt[kMaxWarps];
};

// Warp-wide (max, first argmax, two sums), in every lane.
template <class A>
__device__ __forceinline__ void warp_argmax_sum(A& m, int& idx, double& qs, double& qt) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
    arg_combine(m, idx, m2, i2);
    qs += __shfl_xor_sync(0xffffffffu, qs, o);
    qt += __shfl_xor_sync(0xffffffffu, qt, o);
  }
}

// Block-wide (max, first argmax, two sums), valid in thread 0; caller syncs before the next use.
template <class A>
__device__ __forceinline__ void block_argmax_sum(A& m, int& idx, double& qs, double& qt, MaxScratch<A>& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_argmax_sum(m, idx, qs, qt);
  if (lane == 0) {
    sh.m[warp] = m;
    sh.i[warp] = idx;
    sh.q[warp] = qs;
    sh.qt[warp] = qt;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    m = lane < nw ? sh.m[lane] : static_cast<A>(-kInf);
    idx = lane < nw ? sh.i[lane] : INT_MAX;
    qs = lane < nw ? sh.q[lane] : 0.0;
    qt = lane < nw ? sh.qt[lane] : 0.0;
    warp_argmax_sum(m, idx, qs, qt);
  }
}

// ---------------------------------------------------------------- 16-byte row access
// A row of n entries in global memory is read in 16-byte packs from its first 16-byte boundary:
// a scalar head of fewer than kPack entries before it, whole packs, a scalar tail of fewer than
// kPack (rows are element-aligned, as tensors are: a row at any offset or row stride works).
template <class T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));  // 8 halves, 4 floats, 2 doubles

template <class T>
struct alignas(16) Pack {
  T v[kPack<T>];
};

struct RowSplit {
  int head;   // entries before the first 16-byte boundary
  int packs;  // whole packs from there
  int tail;   // the first entry after them
};

template <class T>
__device__ __forceinline__ RowSplit split_row(const T* row, int n) {
  const int off = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16 / sizeof(T));
  const int head = min(off ? kPack<T> - off : 0, n);
  const int packs = (n - head) / kPack<T>;
  return {head, packs, head + packs * kPack<T>};
}

// visit(j, theta_j) for the entries of thread t of nt (nt >= kPack: one head / tail entry each).
template <class T, class A, class Fn>
__device__ __forceinline__ void for_each_theta(const T* row, int n, A inv_t, int t, int nt, Fn&& visit) {
  const RowSplit s = split_row(row, n);
  if (t < s.head) visit(t, theta_of(row[t], inv_t));
  const Pack<T>* const packs = reinterpret_cast<const Pack<T>*>(row + s.head);
  for (int k = t; k < s.packs; k += nt) {
    const Pack<T> v = packs[k];
    const int j = s.head + k * kPack<T>;
#pragma unroll
    for (int w = 0; w < kPack<T>; ++w) visit(j + w, theta_of(v.v[w], inv_t));
  }
  if (s.tail + t < n) visit(s.tail + t, theta_of(row[s.tail + t], inv_t));
}

// out[j] = f(j, theta_j) for the same entries: 16-byte stores where out + head is 16-byte aligned
// too (out and the row at the same offset from a boundary), else scalar ones.
template <class T, class A, class F>
__device__ __forceinline__ void map_theta(const T* row, T* out, int n, A inv_t, int t, int nt, F&& f) {
  const RowSplit s = split_row(row, n);
  const bool packed_out = reinterpret_cast<uintptr_t>(out + s.head) % 16 == 0;
  if (t < s.head) out[t] = from_acc<T>(f(t, theta_of(row[t], inv_t)));
  const Pack<T>* const packs = reinterpret_cast<const Pack<T>*>(row + s.head);
  for (int k = t; k < s.packs; k += nt) {
    const Pack<T> v = packs[k];
    const int j = s.head + k * kPack<T>;
    Pack<T> r;
#pragma unroll
    for (int w = 0; w < kPack<T>; ++w) r.v[w] = from_acc<T>(f(j + w, theta_of(v.v[w], inv_t)));
    if (packed_out) {
      reinterpret_cast<Pack<T>*>(out + s.head)[k] = r;
    } else {
#pragma unroll
      for (int w = 0; w < kPack<T>; ++w) out[j + w] = r.v[w];
    }
  }
  if (s.tail + t < n) out[s.tail + t] = from_acc<T>(f(s.tail + t, theta_of(row[s.tail + t], inv_t)));
}

template <FKind K, class T, class A>
__global__ void __launch_bounds__(kMaxThreads, 1) fdiv_forward_kernel(const FDivArgs a, const bool use_smem) {
  using O = Ops<A>;
  extern __shared__ __align__(16) unsigned char fdiv_smem[];
  __shared__ MaxScratch<A> sh_max;
  __shared__ double sh_a[kMaxWarps], sh_b[kMaxWarps];
  __shared__ A sh_m;
  __shared__ double sh_qmax, sh_qtotal, sh_xmean, sh_tau, sh_s0;
  __shared__ TauSearch sh_search;  // thread 0's: not held in every thread's registers through the sweeps
  __shared__ int sh_done;

  const int tid = threadIdx.x, nt = blockDim.x;
  const int V = static_cast<int>(a.vocab);
  const A ninf = O::splat(-kInf), inf = O::splat(kInf);
  const A inv_am1 = O::splat(a.coef.inv_am1), alpha = O::splat(a.coef.alpha);
  const A inv_t = O::splat(a.inv_temperature), q_value = O::splat(a.reference_value);
  A* const xs = use_smem ? reinterpret_cast<A*>(fdiv_smem) : nullptr;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    __syncthreads();  // the previous row's broadcasts have been read
    A* const st = static_cast<A*>(a.stats) + row * kFDivStats;
    A* const value = a.mode == FDivMode::SoftArgmax ? nullptr : static_cast<A*>(a.out) + row;
    T* const probs = a.mode == FDivMode::SoftArgmax ? static_cast<T*>(a.out) + row * a.out_stride : nullptr;
    const int64_t label = a.labels ? a.labels[row] : -1;
    if (a.labels && label == a.ignore_index) {  // loss 0, neutral stats
      if (tid == 0) {
        st[0] = 0, st[1] = 0, st[2] = 1;
        if (value) *value = 0;
      }
      continue;
    }
    const T* const logits = static_cast<const T*>(a.logits) + row * a.logits_stride;
    const A* const q_row = a.reference ? static_cast<const A*>(a.reference) + row * a.reference_stride : nullptr;
    auto q_at = [&](int j) { return q_row ? q_row[j] : q_value; };
    // fn(j, theta_j) over this thread's entries, from shared memory after pass 1 when the row is kept there
    auto for_each = [&](auto&& fn) {
      if (xs) {
        for (int j = tid; j < V; j += nt) fn(j, xs[j]);
      } else {
        for_each_theta(logits, V, inv_t, tid, nt, fn);
      }
    };

    // pass 1: theta (into shared memory), max, first argmax, live q mass (tau's bracket; the f-softmax
    // value's sum of q f(0): KL needs it only there)
    const bool need_q = K != FKind::KL || a.mode == FDivMode::SoftmaxValue;
    A m = ninf;
    int idx = INT_MAX;
    double qs = 0, qt = 0;  // live q mass, and its q-weighted sum of theta (Jensen's start of the search)
    for_each_theta(logits, V, inv_t, tid, nt, [&](int j, A th) {
      if (xs) xs[j] = th;
      arg_combine(m, idx, th, j);
      if (need_q && th > ninf) {
        const double q = q_row ? static_cast<double>(q_row[j]) : 1.0;
        qs += q;
        qt += q * static_cast<double>(th);
      }
    });
    block_argmax_sum(m, idx, qs, qt, sh_max);
    if (tid == 0) {
      sh_m = m;
      sh_qmax = q_row && idx < V ? static_cast<double>(q_row[idx]) : a.reference_value;  // idx = V: no live entry
      sh_qtotal = q_row ? qs : qs * a.reference_value;
      sh_xmean = qt / qs - static_cast<double>(m);
    }
    __syncthreads();  // also orders the writes of xs before any thread reads them
    m = sh_m;

    if (!(m > ninf && m < inf)) {  // all -inf: p = 0, loss 0, value -inf; NaN / +inf: NaN
      const bool empty = m == ninf;
      const A nan = O::splat(NAN);
      if (tid == 0) {
        st[0] = m, st[1] = empty ? A(0) : m, st[2] = empty ? A(1) : m;
        if (value) *value = empty ? (a.mode == FDivMode::FYLoss ? A(0) : ninf) : nan;
      }
      if (probs) {
        const T fill = from_acc<T>(empty ? A(0) : nan);
        for (int j = tid; j < V; j += nt) probs[j] = fill;
      }
      continue;
    }

    // solve for tau: the evaluated tau and S0 end in sh_tau, sh_s0
    if constexpr (K == FKind::KL) {
      double s0 = 0, unused = 0;
      for_each([&](int j, A th) {
        const A x = th - m;
        if (x > ninf) s0 += static_cast<double>(q_at(j) * O::exp(x));
      });
      block_sum2(s0, unused, sh_a, sh_b);
      if (tid == 0) sh_tau = 0, sh_s0 = s0;
      __syncthreads();
    } else {
      if (tid == 0) {
        const double eps = sizeof(A) == 8 ? 2.220446049250313e-16 : 1.1920928955078125e-07;
        sh_search = start_tau_search(K, a.coef, sh_qmax, sh_qtotal, sh_xmean, eps);
        sh_tau = sh_search.tau;
      }
      __syncthreads();
      for (int64_t sweep = 0;; ++sweep) {
        const TilePoint<A> pt = tile_point<A>(sweep_point<A>(K, a.coef, sh_tau), a.coef);
        double s0 = 0, s1 = 0;
        for_each([&](int j, A th) {
          const A x = th - m;
          if (!(x > ninf)) return;  // masked: no mass
          const A q = q_at(j);
          A d1, d2;
          conj_grads_at<K>(x, pt, d1, d2);
          s0 += static_cast<double>(q * d1);
          s1 += static_cast<double>(q * d2);
        });
        block_sum2(s0, s1, sh_a, sh_b);
        if (tid == 0) {
          const bool done = tau_step(sh_search, s0, s1, a.tol) || sweep + 1 >= a.max_sweeps;
          sh_done = done;
          if (done) {  // the evaluated point with S0 nearest 1
            sh_tau = sh_search.best_t;
            sh_s0 = sh_search.best_s0;
          } else {
            sh_tau = sh_search.tau;
          }
        }
        __syncthreads();
        if (sh_done) break;
      }
    }
    const double tau = sh_tau, s0 = static_cast<double>(static_cast<A>(sh_s0));  // the stored S0, as the backward
    if (tid == 0) st[0] = m, st[1] = static_cast<A>(tau), st[2] = static_cast<A>(s0);
    const TilePoint<A> pt = tile_point<A>(sweep_point<A>(K, a.coef, tau), a.coef);
    const A inv_s0 = static_cast<A>(1 / s0), zero = O::splat(0);
    auto prob = [&](A x, A q) { return x > ninf ? q * conj_grad_at<K>(x, pt) * inv_s0 : zero; };

    if (probs) {
      if (xs) {
        for (int j = tid; j < V; j += nt) probs[j] = from_acc<T>(prob(xs[j] - m, q_at(j)));
      } else {
        map_theta(logits, probs, V, inv_t, tid, nt, [&](int j, A th) { return prob(th - m, q_at(j)); });
      }
      continue;
    }
    if (a.labels && !(label >= 0 && label < V)) {  // a label outside the vocabulary: NaN loss
      if (tid == 0) *value = O::splat(NAN);
      continue;
    }
    double sum = 0, unused = 0;
    if (a.mode == FDivMode::SoftmaxValue) {  // live entries: p x - q f(p/q) = p x - [q f(p/q) - q f(0)] - q f(0)
      for_each([&](int j, A th) {
        const A x = th - m, q = q_at(j), p = prob(x, q);
        if (x > ninf) sum += static_cast<double>(p * x - q_f<K>(p, q, alpha, inv_am1));
      });
    } else {  // FY loss: y from the target probabilities, the one-hot label, or 0
      const int64_t y_off = row * a.target_stride;
      const A one = O::splat(1);
      for_each([&](int j, A th) {
        const A x = th - m, q = q_at(j), p = prob(x, q);
        const A y = a.target ? load_target<A>(a.target, a.target_dtype, y_off + j) : (j == label ? one : zero);
        sum += static_cast<double>(fy_entry<K>(x, p, y, q, alpha, inv_am1));
      });
    }
    block_sum2(sum, unused, sh_a, sh_b);
    if (tid == 0) {
      const double live_mass = f_at_zero(K, a.coef) * sh_qtotal;  // sum over live entries of q f(0)
      *value = static_cast<A>(a.mode == FDivMode::SoftmaxValue ? static_cast<double>(m) + sum - live_mass : sum);
    }
  }
}

// grad_logits = grad_rows / T (p - y), p = q (f*)'(x - tau) / S0 from the stats.
template <FKind K, class T, class A>
__global__ void __launch_bounds__(kBwdThreads, kBwdMinBlocks) fdiv_backward_kernel(const FDivArgs a) {
  using O = Ops<A>;
  const int V = static_cast<int>(a.vocab);
  const A ninf = O::splat(-kInf), inf = O::splat(kInf), zero = O::splat(0);
  const A inv_t = O::splat(a.inv_temperature), q_value = O::splat(a.reference_value);
  const int j0 = blockIdx.x * blockDim.x + threadIdx.x, dj = gridDim.x * blockDim.x;  // thread j0 of dj >= 256 on a row
  for (int64_t row = blockIdx.y; row < a.rows; row += gridDim.y) {
    T* const out = static_cast<T*>(a.grad_logits) + row * a.grad_stride;
    const A* const st = static_cast<const A*>(a.stats) + row * kFDivStats;
    const A g = static_cast<const A*>(a.grad_rows)[row * a.grad_rows_stride] * inv_t;
    const A m = st[0];
    const int64_t label = a.labels ? a.labels[row] : -1;
    if ((a.labels && label == a.ignore_index) || m == ninf || (g == zero && m == m)) {
      const T z = from_acc<T>(zero);
      for (int j = j0; j < V; j += dj) out[j] = z;
      continue;
    }
    if (!(m < inf && m == m)) {  // a NaN / +inf row
      const T nan = from_acc<T>(O::splat(NAN));
      for (int j = j0; j < V; j += dj) out[j] = nan;
      continue;
    }
    const T* const logits = static_cast<const T*>(a.logits) + row * a.logits_stride;
    const A* const q_row = a.reference ? static_cast<const A*>(a.reference) + row * a.reference_stride : nullptr;
    const TilePoint<A> pt = tile_point<A>(sweep_point<A>(K, a.coef, static_cast<double>(st[1])), a.coef);
    const A inv_s0 = static_cast<A>(1 / static_cast<double>(st[2]));
    if (a.labels && !(label >= 0 && label < V)) {  // a label outside the vocabulary
      const T nan = from_acc<T>(O::splat(NAN));
      for (int j = j0; j < V; j += dj) out[j] = nan;
      continue;
    }
    const bool fy = a.mode == FDivMode::FYLoss;
    const int64_t y_off = row * a.target_stride;
    map_theta(logits, out, V, inv_t, j0, dj, [&](int j, A th) {
      const A x = th - m;
      const A q = q_row ? q_row[j] : q_value;
      const A p = x > ninf ? q * conj_grad_at<K>(x, pt) * inv_s0 : zero;
      A d;
      if (fy && a.target) {
        d = (p - load_target<A>(a.target, a.target_dtype, y_off + j)) * g;
      } else {
        d = p * g;
        if (fy && j == label) d -= g;
      }
      return d;
    });
  }
}

// ---------------------------------------------------------------- launchers
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("fdistill: ") + what + ": " + cudaGetErrorString(e));
  }
}

int forward_threads(int64_t vocab) {
  int t = 128;  // about 16 entries per thread, 128..kMaxThreads threads
  while (t < kMaxThreads && t * 16 < vocab) t *= 2;
  return t;
}

template <FKind K, class T, class A>
void launch_forward(const FDivArgs& a, cudaStream_t stream) {
  auto* kernel = fdiv_forward_kernel<K, T, A>;
  // the row's theta in shared memory when it fits next to the kernel's static scratch
  static const int static_smem = [kernel] {
    cudaFuncAttributes attr{};
    check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
    return static_cast<int>(attr.sharedSizeBytes);
  }();
  int dev = 0, optin = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  const int64_t row_bytes = a.vocab * static_cast<int64_t>(sizeof(A));
  const bool use_smem = a.vocab > 0 && row_bytes <= optin - static_smem;
  const int smem = use_smem ? static_cast<int>(row_bytes) : 0;
  if (smem > 48 * 1024) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  }
  const unsigned grid = static_cast<unsigned>(a.rows < INT_MAX ? a.rows : INT_MAX);
  kernel<<<grid, forward_threads(a.vocab), smem, stream>>>(a, use_smem);
  check(cudaGetLastError(), "fdiv forward kernel launch");
}

template <FKind K, class T, class A>
void launch_backward(const FDivArgs& a, cudaStream_t stream) {
  constexpr int64_t per_block = kBwdThreads * kBwdPerThread;
  const int64_t chunks = (a.vocab + per_block - 1) / per_block;
  const dim3 grid(static_cast<unsigned>(chunks < 65535 ? chunks : 65535),
                  static_cast<unsigned>(a.rows < 65535 ? a.rows : 65535));
  fdiv_backward_kernel<K, T, A><<<grid, kBwdThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "fdiv backward kernel launch");
}

template <FKind K>
struct KindTag {
  static constexpr FKind value = K;
};

// fn(KindTag<K>, T*, A*) for the kind and the (logits, accumulation) types of `a`.
template <class T, class A, class Fn>
void dispatch_kind(FKind kind, Fn&& fn) {
  T* t = nullptr;
  A* acc = nullptr;
  switch (kind) {
    case FKind::KL: return fn(KindTag<FKind::KL>{}, t, acc);
    case FKind::ReverseKL: return fn(KindTag<FKind::ReverseKL>{}, t, acc);
    case FKind::Alpha: return fn(KindTag<FKind::Alpha>{}, t, acc);
    case FKind::Alpha15: return fn(KindTag<FKind::Alpha15>{}, t, acc);
    case FKind::Alpha2: return fn(KindTag<FKind::Alpha2>{}, t, acc);
    case FKind::AlphaPow: return fn(KindTag<FKind::AlphaPow>{}, t, acc);
    case FKind::JS: return fn(KindTag<FKind::JS>{}, t, acc);
  }
  throw std::runtime_error("fdistill: unknown f-divergence kind");
}

template <class Fn>
void dispatch(const FDivArgs& a, Fn&& fn) {
  if (a.vocab > INT_MAX) throw std::runtime_error("fdistill: the CUDA kernels take a vocabulary below 2^31");
  switch (a.dtype) {
    case DType::Float32: return dispatch_kind<float, float>(a.kind, fn);
    case DType::Float64: return dispatch_kind<double, double>(a.kind, fn);
    case DType::BFloat16: return dispatch_kind<__nv_bfloat16, float>(a.kind, fn);
    case DType::Float16: return dispatch_kind<__half, float>(a.kind, fn);
  }
  throw std::runtime_error("fdistill: unsupported logits dtype");
}

}  // namespace

void fdiv_forward_cuda(const FDivArgs& a, void* stream) {
  if (a.rows <= 0) return;
  dispatch(a, [&](auto kind, auto* t, auto* acc) {
    using T = std::remove_pointer_t<decltype(t)>;
    using A = std::remove_pointer_t<decltype(acc)>;
    launch_forward<decltype(kind)::value, T, A>(a, static_cast<cudaStream_t>(stream));
  });
}

void fdiv_backward_cuda(const FDivArgs& a, void* stream) {
  if (a.rows <= 0 || a.vocab <= 0) return;
  if (a.mode == FDivMode::SoftArgmax) throw std::runtime_error("fdistill: fdiv backward of modes 1, 2 only");
  dispatch(a, [&](auto kind, auto* t, auto* acc) {
    using T = std::remove_pointer_t<decltype(t)>;
    using A = std::remove_pointer_t<decltype(acc)>;
    launch_backward<decltype(kind)::value, T, A>(a, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fdistill::cuda

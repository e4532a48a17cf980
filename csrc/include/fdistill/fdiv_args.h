// Plain description of a batch of rows for the f-divergence kernels (CPU and CUDA):
// raw pointers and int64 sizes, no torch types.
#pragma once

#include <cstdint>

#include "fdistill/fdiv_math.h"
#include "fdistill/row_args.h"

namespace fdistill {

// What the forward produces from the solved tau.
enum class FDivMode : int32_t {
  SoftArgmax = 0,    // out [rows, vocab] (logits' dtype): p*
  FYLoss = 1,        // out [rows] (acc): <p* - y, theta> - D_f(p*, q) + D_f(y, q)
  SoftmaxValue = 2,  // out [rows] (acc): softmax_f = <p*, theta> - D_f(p*, q)
  // fdiv_shard, on a vocabulary shard at the given stats [max theta of the whole row, t, S0]:
  ShardSums = 3,   // out [rows, 2] (double): the shard's S0 and S1 at t (the sums of a sweep, to be merged)
  ShardProbs = 4,  // out [rows, vocab] (acc): p = q (f*)'(x - tau) / S0
};

struct FDivArgs {
  FKind kind;      // with Alpha15 / Alpha2 picked for alpha = 1.5 / 2
  FCoef coef;
  FDivMode mode;
  DType dtype;     // of the logits (and of the gradient)
  int64_t rows = 0;
  int64_t vocab = 0;
  double inv_temperature = 1;
  int64_t max_sweeps = 100;  // passes over the row to find tau (Newton or bisection)
  double tol = 1e-6;         // stop when |sum p - 1| <= tol (then p is renormalised)

  const void* logits = nullptr;  // [rows, vocab], unit stride along vocab
  int64_t logits_stride = 0;
  // The reference measure q: a tensor in the accumulation type (row stride 0 when shared
  // by all rows), or the constant reference_value when null.
  const void* reference = nullptr;
  int64_t reference_stride = 0;
  double reference_value = 1;

  // FY targets: probabilities [rows, vocab] (target_dtype, unit stride), or labels [rows]
  // (a one-hot target; rows with ignore_index give loss 0 and gradient 0), or neither.
  const void* target = nullptr;
  DType target_dtype = DType::Float32;
  int64_t target_stride = 0;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;

  void* out = nullptr;  // see FDivMode; SoftArgmax rows are out_stride apart
  int64_t out_stride = 0;
  void* stats = nullptr;  // [rows, kFDivStats] in the accumulation type (an input of the backward and fdiv_shard)

  // backward of FYLoss / SoftmaxValue: grad_logits = grad_rows / T (p* - y)
  const void* grad_rows = nullptr;  // [rows] (acc), any stride
  int64_t grad_rows_stride = 1;
  void* grad_logits = nullptr;  // [rows, vocab] (logits' dtype)
  int64_t grad_stride = 0;

  // backward of SoftArgmax (fdiv_softargmax_bwd): `logits` holds p* (the forward's output), grad_out the
  // incoming gradient g [rows, vocab] (the same dtype, unit stride); grad_logits = w (g - <w, g> / sum w) / T
  const void* grad_out = nullptr;
  int64_t grad_out_stride = 0;
};

}  // namespace fdistill

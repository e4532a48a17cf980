// Argument checks and FDivArgs construction for the f-divergence ops, shared by
// the CPU and CUDA implementations. The Python layer (fdistill/fdiv.py) validates
// first and names the argument; these checks guard direct calls to torch.ops.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "fdistill/fdiv_args.h"

namespace fdistill {

// "kl" | "reverse_kl" | "alpha" | "js" (alpha = 1.5 and 2 get their own kinds).
FKind resolve_f(const std::string& f, double alpha);

// Checks a forward call (mode as in FDivMode) and fills the input pointers.
FDivArgs make_fdiv_args(const at::Tensor& logits, const std::optional<at::Tensor>& reference,
                        const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& labels,
                        const std::string& f, double alpha, double reference_value, double temperature,
                        int64_t ignore_index, int64_t max_sweeps, double tol, int64_t mode);

// Allocates the forward outputs (out, stats) and points `a` at them.
std::tuple<at::Tensor, at::Tensor> allocate_fdiv_outputs(const at::Tensor& logits, FDivArgs& a);

// Checks the incoming gradient of fdiv_softargmax_bwd (p*'s shape and dtype, unit stride along the vocabulary),
// allocates the result and points `a` at both (a.logits already points at p*).
at::Tensor prepare_softargmax_backward(const at::Tensor& grad, const at::Tensor& p, FDivArgs& a);

// Checks the stats of an fdiv_shard call (mode 0: sums, 1: probabilities), allocates its output and points
// `a` at both.
at::Tensor prepare_fdiv_shard(const at::Tensor& logits, const at::Tensor& stats, FDivArgs& a, int64_t mode);

// Checks grad_rows and stats of a backward call, allocates the gradient and points `a` at it all.
at::Tensor prepare_fdiv_backward(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& stats,
                                 FDivArgs& a, at::Tensor& grad_rows_acc);

}  // namespace fdistill

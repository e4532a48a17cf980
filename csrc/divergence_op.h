// Argument checks and RowArgs construction shared by the CPU and CUDA bindings.
// The Python layer validates first and names the argument; these checks guard
// direct calls to torch.ops.fdistill.*.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "fdistill/row_args.h"

namespace fdistill {

// Name -> kernel, with the endpoints that the interior formula cannot take:
// jsd beta = 0 / 1 is forward / reverse KL (TRL and Liger convention), jeffreys
// beta = 0 / 1 likewise, skew lambda = 0 is the plain KL.
Divergence resolve_divergence(const std::string& name, double param);

DType dtype_of(at::ScalarType t);
inline DType dtype_of(const at::Tensor& x) { return dtype_of(x.scalar_type()); }

// Statistics and loss are kept in fp32 (fp64 for fp64 inputs).
at::ScalarType accumulate_type(at::ScalarType t);

// Asks Linux for transparent huge pages over the whole 2 MiB pages of a fresh CPU output (the gradient, the
// f-softargmax), first touched by the kernel: with 4 KiB pages a new 125 MB mapping costs ~30k page faults
// (measured: a third of a divergence's forward+backward at 2048 x 32000); where THP is in "madvise" mode
// this cuts them 512-fold. Advisory: a no-op elsewhere (CUDA tensors, other systems, THP off).
void advise_huge_pages(const at::Tensor& t);

// Checks labels ([rows] int64, contiguous, on `device`) and points a.labels at them.
void set_labels(RowArgs& a, const std::optional<at::Tensor>& labels, const at::Device& device);

// Checks shapes, dtypes and devices of a forward call and fills the pointers.
RowArgs make_row_args(const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, const std::string& divergence,
                      double param, double temperature, int64_t ignore_index);

}  // namespace fdistill

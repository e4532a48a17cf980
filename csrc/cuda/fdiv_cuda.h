// CUDA launchers of the f-divergence operators (fdiv_args.h). Raw pointers only: the
// kernels (fdiv_cuda.cu) include no torch headers; fdiv_cuda_op.cpp is the torch side.
#pragma once

#include "fdistill/fdiv_args.h"

namespace fdistill::cuda {

// Forward (every FDivMode) of a.rows rows on `stream` (a cudaStream_t), on the current
// device: fills a.out and a.stats. Throws std::runtime_error on a launch error.
void fdiv_forward_cuda(const FDivArgs& a, void* stream);

// Backward of FYLoss / SoftmaxValue: a.grad_logits = grad_rows / T (p* - y), p* from a.stats.
void fdiv_backward_cuda(const FDivArgs& a, void* stream);

}  // namespace fdistill::cuda

// CUDA implementation of fdistill::fdiv_fwd / fdiv_bwd: the checks and outputs of
// fdiv_op.h around the raw-pointer kernels of fdiv_cuda.cu (c10/cuda headers only: the
// stream is c10::cuda::getCurrentCUDAStream, what at::cuda::getCurrentCUDAStream names).
#include <string>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/fdiv_cuda.h"
#include "fdiv_op.h"

namespace fdistill::cuda {

static std::tuple<at::Tensor, at::Tensor> fdiv_fwd_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& reference, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& labels, c10::string_view f, double alpha, double reference_value,
    double temperature, int64_t ignore_index, int64_t max_sweeps, double tol, int64_t mode) {
  TORCH_CHECK(logits.is_cuda(), "fdistill: fdiv_fwd (CUDA) needs the logits on a CUDA device");
  const c10::cuda::CUDAGuard guard(logits.device());
  FDivArgs a = make_fdiv_args(logits, reference, target, labels, std::string(f), alpha, reference_value,
                              temperature, ignore_index, max_sweeps, tol, mode);
  auto [out, stats] = allocate_fdiv_outputs(logits, a);
  fdiv_forward_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  return {out, stats};
}

static at::Tensor fdiv_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& logits,
                                const std::optional<at::Tensor>& reference, const std::optional<at::Tensor>& target,
                                const std::optional<at::Tensor>& labels, const at::Tensor& stats, c10::string_view f,
                                double alpha, double reference_value, double temperature, int64_t ignore_index,
                                int64_t mode) {
  TORCH_CHECK(logits.is_cuda(), "fdistill: fdiv_bwd (CUDA) needs the logits on a CUDA device");
  TORCH_CHECK(grad_rows.device() == logits.device() && stats.device() == logits.device(),
              "fdistill: grad_rows and stats must be on the logits' device");
  const c10::cuda::CUDAGuard guard(logits.device());
  // max_sweeps and tol are not read by the backward (p* comes from the stats)
  FDivArgs a = make_fdiv_args(logits, reference, target, labels, std::string(f), alpha, reference_value,
                              temperature, ignore_index, /*max_sweeps=*/1, /*tol=*/0.0, mode);
  at::Tensor grad_rows_acc;  // alive until the end of this call; the caching allocator orders its reuse on the stream
  at::Tensor grad = prepare_fdiv_backward(grad_rows, logits, stats, a, grad_rows_acc);
  fdiv_backward_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  return grad;
}

TORCH_LIBRARY_IMPL(fdistill, CUDA, m) {
  m.impl("fdiv_fwd", &fdiv_fwd_cuda);
  m.impl("fdiv_bwd", &fdiv_bwd_cuda);
}

}  // namespace fdistill::cuda

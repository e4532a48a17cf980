// CPU implementation of fdistill::fdiv_fwd / fdiv_bwd / fdiv_softargmax_bwd / fdiv_shard: the f-divergence row
// kernels of the best instruction set, over rows with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "fdiv_op.h"

namespace fdistill::cpu {

#define FDISTILL_DECLARE_FDIV_KERNELS(ISA)                                  \
  namespace ISA {                                                           \
  void fdiv_forward_rows(const FDivArgs& a, int64_t begin, int64_t end);  \
  void fdiv_backward_rows(const FDivArgs& a, int64_t begin, int64_t end); \
  void fdiv_softargmax_backward_rows(const FDivArgs& a, int64_t begin, int64_t end); \
  void fdiv_shard_rows(const FDivArgs& a, int64_t begin, int64_t end);              \
  }
FDISTILL_DECLARE_FDIV_KERNELS(DEFAULT)
#if defined(__x86_64__)
FDISTILL_DECLARE_FDIV_KERNELS(AVX2)
FDISTILL_DECLARE_FDIV_KERNELS(AVX512)
#endif

using FDivFn = void (*)(const FDivArgs&, int64_t, int64_t);

// The row kernels of one instruction set.
struct FDivKernels {
  FDivFn forward, backward, softargmax_backward, shard;
};

#define FDISTILL_FDIV_KERNELS(ISA)                                                                          \
  FDivKernels {                                                                                            \
    ISA::fdiv_forward_rows, ISA::fdiv_backward_rows, ISA::fdiv_softargmax_backward_rows, ISA::fdiv_shard_rows \
  }

static FDivKernels fdiv_kernels() {
#if defined(__x86_64__)
  switch (cpu_capability()) {
    case Capability::AVX512: return FDISTILL_FDIV_KERNELS(AVX512);
    case Capability::AVX2: return FDISTILL_FDIV_KERNELS(AVX2);
    case Capability::Default: break;
  }
#endif
  return FDISTILL_FDIV_KERNELS(DEFAULT);
}

static void run_fdiv_rows(const FDivArgs& a, FDivFn FDivKernels::*kernel) {
  const FDivFn fn = fdiv_kernels().*kernel;
  // rows take several sweeps each: a task of ~16k logits already amortises the hand-off
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.vocab, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> fdiv_fwd_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& reference,
                                                const std::optional<at::Tensor>& target,
                                                const std::optional<at::Tensor>& labels, c10::string_view f,
                                                double alpha, double reference_value, double temperature,
                                                int64_t ignore_index, int64_t max_sweeps, double tol, int64_t mode) {
  FDivArgs a = make_fdiv_args(logits, reference, target, labels, std::string(f), alpha, reference_value, temperature,
                              ignore_index, max_sweeps, tol, mode);
  auto outputs = allocate_fdiv_outputs(logits, a);
  run_fdiv_rows(a, &FDivKernels::forward);
  return outputs;
}

at::Tensor fdiv_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& logits,
                        const std::optional<at::Tensor>& reference, const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& labels, const at::Tensor& stats, c10::string_view f,
                        double alpha, double reference_value, double temperature, int64_t ignore_index,
                        int64_t mode) {
  FDivArgs a = make_fdiv_args(logits, reference, target, labels, std::string(f), alpha, reference_value, temperature,
                              ignore_index, /*max_sweeps=*/1, /*tol=*/0, mode);
  at::Tensor grad_rows_acc;
  at::Tensor grad = prepare_fdiv_backward(grad_rows, logits, stats, a, grad_rows_acc);
  run_fdiv_rows(a, &FDivKernels::backward);
  return grad;
}

at::Tensor fdiv_softargmax_bwd_cpu(const at::Tensor& grad, const at::Tensor& p,
                                   const std::optional<at::Tensor>& reference, c10::string_view f, double alpha,
                                   double reference_value, double temperature) {
  FDivArgs a = make_fdiv_args(p, reference, std::nullopt, std::nullopt, std::string(f), alpha, reference_value,
                              temperature, /*ignore_index=*/-100, /*max_sweeps=*/1, /*tol=*/0, /*mode=*/0);
  at::Tensor out = prepare_softargmax_backward(grad, p, a);
  run_fdiv_rows(a, &FDivKernels::softargmax_backward);
  return out;
}

at::Tensor fdiv_shard_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& reference,
                          const at::Tensor& stats, c10::string_view f, double alpha, double reference_value,
                          double temperature, int64_t mode) {
  FDivArgs a = make_fdiv_args(logits, reference, std::nullopt, std::nullopt, std::string(f), alpha, reference_value,
                              temperature, /*ignore_index=*/-100, /*max_sweeps=*/1, /*tol=*/0, /*mode=*/0);
  at::Tensor out = prepare_fdiv_shard(logits, stats, a, mode);
  run_fdiv_rows(a, &FDivKernels::shard);
  return out;
}

TORCH_LIBRARY_IMPL(fdistill, CPU, m) {
  m.impl("fdiv_fwd", &fdiv_fwd_cpu);
  m.impl("fdiv_bwd", &fdiv_bwd_cpu);
  m.impl("fdiv_softargmax_bwd", &fdiv_softargmax_bwd_cpu);
  m.impl("fdiv_shard", &fdiv_shard_cpu);
}

}  // namespace fdistill::cpu

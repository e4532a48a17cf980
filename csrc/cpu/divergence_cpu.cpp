// CPU implementation of fdistill::divergence_fwd / divergence_bwd: picks the
// row kernel compiled for the best instruction set this CPU has and runs it
// over rows with at::parallel_for.
#include <cmath>
#include <cstdlib>
#include <string>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "divergence_op.h"

namespace fdistill::cpu {

// One declaration per compiled instruction set (row_kernels_*.cpp).
#define FDISTILL_DECLARE_ROW_KERNELS(ISA)                                    \
  namespace ISA {                                                            \
  void divergence_forward_rows(const RowArgs& a, int64_t begin, int64_t end);  \
  void divergence_backward_rows(const RowArgs& a, int64_t begin, int64_t end); \
  void divergence_partial_rows(const RowArgs& a, int64_t begin, int64_t end);  \
  void divergence_second_rows(const RowArgs& a, int64_t begin, int64_t end);   \
  void divergence_finish_rows(const RowArgs& a, int64_t begin, int64_t end);   \
  }
FDISTILL_DECLARE_ROW_KERNELS(DEFAULT)
#if defined(__x86_64__)
FDISTILL_DECLARE_ROW_KERNELS(AVX2)
FDISTILL_DECLARE_ROW_KERNELS(AVX512)
#endif

using RowFn = void (*)(const RowArgs&, int64_t, int64_t);

// The row kernels of one instruction set.
struct RowKernels {
  RowFn forward, backward, partial, second, finish;
};
#define FDISTILL_ROW_KERNELS(ISA)                                                               \
  RowKernels {                                                                                  \
    ISA::divergence_forward_rows, ISA::divergence_backward_rows, ISA::divergence_partial_rows, \
        ISA::divergence_second_rows, ISA::divergence_finish_rows                               \
  }

static RowKernels row_kernels() {
#if defined(__x86_64__)
  switch (cpu_capability()) {
    case Capability::AVX512: return FDISTILL_ROW_KERNELS(AVX512);
    case Capability::AVX2: return FDISTILL_ROW_KERNELS(AVX2);
    case Capability::Default: break;
  }
#endif
  return FDISTILL_ROW_KERNELS(DEFAULT);
}

static void run_rows(const RowArgs& a, RowFn RowKernels::*kernel) {
  const RowFn fn = row_kernels().*kernel;
  // a task of at least ~64k logits amortises the thread hand-off
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(a.vocab, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> divergence_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                      const std::optional<at::Tensor>& labels,
                                                      c10::string_view divergence, double param,
                                                      double temperature, int64_t ignore_index,
                                                      bool /*grad_in_place: read by the autograd formula*/) {
  RowArgs a = make_row_args(student, teacher, labels, std::string(divergence), param, temperature, ignore_index);
  const auto acc = student.options().dtype(accumulate_type(student.scalar_type()));
  at::Tensor loss = at::empty({a.rows}, acc);
  at::Tensor stats = at::empty({a.rows, kNumStats}, acc);
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(a, &RowKernels::forward);
  return {loss, stats};
}

// The one-pass forward: loss and statistics into new tensors, grad_scale * the gradient into `grad` (a new tensor, or the
// student itself: each row is read into the kernel's buffers before its gradient is stored).
static std::tuple<at::Tensor, at::Tensor> run_forward_grad(const at::Tensor& student, const at::Tensor& teacher,
                                                           const std::optional<at::Tensor>& labels,
                                                           c10::string_view divergence, double param,
                                                           double temperature, int64_t ignore_index,
                                                           double grad_scale, const at::Tensor& grad) {
  RowArgs a = make_row_args(student, teacher, labels, std::string(divergence), param, temperature, ignore_index);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "fdistill: grad_scale must be finite, got ", grad_scale);
  const auto acc = student.options().dtype(accumulate_type(student.scalar_type()));
  at::Tensor loss = at::empty({a.rows}, acc);
  at::Tensor stats = at::empty({a.rows, kNumStats}, acc);
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  a.grad_student = grad.data_ptr();
  a.grad_stride = grad.stride(0);
  a.grad_scale = grad_scale;
  run_rows(a, &RowKernels::forward);
  return {loss, stats};
}

// The one-pass op: grad_scale * d(loss_row)/d(student) [rows, vocab] in the student's dtype, each row's
// gradient written while the row is in cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double param, double temperature, int64_t ignore_index, double grad_scale) {
  at::Tensor grad = at::empty(student.sizes(), student.options());
  advise_huge_pages(grad);
  auto [loss, stats] = run_forward_grad(student, teacher, labels, divergence, param, temperature, ignore_index,
                                        grad_scale, grad);
  return {loss, stats, grad};
}

// The one-pass op writing the gradient over the student logits (a caller that owns them).
std::tuple<at::Tensor, at::Tensor> divergence_fwd_grad_inplace_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double param, double temperature, int64_t ignore_index, double grad_scale) {
  auto out = run_forward_grad(student, teacher, labels, divergence, param, temperature, ignore_index, grad_scale,
                              student);
  student.unsafeGetTensorImpl()->bump_version();  // see divergence_bwd_inplace_cpu
  return out;
}

static void check_stats(const at::Tensor& stats, const RowArgs& a, at::ScalarType acc) {
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({a.rows, kNumStats}) && stats.is_contiguous(),
                    "fdistill: stats must be a contiguous [", a.rows, ", ", kNumStats, "] tensor");
  TORCH_CHECK_TYPE(stats.scalar_type() == acc, "fdistill: stats must be ", acc);
}

// Writes d(sum grad_loss * loss)/d(student) into `out` (a new tensor, or `student` itself).
static void run_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                         c10::string_view divergence, double param, double temperature, int64_t ignore_index,
                         const at::Tensor& out) {
  RowArgs a = make_row_args(student, teacher, labels, std::string(divergence), param, temperature, ignore_index);
  const auto acc = accumulate_type(student.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == a.rows, "fdistill: grad_loss must be [",
                    a.rows, "], got ", grad_loss.sizes());
  check_stats(stats, a, acc);
  const at::Tensor g = grad_loss.to(acc);
  a.stats = const_cast<void*>(stats.data_ptr());
  a.grad_loss = g.data_ptr();
  a.grad_loss_stride = g.stride(0);
  a.grad_student = out.data_ptr();
  a.grad_stride = out.stride(0);
  run_rows(a, &RowKernels::backward);
}

at::Tensor divergence_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                              c10::string_view divergence, double param, double temperature,
                              int64_t ignore_index) {
  at::Tensor grad = at::empty(student.sizes(), student.options());
  advise_huge_pages(grad);
  run_backward(grad_loss, student, teacher, labels, stats, divergence, param, temperature, ignore_index, grad);
  return grad;
}

void divergence_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                c10::string_view divergence, double param, double temperature,
                                int64_t ignore_index) {
  run_backward(grad_loss, student, teacher, labels, stats, divergence, param, temperature, ignore_index, student);
  // The dispatcher does not bump the version of a custom op's mutated argument: do it, so that
  // an autograd node that saved these logits raises instead of reading the gradient.
  student.unsafeGetTensorImpl()->bump_version();
}

// ---------------------------------------------------------------- vocabulary-parallel ops

// The first-pass partials [rows, kNumPartials] (float64) of a vocabulary slice of every row.
at::Tensor divergence_partial_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& labels, c10::string_view divergence,
                                  double param, double temperature, int64_t ignore_index) {
  RowArgs a = make_row_args(student, teacher, labels, std::string(divergence), param, temperature, ignore_index);
  at::Tensor partials = at::empty({a.rows, kNumPartials}, student.options().dtype(at::kDouble));
  a.partials = partials.data_ptr<double>();
  run_rows(a, &RowKernels::partial);
  return partials;
}

// The second-pass sums [rows, 2] = (loss, aux) (float64) of a slice, from the whole rows' statistics.
at::Tensor divergence_second_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                 c10::string_view divergence, double param, double temperature,
                                 int64_t ignore_index) {
  RowArgs a = make_row_args(student, teacher, labels, std::string(divergence), param, temperature, ignore_index);
  check_stats(stats, a, accumulate_type(student.scalar_type()));
  at::Tensor second = at::zeros({a.rows, 2}, student.options().dtype(at::kDouble));
  a.stats = const_cast<void*>(stats.data_ptr());
  a.second = second.data_ptr<double>();
  run_rows(a, &RowKernels::second);
  return second;
}

// Loss [rows] and statistics [rows, kNumStats] (in the accumulation dtype of logits of `dtype`) from
// the partials of every slice [parts, rows, kNumPartials] and, for the two-pass divergences, the
// second-pass sums of the whole rows [rows, 2] (without them those rows' loss is not final).
std::tuple<at::Tensor, at::Tensor> divergence_finish_cpu(const at::Tensor& partials,
                                                         const std::optional<at::Tensor>& second,
                                                         const std::optional<at::Tensor>& labels,
                                                         c10::string_view divergence, double param,
                                                         int64_t ignore_index, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(partials.dim() == 3 && partials.size(2) == kNumPartials,
                    "fdistill: partials must be [parts, rows, ", kNumPartials, "], got ", partials.sizes());
  TORCH_CHECK_TYPE(partials.scalar_type() == at::kDouble, "fdistill: partials must be float64");
  RowArgs a;
  a.divergence = resolve_divergence(std::string(divergence), param);
  a.dtype = dtype_of(dtype);
  a.coef = make_coef(a.divergence, param);
  a.parts = partials.size(0);
  a.rows = partials.size(1);
  a.ignore_index = ignore_index;
  set_labels(a, labels, partials.device());
  const at::Tensor parts = partials.contiguous();
  a.partials = const_cast<double*>(parts.data_ptr<double>());
  at::Tensor sums;
  if (second.has_value()) {
    TORCH_CHECK_VALUE(second->sizes() == at::IntArrayRef({a.rows, 2}) && second->scalar_type() == at::kDouble,
                      "fdistill: second must be a float64 [", a.rows, ", 2] tensor");
    sums = second->contiguous();
    a.second = sums.data_ptr<double>();
  }
  const auto acc = partials.options().dtype(accumulate_type(dtype));
  at::Tensor loss = at::empty({a.rows}, acc);
  at::Tensor stats = at::empty({a.rows, kNumStats}, acc);
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(a, &RowKernels::finish);
  return {loss, stats};
}

TORCH_LIBRARY_IMPL(fdistill, CPU, m) {
  m.impl("divergence_partial", &divergence_partial_cpu);
  m.impl("divergence_second", &divergence_second_cpu);
  m.impl("divergence_finish", &divergence_finish_cpu);
  m.impl("divergence_fwd", &divergence_fwd_cpu);
  m.impl("divergence_fwd_grad", &divergence_fwd_grad_cpu);
  m.impl("divergence_fwd_grad_", &divergence_fwd_grad_inplace_cpu);
  m.impl("divergence_bwd", &divergence_bwd_cpu);
  m.impl("divergence_bwd_", &divergence_bwd_inplace_cpu);
}

}  // namespace fdistill::cpu

#include "divergence_op.h"

#include <cstdint>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fdistill {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.is_cpu()) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.numel() * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

Divergence resolve_divergence(const std::string& name, double param) {
  static const std::unordered_map<std::string, Divergence> kNames = {
      {"forward_kl", Divergence::ForwardKL}, {"reverse_kl", Divergence::ReverseKL},
      {"jeffreys", Divergence::Jeffreys},    {"jsd", Divergence::JSD},
      {"skew_kl", Divergence::SkewKL},       {"skew_reverse_kl", Divergence::SkewReverseKL},
      {"tv", Divergence::TV},                {"alpha", Divergence::Alpha}};
  const auto it = kNames.find(name);
  TORCH_CHECK_VALUE(it != kNames.end(), "fdistill: unknown divergence '", name, "'");
  const Divergence d = it->second;
  if (d == Divergence::JSD || d == Divergence::SkewKL || d == Divergence::SkewReverseKL ||
      d == Divergence::Jeffreys) {
    TORCH_CHECK_VALUE(param >= 0 && param <= 1, "fdistill: ", name, " weight must be in [0, 1], got ", param);
  }
  if (d == Divergence::Alpha) {
    TORCH_CHECK_VALUE(std::isfinite(param) && param != 0 && param != 1,
                      "fdistill: alpha must be finite and not 0 or 1, got ", param);
  }
  // endpoints: the interior formulas would form 0 * inf where one KL is infinite
  if (d == Divergence::Jeffreys && param == 0) return Divergence::ForwardKL;
  if (d == Divergence::Jeffreys && param == 1) return Divergence::ReverseKL;
  if (d == Divergence::JSD && param == 0) return Divergence::ForwardKL;
  if (d == Divergence::JSD && param == 1) return Divergence::ReverseKL;
  if (d == Divergence::SkewKL && param == 0) return Divergence::ForwardKL;
  if (d == Divergence::SkewReverseKL && param == 0) return Divergence::ReverseKL;
  return d;
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK_TYPE(false, "fdistill: logits must be float32, float64, bfloat16 or float16, got ", t);
  }
}

at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

RowArgs make_row_args(const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, const std::string& divergence,
                      double param, double temperature, int64_t ignore_index) {
  TORCH_CHECK_VALUE(student.dim() == 2, "fdistill: student must be [rows, vocab], got ", student.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "fdistill: student ", student.sizes(),
                    " and teacher ", teacher.sizes(), " shapes differ");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "fdistill: student ", student.scalar_type(),
                   " and teacher ", teacher.scalar_type(), " dtypes differ");
  TORCH_CHECK(student.device() == teacher.device(), "fdistill: student and teacher on different devices");
  TORCH_CHECK_VALUE(student.stride(1) == 1 && teacher.stride(1) == 1,
                    "fdistill: logits must have unit stride along the vocabulary");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "fdistill: temperature must be > 0, got ",
                    temperature);
  RowArgs a;
  a.divergence = resolve_divergence(divergence, param);
  a.dtype = dtype_of(student);
  a.coef = make_coef(a.divergence, param);
  a.rows = student.size(0);
  a.vocab = student.size(1);
  a.inv_temperature = 1.0 / temperature;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.student_stride = student.stride(0);
  a.teacher_stride = teacher.stride(0);
  a.ignore_index = ignore_index;
  set_labels(a, labels, student.device());
  return a;
}

void set_labels(RowArgs& a, const std::optional<at::Tensor>& labels, const at::Device& device) {
  if (!labels.has_value()) return;
  const at::Tensor& l = *labels;
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == a.rows, "fdistill: labels must be [rows] = [", a.rows,
                    "], got ", l.sizes());
  TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "fdistill: labels must be int64, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.is_contiguous(), "fdistill: labels must be contiguous");
  TORCH_CHECK(l.device() == device, "fdistill: labels on a different device than the logits");
  a.labels = l.data_ptr<int64_t>();
}

}  // namespace fdistill

#include "fdiv_op.h"

#include <cmath>

#include "divergence_op.h"

namespace fdistill {

FKind resolve_f(const std::string& f, double alpha) {
  if (f == "kl") return FKind::KL;
  if (f == "reverse_kl") return FKind::ReverseKL;
  if (f == "js") return FKind::JS;
  TORCH_CHECK_VALUE(f == "alpha", "fdistill: unknown f '", f, "' (kl, reverse_kl, alpha, js)");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0 && alpha != 1, "fdistill: alpha must be > 0 and != 1, got ",
                    alpha);
  if (alpha == 1.5) return FKind::Alpha15;
  if (alpha == 2) return FKind::Alpha2;
  return alpha_pow_n(alpha) ? FKind::AlphaPow : FKind::Alpha;
}

FDivArgs make_fdiv_args(const at::Tensor& logits, const std::optional<at::Tensor>& reference,
                        const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& labels,
                        const std::string& f, double alpha, double reference_value, double temperature,
                        int64_t ignore_index, int64_t max_sweeps, double tol, int64_t mode) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "fdistill: logits must be [rows, vocab], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.stride(1) == 1, "fdistill: logits must have unit stride along the vocabulary");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "fdistill: temperature must be > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "fdistill: mode must be 0, 1 or 2, got ", mode);
  TORCH_CHECK_VALUE(max_sweeps >= 1, "fdistill: max_sweeps must be >= 1, got ", max_sweeps);
  TORCH_CHECK_VALUE(tol >= 0, "fdistill: tol must be >= 0, got ", tol);
  FDivArgs a;
  a.kind = resolve_f(f, alpha);
  a.coef = make_fcoef(f == "alpha" ? alpha : 2.0);
  a.mode = static_cast<FDivMode>(mode);
  a.dtype = dtype_of(logits);
  a.rows = logits.size(0);
  a.vocab = logits.size(1);
  a.inv_temperature = 1.0 / temperature;
  a.max_sweeps = max_sweeps;
  a.tol = tol;
  a.logits = logits.data_ptr();
  a.logits_stride = logits.stride(0);
  a.ignore_index = ignore_index;
  const auto acc = accumulate_type(logits.scalar_type());
  if (reference.has_value()) {
    const at::Tensor& q = *reference;
    TORCH_CHECK_VALUE(q.dim() == 2 && q.size(1) == a.vocab && (q.size(0) == a.rows || q.stride(0) == 0),
                      "fdistill: reference must be [rows, vocab] (row stride 0 to share one row), got ", q.sizes());
    TORCH_CHECK_VALUE(q.stride(1) == 1, "fdistill: reference must have unit stride along the vocabulary");
    TORCH_CHECK_TYPE(q.scalar_type() == acc, "fdistill: reference must be ", acc, ", got ", q.scalar_type());
    TORCH_CHECK(q.device() == logits.device(), "fdistill: reference on a different device than the logits");
    a.reference = q.data_ptr();
    a.reference_stride = q.stride(0);
  } else {
    TORCH_CHECK_VALUE(reference_value > 0 && std::isfinite(reference_value),
                      "fdistill: reference_value must be > 0, got ", reference_value);
    a.reference_value = reference_value;
  }
  if (target.has_value()) {
    const at::Tensor& y = *target;
    TORCH_CHECK_VALUE(a.mode == FDivMode::FYLoss, "fdistill: target is only read by the FY loss (mode 1)");
    TORCH_CHECK_VALUE(y.sizes() == logits.sizes(), "fdistill: target ", y.sizes(), " and logits ", logits.sizes(),
                      " shapes differ");
    TORCH_CHECK_VALUE(y.stride(1) == 1, "fdistill: target must have unit stride along the vocabulary");
    TORCH_CHECK(y.device() == logits.device(), "fdistill: target on a different device than the logits");
    a.target = y.data_ptr();
    a.target_dtype = dtype_of(y);
    a.target_stride = y.stride(0);
  }
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_VALUE(a.mode == FDivMode::FYLoss && !target.has_value(),
                      "fdistill: labels are an FY-loss target (mode 1), exclusive with target");
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == a.rows, "fdistill: labels must be [", a.rows, "], got ",
                      l.sizes());
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "fdistill: labels must be int64, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.is_contiguous(), "fdistill: labels must be contiguous");
    TORCH_CHECK(l.device() == logits.device(), "fdistill: labels on a different device than the logits");
    a.labels = l.data_ptr<int64_t>();
  }
  TORCH_CHECK_VALUE(a.mode != FDivMode::FYLoss || target.has_value() || labels.has_value(),
                    "fdistill: the FY loss (mode 1) needs a target or labels");
  return a;
}

std::tuple<at::Tensor, at::Tensor> allocate_fdiv_outputs(const at::Tensor& logits, FDivArgs& a) {
  const auto acc = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor out = a.mode == FDivMode::SoftArgmax ? at::empty({a.rows, a.vocab}, logits.options())
                                                   : at::empty({a.rows}, acc);
  at::Tensor stats = at::empty({a.rows, kFDivStats}, acc);
  if (a.mode == FDivMode::SoftArgmax) advise_huge_pages(out);
  a.out = out.data_ptr();
  a.out_stride = a.mode == FDivMode::SoftArgmax ? a.vocab : 1;
  a.stats = stats.data_ptr();
  return {out, stats};
}

at::Tensor prepare_softargmax_backward(const at::Tensor& grad, const at::Tensor& p, FDivArgs& a) {
  TORCH_CHECK_VALUE(grad.sizes() == p.sizes() && grad.stride(1) == 1, "fdistill: grad must be ", p.sizes(),
                    " with unit stride along the vocabulary, got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == p.scalar_type(), "fdistill: grad must be ", p.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == p.device(), "fdistill: grad must be on ", p.device());
  at::Tensor out = at::empty(p.sizes(), p.options());
  advise_huge_pages(out);
  a.grad_out = grad.data_ptr();
  a.grad_out_stride = grad.stride(0);
  a.grad_logits = out.data_ptr();
  a.grad_stride = out.stride(0);
  return out;
}

static void check_stats(const at::Tensor& logits, const at::Tensor& stats, const FDivArgs& a) {
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({a.rows, kFDivStats}) && stats.is_contiguous(),
                    "fdistill: stats must be a contiguous [", a.rows, ", ", kFDivStats, "] tensor");
  TORCH_CHECK_TYPE(stats.scalar_type() == accumulate_type(logits.scalar_type()), "fdistill: stats must be ",
                   accumulate_type(logits.scalar_type()));
  TORCH_CHECK_VALUE(stats.device() == logits.device(), "fdistill: stats must be on ", logits.device());
}

at::Tensor prepare_fdiv_shard(const at::Tensor& logits, const at::Tensor& stats, FDivArgs& a, int64_t mode) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "fdistill: fdiv_shard mode must be 0 (sums) or 1 (probabilities), got ",
                    mode);
  check_stats(logits, stats, a);
  a.mode = mode == 0 ? FDivMode::ShardSums : FDivMode::ShardProbs;
  at::Tensor out = mode == 0 ? at::empty({a.rows, 2}, logits.options().dtype(at::kDouble))
                             : at::empty({a.rows, a.vocab}, logits.options().dtype(stats.scalar_type()));
  a.stats = const_cast<void*>(stats.data_ptr());
  a.out = out.data_ptr();
  a.out_stride = mode == 0 ? 2 : a.vocab;
  return out;
}

at::Tensor prepare_fdiv_backward(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& stats,
                                 FDivArgs& a, at::Tensor& grad_rows_acc) {
  const auto acc = accumulate_type(logits.scalar_type());
  TORCH_CHECK_VALUE(a.mode != FDivMode::SoftArgmax,
                    "fdistill: fdiv_bwd is the backward of the FY loss and f-softmax (modes 1, 2)");
  TORCH_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == a.rows, "fdistill: grad_rows must be [", a.rows,
                    "], got ", grad_rows.sizes());
  check_stats(logits, stats, a);
  grad_rows_acc = grad_rows.to(acc);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  advise_huge_pages(grad);
  a.stats = const_cast<void*>(stats.data_ptr());
  a.grad_rows = grad_rows_acc.data_ptr();
  a.grad_rows_stride = grad_rows_acc.stride(0);
  a.grad_logits = grad.data_ptr();
  a.grad_stride = grad.stride(0);
  return grad;
}

}  // namespace fdistill

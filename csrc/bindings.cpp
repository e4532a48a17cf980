// The op schemas (defined once, implemented per device in cpu/ and cuda/) and
// the Python module fdistill._C, which only reports how it was built.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "divergence_op.h"
#include "fdistill/divergence_math.h"
#include "fdistill/fdiv_math.h"

TORCH_LIBRARY(fdistill, m) {
  // Per-row loss [rows] (fp32; fp64 for fp64 logits) and the row statistics
  // [rows, kNumStats] that the backward needs: log-sum-exps and one or two scalars.
  // grad_in_place only tells the autograd formula which backward to run.
  m.def(
      "divergence_fwd(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param,"
      " float temperature, int ignore_index, bool grad_in_place=False) -> (Tensor, Tensor)");
  // One pass: the same loss and statistics, and grad_scale * d(loss_row)/d(student) [rows, vocab] in
  // the student's dtype (the autograd formula scales it by the upstream gradient in place).
  m.def(
      "divergence_fwd_grad(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param,"
      " float temperature, int ignore_index, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // The same, with the gradient written over the student logits (for callers that own them).
  m.def(
      "divergence_fwd_grad_(Tensor(a!) student, Tensor teacher, Tensor? labels, str divergence, float param,"
      " float temperature, int ignore_index, float grad_scale=1.0) -> (Tensor, Tensor)");
  // d(sum grad_loss * loss)/d(student) [rows, vocab] in the student's dtype.
  m.def(
      "divergence_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats,"
      " str divergence, float param, float temperature, int ignore_index) -> Tensor");
  // The same gradient written over the student logits (which the caller no longer needs).
  m.def(
      "divergence_bwd_(Tensor grad_loss, Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor stats,"
      " str divergence, float param, float temperature, int ignore_index) -> ()");

  // Vocabulary parallelism, partial -> merge -> finish (each rank holds a vocabulary slice of every row):
  // the first-pass partials [rows, kNumPartials] (float64) of the slice; the loss and statistics from the
  // partials of every slice [parts, rows, kNumPartials] (and, for the two-pass divergences, `second`:
  // the whole rows' second-pass sums; dtype: the logits'); the second-pass sums [rows, 2] (float64) of a
  // slice from the whole rows' statistics. The backward is divergence_bwd with those statistics.
  m.def(
      "divergence_partial(Tensor student, Tensor teacher, Tensor? labels, str divergence, float param,"
      " float temperature, int ignore_index) -> Tensor");
  m.def(
      "divergence_finish(Tensor partials, Tensor? second, Tensor? labels, str divergence, float param,"
      " int ignore_index, ScalarType dtype) -> (Tensor, Tensor)");
  m.def(
      "divergence_second(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, str divergence,"
      " float param, float temperature, int ignore_index) -> Tensor");

  // f-divergence operators and Fenchel-Young losses (fdiv_args.h): solves for tau per row, then
  // mode 0 -> (p* [rows, vocab] in the logits' dtype, stats), mode 1 -> (FY loss [rows], stats),
  // mode 2 -> (f-softmax value [rows], stats); stats [rows, 3] = [max theta, t, S0] (t: fdiv_math.h).
  m.def(
      "fdiv_fwd(Tensor logits, Tensor? reference, Tensor? target, Tensor? labels, str f, float alpha,"
      " float reference_value, float temperature, int ignore_index, int max_sweeps, float tol, int mode)"
      " -> (Tensor, Tensor)");
  // Modes 1 and 2: grad_rows / T * (p* - y) [rows, vocab] in the logits' dtype (y = 0 in mode 2).
  m.def(
      "fdiv_bwd(Tensor grad_rows, Tensor logits, Tensor? reference, Tensor? target, Tensor? labels, Tensor stats,"
      " str f, float alpha, float reference_value, float temperature, int ignore_index, int mode) -> Tensor");
  // A vocabulary shard at given stats [max theta of the whole row, t, S0] (the vocabulary-parallel solver):
  // mode 0 -> the shard's [S0, S1] at t [rows, 2] (float64), mode 1 -> p [rows, vocab] (accumulation dtype).
  m.def(
      "fdiv_shard(Tensor logits, Tensor? reference, Tensor stats, str f, float alpha, float reference_value,"
      " float temperature, int mode) -> Tensor");
  // Mode 0: w (g - <w, g> / sum w) / T [rows, vocab] from the saved p* and the incoming grad (fdiv_args.h).
  m.def(
      "fdiv_softargmax_bwd(Tensor grad, Tensor p, Tensor? reference, str f, float alpha, float reference_value,"
      " float temperature) -> Tensor");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fdistill's compiled kernels (ops are registered under torch.ops.fdistill)";
#ifdef FDISTILL_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
  mod.attr("num_stats") = fdistill::kNumStats;
  mod.attr("num_partials") = fdistill::kNumPartials;
  mod.def(
      "needs_second_pass",
      [](const std::string& name) { return fdistill::needs_second_pass(fdistill::resolve_divergence(name, 0.5)); },
      "Whether a divergence's kernel makes a second pass over each row (jsd, skew_kl, skew_reverse_kl, tv).");
  mod.attr("num_fdiv_stats") = fdistill::kFDivStats;
  mod.def(
      "cpu_capability", [](bool refresh) { return fdistill::cpu::capability_name(fdistill::cpu::cpu_capability(refresh)); },
      pybind11::arg("refresh") = false,
      "Instruction set of the CPU row kernels in use (default, avx2 or avx512); refresh=True re-reads "
      "FDISTILL_CPU_CAPABILITY / ATEN_CPU_CAPABILITY.");
}

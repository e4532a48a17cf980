// Plain description of a batch of rows for the row kernels: raw pointers and
// int64 sizes, no torch types, so every kernel translation unit stays light.
#pragma once

#include <cstdint>

#include "fdistill/divergence_math.h"

namespace fdistill {

enum class DType : int32_t { Float32, Float64, BFloat16, Float16 };

struct RowArgs {
  Divergence divergence;
  DType dtype;           // of student, teacher and the student gradient
  DivCoef coef;
  int64_t rows = 0;
  int64_t vocab = 0;
  double inv_temperature = 1;

  const void* student = nullptr;  // [rows, vocab], unit stride along vocab
  const void* teacher = nullptr;
  int64_t student_stride = 0;     // elements between rows
  int64_t teacher_stride = 0;
  const int64_t* labels = nullptr;  // [rows] or null; rows with ignore_index are skipped
  int64_t ignore_index = -100;

  // float for fp32/bf16/fp16 inputs, double for fp64 inputs
  void* loss = nullptr;           // forward: [rows]
  void* stats = nullptr;          // [rows, kNumStats]: written by forward, read by backward
  const void* grad_loss = nullptr;  // backward: [rows], any stride
  int64_t grad_loss_stride = 1;
  void* grad_student = nullptr;   // backward (and the one-pass forward): [rows, vocab], unit stride
                                  // along vocab; may be `student` in the backward
  int64_t grad_stride = 0;        // elements between gradient rows
  double grad_scale = 1;          // one-pass forward: the gradient is written times this factor

  // vocabulary-parallel ops (float64)
  double* partials = nullptr;     // partial op: [rows, kNumPartials] out; finish op: [parts, rows, kNumPartials] in
  int64_t parts = 1;
  double* second = nullptr;       // second-pass op: [rows, 2] (loss, aux) out; finish op: in, or null
};

}  // namespace fdistill

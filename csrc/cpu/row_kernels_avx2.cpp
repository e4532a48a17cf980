// Row kernels for AVX2 + FMA. Only this file is compiled for the instruction
// set (the target pragma), so the extension still loads on older CPUs; the
// standard and c10 headers come first so they stay generic code.
#if defined(__x86_64__) || defined(_M_X64)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#pragma GCC target("avx2,fma,f16c")
// GCC's target pragma does not define the feature macros that sleef.h and
// ATen test; the pragma above makes them true for this file.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/row_kernels.h"
#include "cpu/fdiv_kernels.h"
#endif

// Row kernels for any x86-64 / ARM CPU (scalar fallback of at::vec).
#define CPU_CAPABILITY DEFAULT
#include "cpu/row_kernels.h"
#include "cpu/fdiv_kernels.h"

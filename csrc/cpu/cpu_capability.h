// Which of the compiled CPU row kernels runs: the best this CPU supports,
// capped by FDISTILL_CPU_CAPABILITY or else ATEN_CPU_CAPABILITY
// (default | avx2 | avx512), the variable PyTorch's own kernels obey.
#pragma once

#include <string>

namespace fdistill::cpu {

enum class Capability { Default = 0, AVX2 = 1, AVX512 = 2 };

// Read once per process (the environment) but re-read when `refresh` is set.
Capability cpu_capability(bool refresh = false);

std::string capability_name(Capability c);

}  // namespace fdistill::cpu

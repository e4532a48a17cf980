#include "cpu/cpu_capability.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fdistill::cpu {

static Capability hardware_capability() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Capability::AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Capability::AVX2;
  }
#endif
  return Capability::Default;
}

static Capability requested_cap() {
  const char* env = std::getenv("FDISTILL_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env == nullptr) return Capability::AVX512;
  if (std::strcmp(env, "default") == 0) return Capability::Default;
  if (std::strcmp(env, "avx2") == 0) return Capability::AVX2;
  return Capability::AVX512;
}

Capability cpu_capability(bool refresh) {
  static std::atomic<int> cached{-1};
  int c = cached.load(std::memory_order_relaxed);
  if (c < 0 || refresh) {
    const Capability hw = hardware_capability(), cap = requested_cap();
    c = static_cast<int>(hw) < static_cast<int>(cap) ? static_cast<int>(hw) : static_cast<int>(cap);
    cached.store(c, std::memory_order_relaxed);
  }
  return static_cast<Capability>(c);
}

std::string capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace fdistill::cpu

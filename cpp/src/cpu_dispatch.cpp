#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace zerofuse::cpu {
namespace {

#define ZEROFUSE_CPU_KERNEL_ENTRY_baseline(name, Type) &baseline::name,
#define ZEROFUSE_CPU_KERNEL_ENTRY_avx2(name, Type) &avx2::name,
#define ZEROFUSE_KERNEL_TABLE(isa) \
  Kernels { #isa, ZEROFUSE_CPU_KERNELS(ZEROFUSE_CPU_KERNEL_ENTRY_##isa) }

const Kernels& choose() {
  static const Kernels baseline_table = ZEROFUSE_KERNEL_TABLE(baseline);
#if defined(ZEROFUSE_CPU_HAS_AVX2)
  static const Kernels avx2_table = ZEROFUSE_KERNEL_TABLE(avx2);
  // ZEROFUSE_CPU_ISA=baseline forces the portable variant (for testing it).
  const char* forced = std::getenv("ZEROFUSE_CPU_ISA");
  const bool want_baseline = forced != nullptr && std::strcmp(forced, "baseline") == 0;
  __builtin_cpu_init();
  if (!want_baseline && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return avx2_table;
#endif
  return baseline_table;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels& chosen = choose();
  return chosen;
}

std::vector<const char*> compiled_isas() {
  std::vector<const char*> isas{"baseline"};
#if defined(ZEROFUSE_CPU_HAS_AVX2)
  isas.push_back("avx2");
#endif
  return isas;
}

}  // namespace zerofuse::cpu

#include <cstdlib>
#include <string>

#include "cpu/kernels.h"

namespace zerofuse::cpu {
namespace {

#define ZEROFUSE_CPU_KERNEL_ENTRY_baseline(name, Type) &baseline::name,
#define ZEROFUSE_CPU_KERNEL_ENTRY_avx2(name, Type) &avx2::name,
#define ZEROFUSE_CPU_KERNEL_ENTRY_avx512(name, Type) &avx512::name,
#define ZEROFUSE_KERNEL_TABLE(isa) \
  Kernels { #isa, ZEROFUSE_CPU_KERNELS(ZEROFUSE_CPU_KERNEL_ENTRY_##isa) }

#if defined(ZEROFUSE_CPU_HAS_AVX2)
bool runs_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
#if defined(ZEROFUSE_CPU_HAS_AVX512)
bool runs_avx512() {
  return runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

// The widest variant this processor runs; ZEROFUSE_CPU_ISA=<name> caps it at
// a narrower one (to test every variant on one machine). A name that is not
// built or that the processor cannot run falls back to the widest that is.
const Kernels& choose() {
  static const Kernels baseline_table = ZEROFUSE_KERNEL_TABLE(baseline);
  const char* forced = std::getenv("ZEROFUSE_CPU_ISA");
  const std::string cap = forced ? forced : "";
  if (cap == "baseline") return baseline_table;
  __builtin_cpu_init();
#if defined(ZEROFUSE_CPU_HAS_AVX512)
  static const Kernels avx512_table = ZEROFUSE_KERNEL_TABLE(avx512);
  if (cap != "avx2" && runs_avx512()) return avx512_table;
#endif
#if defined(ZEROFUSE_CPU_HAS_AVX2)
  static const Kernels avx2_table = ZEROFUSE_KERNEL_TABLE(avx2);
  if (runs_avx2()) return avx2_table;
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
#if defined(ZEROFUSE_CPU_HAS_AVX512)
  isas.push_back("avx512");
#endif
  return isas;
}

}  // namespace zerofuse::cpu

#include "zerofuse/build_info.h"

#include "common/cuda_runtime_info.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse {

BuildInfo build_info() {
  BuildInfo info;
  info.version = ZEROFUSE_VERSION_STRING;
  info.cxx_compiler = ZEROFUSE_CXX_COMPILER;
#ifdef ZEROFUSE_WITH_CUDA
  info.cuda = true;
  info.cuda_archs = ZEROFUSE_CUDA_ARCHS;
  info.cuda_compiler_version = ZEROFUSE_CUDA_COMPILER_VERSION;
#endif
  for (const char* isa : cpu::compiled_isas()) info.cpu_isas.emplace_back(isa);
  info.cpu_isa = cpu::kernels().isa;
  return info;
}

int cuda_device_count() {
#ifdef ZEROFUSE_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

std::string cuda_status() {
#ifdef ZEROFUSE_WITH_CUDA
  return cuda::status();
#else
  return "not built (nvcc was not found when zerofuse was built)";
#endif
}

int num_threads() { return detail::pool_threads(); }
bool use_loaded_openmp() { return detail::adopt_loaded_openmp(); }
std::string threading_backend() { return detail::threading_backend(); }
void set_num_threads(int threads) { detail::set_pool_threads(threads); }

}  // namespace zerofuse

// What this build of the core contains, and what the machine offers it.
#pragma once

#include <string>
#include <vector>

namespace zerofuse {

struct BuildInfo {
  std::string version;
  std::string cxx_compiler;
  bool cuda = false;                   // CUDA kernels compiled in
  std::string cuda_archs;              // e.g. "80,90"
  std::string cuda_compiler_version;   // nvcc that built them
  std::vector<std::string> cpu_isas;   // CPU kernel variants compiled in
  std::string cpu_isa;                 // the variant this machine runs
};

BuildInfo build_info();

// Number of CUDA devices usable by this build; 0 without CUDA or without a driver.
int cuda_device_count();
// A line for humans: "not built", "no driver (...)", "2 devices (CUDA runtime 13.0)".
std::string cuda_status();

// Threads used by the CPU kernels (default: the processors this process may run
// on, or ZEROFUSE_NUM_THREADS).
int num_threads();
// Run the CPU kernels' parallel work on the OpenMP runtime already loaded in
// the process (PyTorch's libgomp) instead of zerofuse's own threads, so the two
// do not compete for cores. Returns whether one was found; without one (or with
// ZEROFUSE_THREADING=pool) zerofuse keeps its own pool.
bool use_loaded_openmp();
// "openmp" or "pool": what runs the CPU kernels' parallel work now.
std::string threading_backend();
void set_num_threads(int threads);

}  // namespace zerofuse

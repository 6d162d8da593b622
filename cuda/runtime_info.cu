// What the CUDA runtime sees on this machine. cudart is linked statically and
// loads the driver on first use, so on a machine without one these calls
// return an error code (reported, not thrown) instead of failing the import.
#include <cuda_runtime.h>

#include <string>

#include "common/cuda_runtime_info.h"

namespace zerofuse::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

std::string status() {
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  const std::string runtime_text =
      "CUDA runtime " + std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable device (") + cudaGetErrorString(err) + "; " + runtime_text + ")";
  }
  int driver = 0;
  cudaDriverGetVersion(&driver);
  std::string text = std::to_string(count) + (count == 1 ? " device" : " devices") + " (" + runtime_text +
                     ", driver " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) + ")";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess)
      text += "; " + std::to_string(i) + ": " + prop.name + " sm_" + std::to_string(prop.major) +
              std::to_string(prop.minor);
  }
  return text;
}

}  // namespace zerofuse::cuda

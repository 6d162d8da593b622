// Device queries answered by the CUDA runtime (cuda/runtime_info.cu); only
// compiled into CUDA builds.
#pragma once

#include <string>

namespace zerofuse::cuda {

int device_count();   // 0 when there is no driver or no device
std::string status(); // a line for `zerofuse env`

}  // namespace zerofuse::cuda

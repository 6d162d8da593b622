// cpp/common/ holds what both kernel trees -- the CPU kernels (cpp/src/cpu)
// and the CUDA kernels (cuda/) -- share: arithmetic that must give the same
// numbers on either device, and the declarations the device dispatch
// (cpp/src/*.cpp) calls. It includes only public headers (cpp/include) and
// itself; neither kernel tree includes the other's private headers.
//
// Functions written once for both sides carry ZF_HOST_DEVICE.
#pragma once

#if defined(__CUDACC__)
#define ZF_HOST_DEVICE __host__ __device__
#define ZF_FORCE_INLINE __forceinline__
#else
#define ZF_HOST_DEVICE
#define ZF_FORCE_INLINE inline __attribute__((always_inline))
#endif

// The device dispatch: the only place that includes the kernel trees'
// declarations. A call's arguments are validated first (checks.h); then CPU
// tensors go to the CPU kernels of this processor's instruction set, CUDA
// tensors to the CUDA kernels:
//
//   if (x.device.is_cpu()) return cpu::kernels().layernorm_forward(...);
//   ZF_CUDA_KERNEL(op, cuda::layernorm_forward(..., stream));
//
// In a build without CUDA the CUDA call is still compiled -- as an unevaluated
// operand, so both builds type-check the same code -- and never made: it
// raises instead, naming `op`.
#pragma once

#include "checks.h"
#include "common/cuda_kernels.h"
#include "cpu/kernels.h"

#ifdef ZEROFUSE_WITH_CUDA
#define ZF_CUDA_KERNEL(op, call) ((void)(op), call)
#else
#define ZF_CUDA_KERNEL(op, call) ((void)sizeof(decltype(call)*), ::zerofuse::detail::no_cuda_kernel(op))
#endif

// The second pass of the column reductions in the LayerNorm and bias+GELU
// backwards: the first pass leaves one float32 partial per column for each
// slab of rows ([slabs, d], slabs fixed by the shape alone); this adds the
// slabs in a fixed order, in double, and writes the sums in the output's
// dtype -- so dweight / dbias are the same bits on every run.
#pragma once

#include "common.cuh"

namespace zerofuse::cuda {
namespace {  // each kernel file gets its own instantiations

template <typename T>
__global__ void sum_slabs_kernel(const float* partial, int slabs, int d, T* out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  double total = 0.0;
  for (int s = 0; s < slabs; ++s) total += double(partial[std::int64_t(s) * d + c]);
  out[c] = from_float<T>(float(total));
}

template <typename T>
void sum_slabs(const float* partial, int slabs, int d, T* out, cudaStream_t stream) {
  sum_slabs_kernel<T><<<unsigned((d + 255) / 256), 256, 0, stream>>>(partial, slabs, d, out);
  ZF_CUDA_CHECK_LAUNCH("sum_slabs_kernel");
}

}  // namespace
}  // namespace zerofuse::cuda

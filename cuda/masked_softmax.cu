// CUDA scaled, masked softmax: one warp per row. The forward reads the row
// once with an online (running max, rescaled sum) softmax and a second time
// to write it normalised; the backward reads dy and y once for <dy, y> and
// again to write dx. Rows of attention scores (a few KB) are still in L1/L2
// for the second read, so both are close to one pass over DRAM.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "common/cuda_kernels.h"
#include "common/softmax_rows.h"

namespace zerofuse::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename M>
__device__ __forceinline__ float mask_term(M m) {
  return to_float(m);
}
template <>
__device__ __forceinline__ float mask_term<std::uint8_t>(std::uint8_t m) {
  return m ? 0.0f : -INFINITY;  // bool: excluded where false
}

// Merges (max, sum) pairs across the warp: the sums are rescaled to the larger max.
__device__ __forceinline__ void warp_merge(float& max, float& sum) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_max = __shfl_xor_sync(0xffffffffu, max, offset);
    const float other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
    const float merged = fmaxf(max, other_max);
    if (merged != -INFINITY)
      sum = sum * __expf(max - merged) + other_sum * __expf(other_max - merged);
    max = merged;
  }
}

// Rows are walked as (a, b, c) on the grid's (z, y, x) -- x in warps -- so no
// thread needs 64-bit divisions to find its row's mask; each loop strides by
// its grid extent, for any size. No __launch_bounds__: with it ptxas held
// sm_80 to 48 registers and spilled; without, 72 registers and no spills.
template <typename T, typename M>
__global__ void masked_softmax_fwd(const T* __restrict__ x, const M* __restrict__ mask, detail::SoftmaxRows layout,
                                   float scale, bool causal, T* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const std::int64_t n = layout.n, ms = layout.mask_stride[3];
  for (std::int64_t a = blockIdx.z; a < layout.d0; a += gridDim.z)
    for (std::int64_t b = blockIdx.y; b < layout.d1; b += gridDim.y)
      for (std::int64_t c = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < layout.d2;
           c += std::int64_t(gridDim.x) * kWarpsPerBlock) {
        const std::int64_t r = (a * layout.d1 + b) * layout.d2 + c;
        const T* xr = x + r * n;
        T* yr = y + r * n;
        const M* mr = mask ? mask + layout.mask_offset(a, b, c) : nullptr;
        const std::int64_t limit = causal ? min(n, c + 1) : n;  // later elements: excluded
        float max = -INFINITY, sum = 0.0f;
        for (std::int64_t j = lane; j < limit; j += 32) {
          const float z = to_float(xr[j]) * scale + (mr ? mask_term(mr[j * ms]) : 0.0f);
          if (z > max) {  // NaN never compares greater: it reaches the sum below instead
            sum = max == -INFINITY ? 0.0f : sum * __expf(max - z);
            max = z;
          }
          sum += z == -INFINITY ? 0.0f : __expf(z - max);
        }
        warp_merge(max, sum);
        // A row where nothing may be attended gives zeros, as the attention kernels do
        // (unless the row is all NaN: then sum is NaN and so is the output, as torch.softmax).
        const float inv = max == -INFINITY ? (sum == sum ? 0.0f : NAN) : 1.0f / sum;
        for (std::int64_t j = lane; j < n; j += 32) {
          float p = 0.0f;
          if (j < limit && inv != 0.0f) {
            const float z = to_float(xr[j]) * scale + (mr ? mask_term(mr[j * ms]) : 0.0f);
            p = __expf(z - max) * inv;
          }
          yr[j] = from_float<T>(p);
        }
      }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    masked_softmax_bwd(const T* dy, const T* y, std::int64_t rows, std::int64_t n, float scale, T* dx) {
  const int lane = threadIdx.x & 31;
  for (std::int64_t r = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; r < rows;
       r += std::int64_t(gridDim.x) * kWarpsPerBlock) {
    const T* dyr = dy + r * n;
    const T* yr = y + r * n;
    T* dxr = dx + r * n;  // may alias dyr: each lane reads its elements before writing them
    float dot = 0.0f;
    for (std::int64_t j = lane; j < n; j += 32) dot += to_float(dyr[j]) * to_float(yr[j]);
    dot = warp_sum(dot);
    for (std::int64_t j = lane; j < n; j += 32) {
      const float p = to_float(yr[j]);
      dxr[j] = from_float<T>(scale * p * (to_float(dyr[j]) - dot));
    }
  }
}

unsigned row_blocks(std::int64_t rows) {
  return unsigned(std::min<std::int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, std::int64_t(1) << 30));
}

}  // namespace

void masked_softmax_forward(const TensorView& x, const TensorView* mask, const MaskedSoftmaxConfig& config,
                            const TensorView& y, Stream s) {
  DeviceGuard guard(x.device);
  const detail::SoftmaxRows layout = detail::softmax_rows(x, mask);
  dispatch_float(x.dtype, [&](auto xt) {
    using T = decltype(xt);
    auto launch = [&](auto mt) {
      using M = decltype(mt);
      const dim3 grid(row_blocks(layout.d2), unsigned(std::min<std::int64_t>(layout.d1, 65535)),
                      unsigned(std::min<std::int64_t>(layout.d0, 65535)));
      masked_softmax_fwd<T, M><<<grid, kWarpsPerBlock * 32, 0, stream_of(s)>>>(
          x.data_as<const T>(), mask ? mask->data_as<const M>() : nullptr, layout, config.scale, config.causal,
          y.data_as<T>());
      ZF_CUDA_CHECK_LAUNCH("masked_softmax_fwd");
    };
    if (mask == nullptr || mask->dtype == DType::Bool) launch(std::uint8_t{});
    else if (mask->dtype == DType::Float32) launch(float{});
    else launch(T{});
  });
}

void masked_softmax_backward(const TensorView& dy, const TensorView& y, float scale, const TensorView& dx, Stream s) {
  DeviceGuard guard(y.device);
  const std::int64_t n = y.shape[y.ndim - 1], rows = y.numel() / n;
  dispatch_float(y.dtype, [&](auto t) {
    using T = decltype(t);
    masked_softmax_bwd<T><<<row_blocks(rows), kWarpsPerBlock * 32, 0, stream_of(s)>>>(
        dy.data_as<const T>(), y.data_as<const T>(), rows, n, scale, dx.data_as<T>());
    ZF_CUDA_CHECK_LAUNCH("masked_softmax_bwd");
  });
}

}  // namespace zerofuse::cuda

// CUDA gradient statistics: sum of squares and an inf/NaN flag in one read.
// Each block sums a fixed chunk in float32 and writes its partial; one block
// then adds the partials in order, in double. The chunking depends only on the
// tensor sizes, so the same input gives the same bits on every run.
#include <algorithm>

#include "common.cuh"
#include "common/cuda_kernels.h"

namespace zerofuse::cuda {
namespace {

constexpr int kMaxSegments = 64;
constexpr int kThreads = 256;
constexpr std::int64_t kChunk = std::int64_t(kThreads) * 4 * 16;

struct Segment {
  const void* data;
  std::int64_t n;
  int dtype;  // 0 float32, 1 float16, 2 bfloat16
  int vectorized;
};

struct Launch {
  Segment seg[kMaxSegments];
  std::int64_t first_block[kMaxSegments + 1];
  int count;
  std::int64_t partial_offset;  // where this launch's partials start
};

template <typename T>
__device__ void chunk_stats(const T* x, std::int64_t begin, std::int64_t end, bool vectorized, float& sum_sq,
                            float& poison) {
  std::int64_t from = begin;
  if (vectorized) {
    const std::int64_t vec_end = begin + (end - begin) / 4 * 4;
    for (std::int64_t i = begin + 4 * threadIdx.x; i < vec_end; i += 4 * kThreads) {
      float v[4];
      load4(x + i, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sum_sq += v[j] * v[j];
        poison += v[j] - v[j];  // 0 for finite values, NaN for inf/NaN
      }
    }
    from = vec_end;
  }
  for (std::int64_t i = from + threadIdx.x; i < end; i += kThreads) {
    const float v = to_float(x[i]);
    sum_sq += v * v;
    poison += v - v;
  }
}

__global__ void __launch_bounds__(kThreads) partial_stats(const __grid_constant__ Launch launch, float* partial_sum,
                                                          int* partial_bad) {
  const int lo = segment_of_block(launch.first_block, launch.count);
  const Segment& s = launch.seg[lo];
  const std::int64_t begin = (std::int64_t(blockIdx.x) - launch.first_block[lo]) * kChunk;
  const std::int64_t end = begin + kChunk < s.n ? begin + kChunk : s.n;
  float sum_sq = 0.0f, poison = 0.0f;
  if (s.dtype == 0)
    chunk_stats(static_cast<const float*>(s.data), begin, end, s.vectorized, sum_sq, poison);
  else if (s.dtype == 1)
    chunk_stats(static_cast<const __half*>(s.data), begin, end, s.vectorized, sum_sq, poison);
  else
    chunk_stats(static_cast<const __nv_bfloat16*>(s.data), begin, end, s.vectorized, sum_sq, poison);

  // Block reduction in a fixed order: warps, then the first warp.
  __shared__ float sums[kThreads / 32];
  __shared__ int bad[kThreads / 32];
  sum_sq = warp_sum(sum_sq);
  const int any_bad = __any_sync(0xffffffffu, isnan(poison));
  if (threadIdx.x % 32 == 0) {
    sums[threadIdx.x / 32] = sum_sq;
    bad[threadIdx.x / 32] = any_bad;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kThreads / 32 ? sums[threadIdx.x] : 0.0f;
    const int b = threadIdx.x < kThreads / 32 ? bad[threadIdx.x] : 0;
    v = warp_sum(v);
    const int any = __any_sync(0xffffffffu, b);
    if (threadIdx.x == 0) {
      partial_sum[launch.partial_offset + blockIdx.x] = v;
      partial_bad[launch.partial_offset + blockIdx.x] = any;
    }
  }
}

// One block: partials in a fixed order (each thread a strided set, then a tree), in double.
__global__ void finish_stats(const float* partial_sum, const int* partial_bad, std::int64_t count, float* out) {
  __shared__ double sums[kThreads];
  __shared__ int bad[kThreads];
  double s = 0.0;
  int b = 0;
  for (std::int64_t i = threadIdx.x; i < count; i += kThreads) {
    s += double(partial_sum[i]);
    b |= partial_bad[i];
  }
  sums[threadIdx.x] = s;
  bad[threadIdx.x] = b;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) {
      sums[threadIdx.x] += sums[threadIdx.x + stride];
      bad[threadIdx.x] |= bad[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = float(sums[0]);
    out[1] = bad[0] ? 1.0f : 0.0f;
  }
}

}  // namespace

void grad_stats(const std::vector<TensorView>& grads, const TensorView& out, Stream s) {
  DeviceGuard guard(out.device);
  const cudaStream_t stream = stream_of(s);
  std::int64_t total_blocks = 0;
  for (const TensorView& g : grads) total_blocks += (g.numel() + kChunk - 1) / kChunk;
  StreamBuffer sums(std::max<std::int64_t>(1, total_blocks) * sizeof(float), stream);
  StreamBuffer bads(std::max<std::int64_t>(1, total_blocks) * sizeof(int), stream);
  Launch launch{};
  std::int64_t done = 0;
  auto flush = [&] {
    const std::int64_t blocks = launch.count ? launch.first_block[launch.count] : 0;
    if (blocks > 0) {
      launch.partial_offset = done;
      partial_stats<<<unsigned(blocks), kThreads, 0, stream>>>(launch, sums.as<float>(), bads.as<int>());
      ZF_CUDA_CHECK_LAUNCH("partial_stats");
      done += blocks;
    }
    launch = Launch{};
  };
  for (const TensorView& g : grads) {
    if (g.numel() == 0) continue;
    if (launch.count == kMaxSegments) flush();
    Segment seg{g.data, g.numel(), g.dtype == DType::Float32 ? 0 : g.dtype == DType::Float16 ? 1 : 2,
                aligned(g.data, 16)};
    launch.seg[launch.count] = seg;
    launch.first_block[launch.count + 1] = launch.first_block[launch.count] + (seg.n + kChunk - 1) / kChunk;
    launch.count += 1;
  }
  flush();
  finish_stats<<<1, kThreads, 0, stream>>>(sums.as<float>(), bads.as<int>(), done, out.data_as<float>());
  ZF_CUDA_CHECK_LAUNCH("finish_stats");
}

}  // namespace zerofuse::cuda

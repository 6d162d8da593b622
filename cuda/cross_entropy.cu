// CUDA softmax cross-entropy: one block per row. Forward: each thread keeps an
// online (max, sum of exp) over its strided logits, and the block merges the
// pairs -- one read of the row. Backward: one read and one write per logit; the
// write may go over the logits themselves (each element is read by the thread
// that then writes it).
#include <cmath>

#include "common.cuh"
#include "common/cuda_kernels.h"

namespace zerofuse::cuda {
namespace {

constexpr int kThreads = 512;

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_forward(const T* logits, const std::int64_t* target, std::int64_t v, std::int64_t ignore_index,
               float smoothing, std::int64_t vocab_start, std::int64_t vocab_total, float* loss, float* lse) {
  const std::int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  MaxSum acc{-INFINITY, 0.0f};
  float total = 0.0f;
  for (std::int64_t j = threadIdx.x; j < v; j += kThreads) {
    const float xj = to_float(x[j]);
    total += xj;
    if (xj > acc.m) {
      acc.s = acc.s * __expf(acc.m - xj) + 1.0f;
      acc.m = xj;
    } else {
      acc.s += __expf(xj - acc.m);
    }
  }
  // Block merge in a fixed order: within warps, then across them.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)};
    acc = merge(acc, other);
    total += __shfl_xor_sync(0xffffffffu, total, o);
  }
  __shared__ MaxSum warps[kThreads / 32];
  __shared__ float totals[kThreads / 32];
  if (threadIdx.x % 32 == 0) {
    warps[threadIdx.x / 32] = acc;
    totals[threadIdx.x / 32] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum r = warps[0];
    float t = totals[0];
    for (int w = 1; w < kThreads / 32; ++w) {
      r = merge(r, warps[w]);
      t += totals[w];
    }
    const float row_lse = r.m + logf(r.s);
    lse[row] = row_lse;
    const std::int64_t tr = target[row];
    const bool slice = vocab_total > 0;  // tensor parallelism: see cross_entropy.h
    const std::int64_t classes = slice ? vocab_total : v, lt = tr - vocab_start;
    if (tr == ignore_index) {
      loss[row] = 0.0f;
    } else if (tr < 0 || tr >= classes) {
      loss[row] = NAN;  // an invalid target: the Python op also queues a device-side assertion
    } else {
      const float target_term = (lt >= 0 && lt < v) ? (1.0f - smoothing) * to_float(x[lt]) : 0.0f;
      loss[row] = (slice ? 0.0f : row_lse) - target_term - smoothing * t / float(classes);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_backward(const T* logits, const std::int64_t* target, const float* lse, const float* grad, bool per_row,
                std::int64_t v, std::int64_t ignore_index, float smoothing, std::int64_t vocab_start,
                std::int64_t vocab_total, T* dlogits) {
  const std::int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  T* dx = dlogits + row * v;
  const std::int64_t tr = target[row];
  const std::int64_t classes = vocab_total > 0 ? vocab_total : v, lt = tr - vocab_start;
  const bool ignored = tr == ignore_index || tr < 0 || tr >= classes;
  const float g = per_row ? grad[row] : grad[0];
  const float row_lse = lse[row], uniform = smoothing / float(classes);
  for (std::int64_t j = threadIdx.x; j < v; j += kThreads) {
    const float p = __expf(to_float(x[j]) - row_lse);
    const float value = ignored ? 0.0f : g * (p - uniform - (j == lt ? 1.0f - smoothing : 0.0f));
    dx[j] = from_float<T>(value);
  }
}

}  // namespace

void cross_entropy_forward(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& config,
                           const TensorView& loss, const TensorView& lse, Stream s) {
  DeviceGuard guard(logits.device);
  const std::int64_t n = logits.shape[0], v = logits.shape[1];
  if (n == 0) return;
  dispatch_float(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    ce_forward<T><<<unsigned(n), kThreads, 0, stream_of(s)>>>(logits.data_as<const T>(),
                                                              target.data_as<const std::int64_t>(), v,
                                                              config.ignore_index, float(config.label_smoothing),
                                                              config.vocab_start, config.vocab_total,
                                                              loss.data_as<float>(), lse.data_as<float>());
    ZF_CUDA_CHECK_LAUNCH("ce_forward");
  });
}

void cross_entropy_backward(const TensorView& logits, const TensorView& target, const TensorView& lse,
                            const TensorView& grad, const CrossEntropyConfig& config, const TensorView& dlogits,
                            Stream s) {
  DeviceGuard guard(logits.device);
  const std::int64_t n = logits.shape[0], v = logits.shape[1];
  if (n == 0) return;
  dispatch_float(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    ce_backward<T><<<unsigned(n), kThreads, 0, stream_of(s)>>>(
        logits.data_as<const T>(), target.data_as<const std::int64_t>(), lse.data_as<const float>(),
        grad.data_as<const float>(), grad.numel() == n && n != 1, v, config.ignore_index,
        float(config.label_smoothing), config.vocab_start, config.vocab_total, dlogits.data_as<T>());
    ZF_CUDA_CHECK_LAUNCH("ce_backward");
  });
}

}  // namespace zerofuse::cuda

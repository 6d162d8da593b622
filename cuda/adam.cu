// CUDA Adam/AdamW: one pass over param, grad, exp_avg, exp_avg_sq (and the
// optional low-precision param copy), for any number of tensors.
//
// Tensors are grouped into launches of up to kMaxSegments; each tensor is cut
// into chunks of kChunk elements, one thread block per chunk, and a block finds
// its tensor by binary search over the launch's block offsets. Where every
// pointer of a tensor is 16-byte aligned, threads move 4 elements per access
// (float4 / 8-byte halves); the rest goes one element at a time.
//
// The step can be decided on the device: a non-zero *skip makes every block
// return before reading anything, *grad_multiplier scales the gradient, and
// *step (float64) gives the count for the bias corrections and *lr (float64)
// the learning rate. So a whole fp16 step -- statistics, decision, update --
// needs no host round trip and can be captured in a CUDA graph, with the
// schedule writing the next learning rate into *lr between replays.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "common/adam_math.h"
#include "common/cuda_kernels.h"

namespace zerofuse::cuda {
namespace {

constexpr int kMaxSegments = 48;
constexpr int kThreads = 512;
constexpr std::int64_t kChunk = kThreads * 4 * 8;  // 8 vector iterations per thread

struct Segment {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* copy;
  std::int64_t n;
  int vectorized;
};

struct Launch {
  Segment seg[kMaxSegments];
  std::int64_t first_block[kMaxSegments + 1];
  int count;
};

// What the kernel takes by value; the per-step coefficients are formed from it
// on the device (common/adam_math.h), where the step count and lr may live.
struct Hyper {
  detail::AdamConstants constants;
  float host_multiplier;  // inv_scale * clip_coef
  double beta1, beta2, lr, weight_decay;
  double host_step;
  bool adam_w_mode, bias_correction;
};

__device__ detail::AdamStepCoefficients step_coefficients(const Hyper& h, const double* step_tensor,
                                                          const double* lr_tensor) {
  return detail::adam_step_coefficients(lr_tensor ? *lr_tensor : h.lr, step_tensor ? *step_tensor : h.host_step,
                                        h.beta1, h.beta2, h.weight_decay, h.adam_w_mode, h.bias_correction);
}

struct NoCopy {};

template <typename P, typename G, typename S, typename C>
__global__ void __launch_bounds__(kThreads) adam_kernel(const __grid_constant__ Launch launch, Hyper h,
                                                        const float* grad_multiplier, const float* skip,
                                                        const double* step_tensor, const double* lr_tensor) {
  if (skip != nullptr && *skip != 0.0f) return;
  __shared__ detail::AdamStepCoefficients shared_k;
  if (threadIdx.x == 0) shared_k = step_coefficients(h, step_tensor, lr_tensor);
  __syncthreads();
  const detail::AdamStepCoefficients k = shared_k;
  const float multiplier = h.host_multiplier * (grad_multiplier ? *grad_multiplier : 1.0f);

  const int lo = segment_of_block(launch.first_block, launch.count);
  const Segment& s = launch.seg[lo];
  const std::int64_t begin = (std::int64_t(blockIdx.x) - launch.first_block[lo]) * kChunk;
  const std::int64_t end = begin + kChunk < s.n ? begin + kChunk : s.n;
  P* param = static_cast<P*>(s.param);
  const G* grad = static_cast<const G*>(s.grad);
  S* m1 = static_cast<S*>(s.exp_avg);
  S* m2 = static_cast<S*>(s.exp_avg_sq);
  C* copy = static_cast<C*>(s.copy);

  std::int64_t scalar_from = begin;
  if (s.vectorized) {
    const std::int64_t vec_end = begin + (end - begin) / 4 * 4;
    for (std::int64_t i = begin + 4 * threadIdx.x; i < vec_end; i += 4 * kThreads) {
      float p[4], g[4], m[4], v[4];
      load4(param + i, p);
      load4(grad + i, g);
      load4(m1 + i, m);
      load4(m2 + i, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) detail::adam_update(p[j], g[j], m[j], v[j], multiplier, h.constants, k);
      store4(param + i, p);
      store4(m1 + i, m);
      store4(m2 + i, v);
      if constexpr (!std::is_same_v<C, NoCopy>) store4(copy + i, p);
    }
    scalar_from = vec_end;
  }
  for (std::int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    float p = to_float(param[i]), m = to_float(m1[i]), v = to_float(m2[i]);
    detail::adam_update(p, to_float(grad[i]), m, v, multiplier, h.constants, k);
    param[i] = from_float<P>(p);
    m1[i] = from_float<S>(m);
    m2[i] = from_float<S>(v);
    if constexpr (!std::is_same_v<C, NoCopy>) copy[i] = from_float<C>(p);
  }
}

Hyper hyper(const AdamConfig& c) {
  Hyper h;
  h.constants = detail::adam_constants(c);
  h.host_multiplier = float(c.inv_scale * c.clip_coef);
  h.beta1 = c.beta1;
  h.beta2 = c.beta2;
  h.lr = c.lr;
  h.weight_decay = c.weight_decay;
  h.host_step = double(c.step);
  h.adam_w_mode = c.adam_w_mode;
  h.bias_correction = c.bias_correction;
  return h;
}

template <typename P, typename G, typename S, typename C>
void run_typed(const AdamTensorLists& t, const AdamConfig& config, cudaStream_t stream) {
  const Hyper h = hyper(config);
  const float* multiplier = static_cast<const float*>(config.grad_multiplier.data);
  const float* skip = static_cast<const float*>(config.skip_if_nonzero.data);
  const double* step = static_cast<const double*>(config.step_tensor.data);
  const double* lr = static_cast<const double*>(config.lr_tensor.data);
  const bool with_copy = !t.param_copies.empty();
  Launch launch{};
  auto flush = [&] {
    if (launch.count == 0) return;
    const std::int64_t blocks = launch.first_block[launch.count];
    if (blocks > 0) {
      adam_kernel<P, G, S, C><<<unsigned(blocks), kThreads, 0, stream>>>(launch, h, multiplier, skip, step, lr);
      ZF_CUDA_CHECK_LAUNCH("adam_kernel");
    }
    launch = Launch{};
  };
  for (std::size_t i = 0; i < t.params.size(); ++i) {
    Segment s{t.params[i].data, t.grads[i].data, t.exp_avgs[i].data, t.exp_avg_sqs[i].data,
              with_copy ? t.param_copies[i].data : nullptr, t.params[i].numel(), 0};
    if (s.n == 0) continue;
    s.vectorized = aligned(s.param, 16) && aligned(s.grad, 16) && aligned(s.exp_avg, 16) &&
                   aligned(s.exp_avg_sq, 16) && (s.copy == nullptr || aligned(s.copy, 16));
    // A tensor too large for one launch's grid is split (2^31 - 1 blocks).
    for (std::int64_t offset = 0; offset < s.n;) {
      const std::int64_t piece = std::min<std::int64_t>(s.n - offset, kChunk * 1'000'000);
      const auto at = [offset](const TensorView& v) {
        return static_cast<void*>(static_cast<char*>(v.data) + offset * std::int64_t(v.element_size()));
      };
      Segment part = s;
      part.param = at(t.params[i]);
      part.grad = at(t.grads[i]);
      part.exp_avg = at(t.exp_avgs[i]);
      part.exp_avg_sq = at(t.exp_avg_sqs[i]);
      part.copy = with_copy ? at(t.param_copies[i]) : nullptr;
      part.n = piece;
      if (launch.count == kMaxSegments) flush();
      launch.seg[launch.count] = part;
      launch.first_block[launch.count + 1] = launch.first_block[launch.count] + (piece + kChunk - 1) / kChunk;
      launch.count += 1;
      offset += piece;
    }
  }
  flush();
}

}  // namespace

void adam_step_multi(const AdamTensorLists& t, const AdamConfig& config, Stream s) {
  if (t.params.empty()) return;
  DeviceGuard guard(t.params[0].device);
  const cudaStream_t stream = stream_of(s);
  const DType param_dtype = t.params[0].dtype;
  const DType grad_dtype = t.grads[0].dtype;
  const DType state_dtype = t.exp_avgs[0].dtype;
  if (param_dtype == DType::Float32) {
    dispatch_float(grad_dtype, [&](auto g) {
      using G = decltype(g);
      if (t.param_copies.empty()) {
        run_typed<float, G, float, NoCopy>(t, config, stream);
      } else {
        dispatch_float(t.param_copies[0].dtype, [&](auto c) {
          using C = decltype(c);
          if constexpr (!std::is_same_v<C, float>) run_typed<float, G, float, C>(t, config, stream);
        });
      }
    });
    return;
  }
  dispatch_float(param_dtype, [&](auto p) {
    using P = decltype(p);
    if constexpr (!std::is_same_v<P, float>) {
      if (state_dtype == DType::Float32)
        run_typed<P, P, float, NoCopy>(t, config, stream);
      else
        run_typed<P, P, P, NoCopy>(t, config, stream);
    }
  });
}

}  // namespace zerofuse::cuda

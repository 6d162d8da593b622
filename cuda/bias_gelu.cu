// CUDA bias + GELU. Forward: elementwise. Backward: each block takes a slab of
// rows and 256 columns (one per thread), writes dx and keeps the column sums
// in registers -- one pass -- and a second kernel adds the slabs' partial
// sums in slab order for dbias (no atomics: the same bits every run).
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "common/cuda_kernels.h"
#include "slab_sums.cuh"

namespace zerofuse::cuda {
namespace {

constexpr int kColumns = 256;
constexpr int kTargetSlabs = 256;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

__device__ __forceinline__ float gelu(float u, bool tanh_form) {
  if (tanh_form) return 0.5f * u * (1.0f + tanhf(kSqrt2OverPi * (u + 0.044715f * u * u * u)));
  return 0.5f * u * (1.0f + erff(u * kInvSqrt2));
}

__device__ __forceinline__ float gelu_grad(float u, bool tanh_form) {
  if (tanh_form) {
    const float z = kSqrt2OverPi * (u + 0.044715f * u * u * u);
    const float e = __expf(-2.0f * fabsf(z));  // 1 - tanh^2, accurate where tanh is near +-1
    const float sech2 = 4.0f * e / ((1.0f + e) * (1.0f + e));
    return 0.5f * (1.0f + tanhf(z)) + 0.5f * u * sech2 * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * u * u);
  }
  return 0.5f * (1.0f + erff(u * kInvSqrt2)) + u * kInvSqrt2Pi * __expf(-0.5f * u * u);
}

template <typename T, typename B>
__global__ void bias_gelu_fwd(const T* x, const B* b, T* y, std::int64_t n, int d, bool tanh_form) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    y[i] = from_float<T>(gelu(to_float(x[i]) + to_float(b[i % d]), tanh_form));
}

template <typename T, typename B>
__global__ void __launch_bounds__(kColumns)
    bias_gelu_bwd(const T* dy, const T* x, const B* b, T* dx, float* partial, std::int64_t rows, int d,
                  std::int64_t slab_rows, bool tanh_form) {
  const int c = blockIdx.y * kColumns + threadIdx.x;
  if (c >= d) return;
  const std::int64_t r0 = std::int64_t(blockIdx.x) * slab_rows;
  const std::int64_t r1 = r0 + slab_rows < rows ? r0 + slab_rows : rows;
  const float bias = to_float(b[c]);
  float acc = 0.0f;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int64_t i = r * d + c;
    const T g = from_float<T>(to_float(dy[i]) * gelu_grad(to_float(x[i]) + bias, tanh_form));
    dx[i] = g;
    acc += to_float(g);  // dbias = the sum of dx as returned
  }
  if (partial) partial[std::int64_t(blockIdx.x) * d + c] = acc;
}

}  // namespace

void bias_gelu_forward(const TensorView& x, const TensorView& bias, GeluApproximation approximate,
                       const TensorView& y, Stream s) {
  DeviceGuard guard(x.device);
  const std::int64_t n = x.numel();
  if (n == 0) return;
  const int d = int(x.shape[x.ndim - 1]);
  const unsigned blocks = unsigned(std::min<std::int64_t>((n + 255) / 256, 65535 * 8));
  dispatch_float(x.dtype, [&](auto xt) {
    dispatch_float(bias.dtype, [&](auto bt) {
      using T = decltype(xt);
      using B = decltype(bt);
      bias_gelu_fwd<T, B><<<blocks, 256, 0, stream_of(s)>>>(x.data_as<const T>(), bias.data_as<const B>(),
                                                            y.data_as<T>(), n, d,
                                                            approximate == GeluApproximation::Tanh);
      ZF_CUDA_CHECK_LAUNCH("bias_gelu_fwd");
    });
  });
}

void bias_gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& bias,
                        GeluApproximation approximate, const TensorView& dx, const TensorView* dbias, Stream s) {
  DeviceGuard guard(x.device);
  const cudaStream_t stream = stream_of(s);
  const int d = int(x.shape[x.ndim - 1]);
  const std::int64_t rows = x.numel() / d;
  const std::int64_t slab_rows = std::max<std::int64_t>(1, (rows + kTargetSlabs - 1) / kTargetSlabs);
  const int slabs = int(std::max<std::int64_t>(1, (rows + slab_rows - 1) / slab_rows));
  StreamBuffer partial(std::size_t(slabs) * d * sizeof(float), stream);
  if (rows == 0) ZF_CUDA_CHECK(cudaMemsetAsync(partial.as<float>(), 0, std::size_t(slabs) * d * sizeof(float), stream));
  dispatch_float(x.dtype, [&](auto xt) {
    dispatch_float(bias.dtype, [&](auto bt) {
      using T = decltype(xt);
      using B = decltype(bt);
      if (rows > 0) {
        const dim3 grid(unsigned(slabs), unsigned((d + kColumns - 1) / kColumns));
        bias_gelu_bwd<T, B><<<grid, kColumns, 0, stream>>>(dy.data_as<const T>(), x.data_as<const T>(),
                                                           bias.data_as<const B>(), dx.data_as<T>(),
                                                           dbias ? partial.as<float>() : nullptr, rows, d, slab_rows,
                                                           approximate == GeluApproximation::Tanh);
        ZF_CUDA_CHECK_LAUNCH("bias_gelu_bwd");
      }
      if (dbias) {
        sum_slabs(partial.as<float>(), slabs, d, dbias->data_as<B>(), stream);
      }
    });
  });
}

}  // namespace zerofuse::cuda

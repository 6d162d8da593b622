// CPU bias + GELU: y = gelu(x + b), dx = dy * gelu'(x + b), dbias = sum of dx
// over rows (per-thread partials added in thread order, in double).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/fast_math.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

template <bool Tanh>
inline float gelu(float u) {
  if constexpr (Tanh) return 0.5f * u * (1.0f + tanh_approx(kSqrt2OverPi * (u + 0.044715f * u * u * u)));
  return 0.5f * u * (1.0f + std::erf(u * kInvSqrt2));
}

template <bool Tanh>
inline float gelu_grad(float u) {
  if constexpr (Tanh) {
    const float z = kSqrt2OverPi * (u + 0.044715f * u * u * u);
    // tanh and 1 - tanh^2 from one e = e^-2|z| and one division:
    // tanh|z| = (1 - e) / (1 + e), sech^2 = 4e / (1 + e)^2 (accurate where tanh
    // is near +-1). Two divisions made this loop wait on the divider.
    const float e = exp_approx(-2.0f * std::fabs(z));
    const float r = 1.0f / (1.0f + e);
    const float t = std::copysign((1.0f - e) * r, z);
    const float sech2 = 4.0f * e * r * r;
    return 0.5f * (1.0f + t) + 0.5f * u * sech2 * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * u * u);
  }
  return 0.5f * (1.0f + std::erf(u * kInvSqrt2)) + u * kInvSqrt2Pi * exp_approx(-0.5f * u * u);
}

// float16 rows go through float row buffers converted by to_float_row /
// from_float_row (AVX2/F16C): converting element by element does not
// vectorise and made float16 5.8x slower than bfloat16. Other types are
// converted inline.
template <typename T>
constexpr bool kRowBuffers = std::is_same_v<T, Half>;

template <typename T, typename B, bool Tanh>
void forward_typed(const TensorView& xv, const TensorView& bv, const TensorView& yv) {
  const std::int64_t d = xv.shape[xv.ndim - 1], rows = xv.numel() / d;
  const T* x = xv.data_as<const T>();
  const B* b = bv.data_as<const B>();
  T* y = yv.data_as<T>();
  detail::parallel_for(rows, std::max<std::int64_t>(1, 8192 / d), [&](std::int64_t r0, std::int64_t r1, int) {
    const std::vector<float> bias = vector_as(b, d, 0.0f);
    std::vector<float> buffer(kRowBuffers<T> ? std::size_t(d) : 0);
    const float* __restrict bf = bias.data();
    float* __restrict buf = buffer.data();
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * d;
      T* __restrict yr = y + r * d;
      if constexpr (kRowBuffers<T>) {
        to_float_row(xr, buf, d);
#pragma omp simd
        for (std::int64_t j = 0; j < d; ++j) buf[j] = gelu<Tanh>(buf[j] + bf[j]);
        from_float_row(buf, yr, d);
      } else {
#pragma omp simd
        for (std::int64_t j = 0; j < d; ++j) yr[j] = from_float<T>(gelu<Tanh>(to_float(xr[j]) + bf[j]));
      }
    }
  });
}

template <typename T, typename B, bool Tanh>
void backward_typed(const TensorView& dyv, const TensorView& xv, const TensorView& bv, const TensorView& dxv,
                    const TensorView* dbv) {
  const std::int64_t d = xv.shape[xv.ndim - 1], rows = xv.numel() / d;
  const T* x = xv.data_as<const T>();
  const T* dy = dyv.data_as<const T>();
  const B* b = bv.data_as<const B>();
  T* dx = dxv.data_as<T>();
  const std::int64_t min_rows = std::max<std::int64_t>(1, 8192 / d);
  const int ranges = detail::parallel_ranges(rows, min_rows);
  std::vector<double> partial(dbv ? std::size_t(ranges) * d : 0, 0.0);
  detail::parallel_for(rows, min_rows, [&](std::int64_t r0, std::int64_t r1, int range) {
    const std::vector<float> bias = vector_as(b, d, 0.0f);
    std::vector<float> column(dbv ? std::size_t(d) : 0, 0.0f);
    std::vector<float> dy_buffer(kRowBuffers<T> ? std::size_t(d) : 0), x_buffer(dy_buffer.size());
    const float* __restrict bf = bias.data();
    float* __restrict col = column.data();
    float* __restrict dyb = dy_buffer.data();
    float* __restrict xb = x_buffer.data();
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * d;
      const T* __restrict dyr = dy + r * d;
      T* __restrict dxr = dx + r * d;
      if constexpr (kRowBuffers<T>) {
        to_float_row(dyr, dyb, d);
        to_float_row(xr, xb, d);
#pragma omp simd
        for (std::int64_t j = 0; j < d; ++j) dyb[j] *= gelu_grad<Tanh>(xb[j] + bf[j]);
        from_float_row(dyb, dxr, d);
        if (dbv) to_float_row(dxr, dyb, d);  // dbias sums dx as returned (rounded)
      } else {
#pragma omp simd
        for (std::int64_t j = 0; j < d; ++j)
          dxr[j] = from_float<T>(to_float(dyr[j]) * gelu_grad<Tanh>(to_float(xr[j]) + bf[j]));
      }
      if (dbv) {  // dbias = the sum of dx as returned
        if constexpr (kRowBuffers<T>)
          for (std::int64_t j = 0; j < d; ++j) col[j] += dyb[j];
        else
          for (std::int64_t j = 0; j < d; ++j) col[j] += to_float(dxr[j]);
      }
      if (dbv && (r - r0) % 32 == 31)  // fold into double every 32 rows
        for (std::int64_t j = 0; j < d; ++j) partial[std::size_t(range) * d + j] += col[j], col[j] = 0.0f;
    }
    for (std::int64_t j = 0; dbv && j < d; ++j) partial[std::size_t(range) * d + j] += col[j];
  });
  if (dbv) {
    B* db = dbv->data_as<B>();
    for (std::int64_t j = 0; j < d; ++j) {
      double total = 0.0;
      for (int r = 0; r < ranges; ++r) total += partial[std::size_t(r) * d + j];
      db[j] = from_float<B>(float(total));
    }
  }
}

}  // namespace

void bias_gelu_forward(const TensorView& x, const TensorView& bias, GeluApproximation approx, const TensorView& y) {
  dispatch_float(x.dtype, [&](auto xt) {
    dispatch_float(bias.dtype, [&](auto bt) {
      if (approx == GeluApproximation::Tanh)
        forward_typed<decltype(xt), decltype(bt), true>(x, bias, y);
      else
        forward_typed<decltype(xt), decltype(bt), false>(x, bias, y);
    });
  });
}

void bias_gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& bias, GeluApproximation approx,
                        const TensorView& dx, const TensorView* dbias) {
  dispatch_float(x.dtype, [&](auto xt) {
    dispatch_float(bias.dtype, [&](auto bt) {
      if (approx == GeluApproximation::Tanh)
        backward_typed<decltype(xt), decltype(bt), true>(dy, x, bias, dx, dbias);
      else
        backward_typed<decltype(xt), decltype(bt), false>(dy, x, bias, dx, dbias);
    });
  });
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA

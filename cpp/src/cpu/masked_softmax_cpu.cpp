// CPU scaled, masked softmax: each row is scaled and masked into a float
// scratch row, then max, exp and sum, then written normalised -- one read of
// x and of the mask, one write of y. The backward is the softmax Jacobian
// applied row by row: dx = scale * y * (dy - <dy, y>).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/fast_math.h"
#include "cpu/kernels.h"
#include "parallel.h"
#include "common/softmax_rows.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

template <typename C, typename M>
inline C mask_term(M m) {
  if constexpr (std::is_same_v<M, std::uint8_t>)  // bool: excluded where false
    return m ? C(0) : -std::numeric_limits<C>::infinity();
  else
    return C(to_float(m));
}

// float16 rows are converted with to_float_row / from_float_row (AVX2/F16C):
// converting element by element does not vectorise (1.7x slower than bfloat16).
template <typename T>
constexpr bool kRowConvert = std::is_same_v<T, Half>;

template <typename T, typename M>
void forward_typed(const TensorView& xv, const TensorView* maskv, const MaskedSoftmaxConfig& config,
                   const TensorView& yv) {
  using C = compute_t<T>;
  const detail::SoftmaxRows layout = detail::softmax_rows(xv, maskv);
  const std::int64_t n = layout.n;
  const T* x = xv.data_as<const T>();
  const M* mask = maskv ? maskv->data_as<const M>() : nullptr;
  T* y = yv.data_as<T>();
  const C scale = C(config.scale);
  const C neg_inf = -std::numeric_limits<C>::infinity();
  detail::parallel_for(layout.rows, std::max<std::int64_t>(1, 4096 / n), [&](std::int64_t r0, std::int64_t r1, int) {
    std::vector<C> scratch(static_cast<std::size_t>(n));
    C* __restrict z = scratch.data();
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * n;
      T* __restrict yr = y + r * n;
      // Elements past `limit` are causally excluded: never read, written as 0.
      const std::int64_t limit = config.causal ? std::min(n, layout.query_of(r) + 1) : n;
      if constexpr (kRowConvert<T>) to_float_row(xr, z, limit);
      auto x_at = [&](std::int64_t j) -> C {
        if constexpr (kRowConvert<T>) return z[j];
        else return C(to_float(xr[j]));
      };
      if (mask) {
        const M* mr = mask + layout.mask_row_offset(r);
        const std::int64_t ms = layout.mask_stride[3];
        if (ms == 1) {
#pragma omp simd
          for (std::int64_t j = 0; j < limit; ++j) z[j] = x_at(j) * scale + mask_term<C>(mr[j]);
        } else {
          for (std::int64_t j = 0; j < limit; ++j) z[j] = x_at(j) * scale + mask_term<C>(mr[j * ms]);
        }
      } else {
#pragma omp simd
        for (std::int64_t j = 0; j < limit; ++j) z[j] = x_at(j) * scale;
      }
      const C max = max_of(z, limit);
      if (max == neg_inf) {  // nothing may be attended: zeros, as the attention kernels give
        const bool has_nan = std::any_of(z, z + limit, [](C v) { return v != v; });
        std::fill(yr, yr + n, store_as<T>(has_nan ? std::numeric_limits<C>::quiet_NaN() : C(0)));
        continue;
      }
      C sum = 0;
#pragma omp simd reduction(+ : sum)
      for (std::int64_t j = 0; j < limit; ++j) {
        z[j] = exp_approx(z[j] - max);
        sum += z[j];
      }
      // A NaN anywhere in the row makes sum NaN, and so the whole row, as torch.softmax.
      const C inv = C(1) / sum;
      if constexpr (kRowConvert<T>) {
#pragma omp simd
        for (std::int64_t j = 0; j < limit; ++j) z[j] *= inv;
        from_float_row(z, yr, limit);
      } else {
#pragma omp simd
        for (std::int64_t j = 0; j < limit; ++j) yr[j] = store_as<T>(z[j] * inv);
      }
      std::fill(yr + limit, yr + n, store_as<T>(C(0)));
    }
  });
}

template <typename T>
void backward_typed(const TensorView& dyv, const TensorView& yv, float scale_f, const TensorView& dxv) {
  using C = compute_t<T>;
  const std::int64_t n = yv.shape[yv.ndim - 1], rows = yv.numel() / n;
  const T* dy = dyv.data_as<const T>();
  const T* y = yv.data_as<const T>();
  T* dx = dxv.data_as<T>();  // may alias dy: each element is read before it is written
  const C scale = C(scale_f);
  detail::parallel_for(rows, std::max<std::int64_t>(1, 4096 / n), [&](std::int64_t r0, std::int64_t r1, int) {
    std::vector<C> dy_buffer(kRowConvert<T> ? std::size_t(n) : 0), y_buffer(dy_buffer.size());
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* dyr = dy + r * n;
      const T* yr = y + r * n;
      T* dxr = dx + r * n;
      // float16 rows are read into float first (so dx may overwrite dy there
      // too); the others element by element, each read before it is written.
      C* __restrict dyb = dy_buffer.data();
      C* __restrict yb = y_buffer.data();
      if constexpr (kRowConvert<T>) {
        to_float_row(dyr, dyb, n);
        to_float_row(yr, yb, n);
      }
      auto dy_at = [&](std::int64_t j) -> C {
        if constexpr (kRowConvert<T>) return dyb[j];
        else return C(to_float(dyr[j]));
      };
      auto y_at = [&](std::int64_t j) -> C {
        if constexpr (kRowConvert<T>) return yb[j];
        else return C(to_float(yr[j]));
      };
      C dot = 0;
#pragma omp simd reduction(+ : dot)
      for (std::int64_t j = 0; j < n; ++j) dot += dy_at(j) * y_at(j);
      if constexpr (kRowConvert<T>) {
#pragma omp simd
        for (std::int64_t j = 0; j < n; ++j) dyb[j] = scale * yb[j] * (dyb[j] - dot);
        from_float_row(dyb, dxr, n);
      } else {
#pragma omp simd
        for (std::int64_t j = 0; j < n; ++j) dxr[j] = store_as<T>(scale * y_at(j) * (dy_at(j) - dot));
      }
    }
  });
}

// Calls fn(M{}) with M the element type of the mask.
template <typename T, typename Fn>
void dispatch_mask(const TensorView* mask, Fn&& fn) {
  if (mask == nullptr || mask->dtype == DType::Bool) return fn(std::uint8_t{});
  if (mask->dtype == DType::Float32) return fn(float{});
  if (mask->dtype == DType::Float64) return fn(double{});
  return fn(T{});  // the input's own dtype
}

}  // namespace

void masked_softmax_forward(const TensorView& x, const TensorView* mask, const MaskedSoftmaxConfig& config,
                            const TensorView& y) {
  dispatch_float_or_double(x.dtype, [&](auto xt) {
    using T = decltype(xt);
    dispatch_mask<T>(mask, [&](auto mt) { forward_typed<T, decltype(mt)>(x, mask, config, y); });
  });
}

void masked_softmax_backward(const TensorView& dy, const TensorView& y, float scale, const TensorView& dx) {
  dispatch_float_or_double(y.dtype, [&](auto t) { backward_typed<decltype(t)>(dy, y, scale, dx); });
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA

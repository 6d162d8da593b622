// CPU LayerNorm. Threads take contiguous blocks of rows. Statistics are
// two-pass (mean, then the sum of squared deviations) in float32 (float64 for
// float64 data), exact enough for any hidden size that fits in cache. The
// backward keeps per-thread dweight/dbias partials for a few rows at a time and
// folds them into double, so long columns do not lose precision.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

constexpr std::int64_t kRowsPerFold = 32;

// Rows of 16-bit data converted to float once, into a per-thread row buffer,
// by to_float_row's vector instructions, rather than element by element in
// each pass: float16's per-element conversion does not vectorise (the forward
// was 7x slower than torch's, the backward 3x). The forward does this for
// bfloat16 too (1.15x faster than converting in each of its three passes);
// the backward converts bfloat16 inline, a vectorised shift, which measured
// 1.3x faster than its extra buffer passes.
template <typename T>
constexpr bool kConvertRowsForward = !std::is_same_v<T, compute_t<T>>;
template <typename T>
constexpr bool kConvertRowsBackward = std::is_same_v<T, Half>;

// Sums of a row kept in kPartials independent lanes: a single vector
// accumulator would make every add wait for the previous one (a 3-4 cycle
// chain per 8 elements), which bounded the forward at ~1,200 cycles a row.
constexpr int kPartials = 32;

template <typename A, typename F>
inline __attribute__((always_inline)) A lane_sum(std::int64_t d, F&& term) {
  A part[kPartials] = {};
  std::int64_t j = 0;
  for (; j + kPartials <= d; j += kPartials)
#pragma omp simd
    for (int l = 0; l < kPartials; ++l) part[l] += term(j + l);
  for (; j < d; ++j) part[0] += term(j);
  A total = 0;
  for (int l = 0; l < kPartials; ++l) total += part[l];
  return total;
}

template <typename T, typename A = compute_t<T>>
inline __attribute__((always_inline)) void row_stats(const T* __restrict x, std::int64_t d, A eps, A& mean, A& rstd) {
  const A mu = lane_sum<A>(d, [&](std::int64_t j) { return A(to_float(x[j])); }) / A(d);
  const A sq = lane_sum<A>(d, [&](std::int64_t j) {
    const A c = to_float(x[j]) - mu;
    return c * c;
  });
  mean = mu;
  rstd = A(1) / std::sqrt(sq / A(d) + eps);
}

// With a residual, the row normalised is sum = x + residual, rounded to T and
// written out first (it is what the backward gets as its input).
template <typename T, typename W>
void forward_typed(const TensorView& xv, const TensorView* rv, const TensorView* wv, const TensorView* bv,
                   float eps, const TensorView* sv, const TensorView& yv, const TensorView& meanv,
                   const TensorView& rstdv) {
  using A = compute_t<T>;
  const std::int64_t d = xv.shape[xv.ndim - 1], rows = xv.numel() / d;
  const T* x = xv.data_as<const T>();
  const T* residual = rv ? rv->data_as<const T>() : nullptr;
  T* sum_out = sv ? sv->data_as<T>() : nullptr;
  T* y = yv.data_as<T>();
  const W* w = wv ? wv->data_as<const W>() : nullptr;
  const W* b = bv ? bv->data_as<const W>() : nullptr;
  A* mean_out = meanv.data_as<A>();  // statistics are float32, float64 for float64 data
  A* rstd_out = rstdv.data_as<A>();

  constexpr bool kConvert = kConvertRowsForward<T>;
  detail::parallel_for(rows, std::max<std::int64_t>(1, 4096 / d), [&](std::int64_t r0, std::int64_t r1, int) {
    const std::vector<A> wf = vector_as(w, d, A(1)), bf = vector_as(b, d, A(0));
    std::vector<A> row_buffer(kConvert ? std::size_t(d) : 0);
    const A* __restrict wp = wf.data();
    const A* __restrict bp = bf.data();
    A* __restrict buf = row_buffer.data();
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * d;
      T* __restrict yr = y + r * d;
      if (residual) {
        T* __restrict sr = sum_out + r * d;
        const T* __restrict rr = residual + r * d;
        for (std::int64_t j = 0; j < d; ++j) sr[j] = store_as<T>(to_float(xr[j]) + to_float(rr[j]));
        xr = sr;
      }
      if constexpr (kConvert) {
        to_float_row(xr, buf, d);
        A mu, rs;
        row_stats(buf, d, A(eps), mu, rs);
        mean_out[r] = mu;
        rstd_out[r] = rs;
#pragma omp simd
        for (std::int64_t j = 0; j < d; ++j) buf[j] = (buf[j] - mu) * rs * wp[j] + bp[j];
        from_float_row(buf, yr, d);
      } else {
        A mu, rs;
        row_stats(xr, d, A(eps), mu, rs);
        mean_out[r] = mu;
        rstd_out[r] = rs;
#pragma omp simd
        for (std::int64_t j = 0; j < d; ++j) yr[j] = store_as<T>((to_float(xr[j]) - mu) * rs * wp[j] + bp[j]);
      }
    }
  });
}

// grad_sum (may be null) is added to dx: the gradient reaching the residual
// stream's sum from elsewhere (add_layernorm_backward).
template <typename T, typename W>
void backward_typed(const TensorView& dyv, const TensorView& xv, const TensorView* wv,
                    const TensorView& meanv, const TensorView& rstdv, const TensorView* gsv,
                    const TensorView& dxv, const TensorView* dwv, const TensorView* dbv) {
  using A = compute_t<T>;
  const std::int64_t d = xv.shape[xv.ndim - 1], rows = xv.numel() / d;
  const T* x = xv.data_as<const T>();
  const T* dy = dyv.data_as<const T>();
  T* dx = dxv.data_as<T>();
  const T* grad_sum = gsv ? gsv->data_as<const T>() : nullptr;
  const W* w = wv ? wv->data_as<const W>() : nullptr;
  const A* mean = meanv.data_as<const A>();
  const A* rstd = rstdv.data_as<const A>();
  const bool want_dw = dwv != nullptr, want_db = dbv != nullptr;

  const std::int64_t min_rows = std::max<std::int64_t>(kRowsPerFold, 4096 / d);
  const int ranges = detail::parallel_ranges(rows, min_rows);
  // Per-range column sums of dy * xhat and dy, in double.
  std::vector<double> dw_sums(want_dw ? std::size_t(ranges * d) : 0, 0.0);
  std::vector<double> db_sums(want_db ? std::size_t(ranges * d) : 0, 0.0);

  detail::parallel_for(rows, min_rows, [&](std::int64_t r0, std::int64_t r1, int range) {
    const std::vector<A> wf = vector_as(w, d, A(1));
    std::vector<A> dw_part(std::size_t(d), A(0)), db_part(std::size_t(d), A(0));
    const A* __restrict wp = wf.data();
    A* __restrict dwp = dw_part.data();
    A* __restrict dbp = db_part.data();
    auto fold = [&] {
      for (std::int64_t j = 0; want_dw && j < d; ++j) {
        dw_sums[std::size_t(range * d + j)] += dwp[j];
        dwp[j] = A(0);
      }
      for (std::int64_t j = 0; want_db && j < d; ++j) {
        db_sums[std::size_t(range * d + j)] += dbp[j];
        dbp[j] = A(0);
      }
    };
    // One row's xhat, and for float16 data its dy and the dx being formed, as A.
    const std::size_t half_rows = kConvertRowsBackward<T> ? std::size_t(d) : 0;
    std::vector<A> xhat_row(static_cast<std::size_t>(d)), dy_row(half_rows), out_row(half_rows);
    A* __restrict dyv = dy_row.data();
    A* __restrict xh = xhat_row.data();
    A* __restrict out = out_row.data();
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * d;
      const T* __restrict dyr = dy + r * d;
      T* __restrict dxr = dx + r * d;
      const A mu = mean[r], rs = rstd[r];
      // float16 rows are converted into dyv and xh first (xh then becomes xhat
      // in place); other types are read as they are.
      if constexpr (kConvertRowsBackward<T>) {
        to_float_row(dyr, dyv, d);
        to_float_row(xr, xh, d);
      }
      auto dy_at = [&](std::int64_t j) -> A {
        if constexpr (kConvertRowsBackward<T>) return dyv[j];
        else return to_float(dyr[j]);
      };
      auto x_at = [&](std::int64_t j) -> A {
        if constexpr (kConvertRowsBackward<T>) return xh[j];
        else return to_float(xr[j]);
      };
      // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * weight.
      // One pass writes xhat and sums both in kPartials lanes (see lane_sum).
      A part_g[kPartials] = {}, part_gx[kPartials] = {};
      std::int64_t j0 = 0;
      for (; j0 + kPartials <= d; j0 += kPartials)
#pragma omp simd
        for (int l = 0; l < kPartials; ++l) {
          const std::int64_t j = j0 + l;
          const A g = dy_at(j) * wp[j], xhat = (x_at(j) - mu) * rs;
          xh[j] = xhat;
          part_g[l] += g;
          part_gx[l] += g * xhat;
        }
      for (std::int64_t j = j0; j < d; ++j) {
        const A g = dy_at(j) * wp[j], xhat = (x_at(j) - mu) * rs;
        xh[j] = xhat;
        part_g[0] += g;
        part_gx[0] += g * xhat;
      }
      A sum_g = 0, sum_gx = 0;
      for (int l = 0; l < kPartials; ++l) {
        sum_g += part_g[l];
        sum_gx += part_gx[l];
      }
      const A mean_g = sum_g / A(d), mean_gx = sum_gx / A(d);
      const T* gs = grad_sum ? grad_sum + r * d : nullptr;
      auto dx_at = [&](std::int64_t j) -> A {
        const A dxj = rs * (dy_at(j) * wp[j] - mean_g - xh[j] * mean_gx);
        return gs ? dxj + A(to_float(gs[j])) : dxj;
      };
#pragma omp simd
      for (std::int64_t j = 0; j < d; ++j) {
        const A dyj = dy_at(j);
        if constexpr (kConvertRowsBackward<T>) out[j] = dx_at(j);
        else dxr[j] = store_as<T>(dx_at(j));
        dwp[j] += dyj * xh[j];
        dbp[j] += dyj;
      }
      if constexpr (kConvertRowsBackward<T>) from_float_row(out, dxr, d);
      if ((r - r0 + 1) % kRowsPerFold == 0) fold();
    }
    fold();
  });

  // Ranges are added in order: the result depends only on the thread count.
  // With no rows there are no ranges and both sums are (correctly) zero.
  auto finish = [&](const std::vector<double>& sums, const TensorView& outv) {
    W* out = outv.data_as<W>();
    for (std::int64_t j = 0; j < d; ++j) {
      double total = 0.0;
      for (int r = 0; r < ranges; ++r) total += sums[std::size_t(r * d + j)];
      out[j] = store_as<W>(total);
    }
  };
  if (want_dw) finish(dw_sums, *dwv);
  if (want_db) finish(db_sums, *dbv);
}

// The affine parameters' dtype: that of the first present, else (unused) float.
DType param_dtype(const TensorView* a, const TensorView* b) {
  if (a) return a->dtype;
  if (b) return b->dtype;
  return DType::Float32;
}

}  // namespace

void layernorm_forward(const TensorView& x, const TensorView* residual, const TensorView* weight,
                       const TensorView* bias, float eps, const TensorView* sum, const TensorView& y,
                       const TensorView& mean, const TensorView& rstd) {
  dispatch_float_or_double(x.dtype, [&](auto xt) {
    dispatch_float_or_double(param_dtype(weight, bias), [&](auto wt) {
      forward_typed<decltype(xt), decltype(wt)>(x, residual, weight, bias, eps, sum, y, mean, rstd);
    });
  });
}

void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight,
                        const TensorView& mean, const TensorView& rstd, const TensorView* grad_sum,
                        const TensorView& dx, const TensorView* dweight, const TensorView* dbias) {
  dispatch_float_or_double(x.dtype, [&](auto xt) {
    dispatch_float_or_double(param_dtype(dweight ? dweight : weight, dbias), [&](auto wt) {
      backward_typed<decltype(xt), decltype(wt)>(dy, x, weight, mean, rstd, grad_sum, dx, dweight, dbias);
    });
  });
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA

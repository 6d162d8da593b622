// CUDA LayerNorm over the last dimension.
//
// Forward and dx: one warp per row. The row is read from memory once; the
// statistics pass and the output pass re-read it from L1, 4 elements per
// access where the row is aligned (any width works, unaligned ones one element
// at a time). Statistics are two-pass in float32.
//
// dweight/dbias: every block sums a fixed slab of rows for 256 columns (one
// column per thread, so each row read is coalesced) into a partial; a second
// kernel adds the partials column by column in slab order. No atomics: the
// result is the same bits every run.
#include <algorithm>

#include "common.cuh"
#include "common/cuda_kernels.h"
#include "slab_sums.cuh"

namespace zerofuse::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kColumnThreads = 256;
constexpr int kTargetSlabs = 256;

template <typename T, bool Vec, typename Fn>
__device__ __forceinline__ void for_row(const T* row, int d, Fn&& fn) {
  const int lane = threadIdx.x % 32;
  if constexpr (Vec) {
    for (int c = 4 * lane; c < d; c += 128) {
      float v[4];
      load4(row + c, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) fn(c + j, v[j]);
    }
  } else {
    for (int c = lane; c < d; c += 32) fn(c, to_float(row[c]));
  }
}

template <typename W>
__device__ __forceinline__ float param_at(const W* p, int c, float absent) {
  return p ? to_float(p[c]) : absent;
}

// With a residual, the row normalised is sum = x + residual, rounded to T and
// written first; every lane then re-reads only the elements it wrote itself.
template <typename T, typename W, bool Vec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    ln_forward(const T* x, const T* residual, const W* w, const W* b, float eps, T* sum_out, T* y, float* mean_out,
               float* rstd_out, std::int64_t rows, int d) {
  const std::int64_t row = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  if (residual) {
    T* sr = sum_out + row * d;
    const T* rr = residual + row * d;
    const int lane = threadIdx.x % 32;
    if constexpr (Vec) {
      for (int c = 4 * lane; c < d; c += 128) {
        float a[4], r[4];
        load4(xr + c, a);
        load4(rr + c, r);
#pragma unroll
        for (int j = 0; j < 4; ++j) a[j] += r[j];
        store4(sr + c, a);
      }
    } else {
      for (int c = lane; c < d; c += 32) sr[c] = from_float<T>(to_float(xr[c]) + to_float(rr[c]));
    }
    xr = sr;
  }
  float sum = 0.0f;
  for_row<T, Vec>(xr, d, [&](int, float v) { sum += v; });
  const float mean = warp_sum(sum) / float(d);
  float sq = 0.0f;
  for_row<T, Vec>(xr, d, [&](int, float v) { sq += (v - mean) * (v - mean); });
  const float rstd = rsqrtf(warp_sum(sq) / float(d) + eps);
  const int lane = threadIdx.x % 32;
  if constexpr (Vec) {
    for (int c = 4 * lane; c < d; c += 128) {
      float v[4], o[4];
      load4(xr + c, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = (v[j] - mean) * rstd * param_at(w, c + j, 1.0f) + param_at(b, c + j, 0.0f);
      store4(yr + c, o);
    }
  } else {
    for (int c = lane; c < d; c += 32)
      yr[c] = from_float<T>((to_float(xr[c]) - mean) * rstd * param_at(w, c, 1.0f) + param_at(b, c, 0.0f));
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// grad_sum (may be null) is added to dx (add + LayerNorm's backward).
template <typename T, typename W, bool Vec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    ln_backward_dx(const T* dy, const T* x, const W* w, const float* mean_in, const float* rstd_in,
                   const T* grad_sum, T* dx, std::int64_t rows, int d) {
  const std::int64_t row = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * d;
  const T* dyr = dy + row * d;
  const T* gsr = grad_sum ? grad_sum + row * d : nullptr;
  T* dxr = dx + row * d;
  const float mean = mean_in[row], rstd = rstd_in[row];
  const int lane = threadIdx.x % 32;
  // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * weight
  float sum_g = 0.0f, sum_gx = 0.0f;
  if constexpr (Vec) {
    for (int c = 4 * lane; c < d; c += 128) {
      float xv[4], gv[4];
      load4(xr + c, xv);
      load4(dyr + c, gv);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float g = gv[j] * param_at(w, c + j, 1.0f);
        sum_g += g;
        sum_gx += g * (xv[j] - mean) * rstd;
      }
    }
  } else {
    for (int c = lane; c < d; c += 32) {
      const float g = to_float(dyr[c]) * param_at(w, c, 1.0f);
      sum_g += g;
      sum_gx += g * (to_float(xr[c]) - mean) * rstd;
    }
  }
  const float mean_g = warp_sum(sum_g) / float(d), mean_gx = warp_sum(sum_gx) / float(d);
  if constexpr (Vec) {
    for (int c = 4 * lane; c < d; c += 128) {
      float xv[4], gv[4], o[4], extra[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load4(xr + c, xv);
      load4(dyr + c, gv);
      if (gsr) load4(gsr + c, extra);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        o[j] = rstd * (gv[j] * param_at(w, c + j, 1.0f) - mean_g - (xv[j] - mean) * rstd * mean_gx) + extra[j];
      store4(dxr + c, o);
    }
  } else {
    for (int c = lane; c < d; c += 32) {
      const float xhat = (to_float(xr[c]) - mean) * rstd;
      const float extra = gsr ? to_float(gsr[c]) : 0.0f;
      dxr[c] = from_float<T>(rstd * (to_float(dyr[c]) * param_at(w, c, 1.0f) - mean_g - xhat * mean_gx) + extra);
    }
  }
}

// Partial column sums of dy * xhat and dy over rows [slab * slab_rows, ...).
template <typename T>
__global__ void __launch_bounds__(kColumnThreads)
    ln_backward_partials(const T* dy, const T* x, const float* mean_in, const float* rstd_in, float* dw_part,
                         float* db_part, std::int64_t rows, int d, std::int64_t slab_rows) {
  const int c = blockIdx.y * kColumnThreads + threadIdx.x;
  if (c >= d) return;
  const std::int64_t r0 = std::int64_t(blockIdx.x) * slab_rows;
  const std::int64_t r1 = r0 + slab_rows < rows ? r0 + slab_rows : rows;
  float acc_w = 0.0f, acc_b = 0.0f;
  for (std::int64_t r = r0; r < r1; ++r) {
    const float g = to_float(dy[r * d + c]);
    acc_w += g * (to_float(x[r * d + c]) - mean_in[r]) * rstd_in[r];
    acc_b += g;
  }
  if (dw_part) dw_part[std::int64_t(blockIdx.x) * d + c] = acc_w;
  if (db_part) db_part[std::int64_t(blockIdx.x) * d + c] = acc_b;
}

DType param_dtype(const TensorView* a, const TensorView* b) {
  if (a) return a->dtype;
  if (b) return b->dtype;
  return DType::Float32;
}

bool vectorizable(int d, std::initializer_list<const TensorView*> views) {
  if (d % 4) return false;
  for (const TensorView* v : views)
    if (v && !aligned(v->data, 4 * v->element_size())) return false;
  return true;
}

}  // namespace

void layernorm_forward(const TensorView& x, const TensorView* residual, const TensorView* weight,
                       const TensorView* bias, float eps, const TensorView* sum, const TensorView& y,
                       const TensorView& mean, const TensorView& rstd, Stream s) {
  DeviceGuard guard(x.device);
  const int d = int(x.shape[x.ndim - 1]);
  const std::int64_t rows = x.numel() / d;
  if (rows == 0) return;
  const unsigned blocks = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const bool vec = vectorizable(d, {&x, &y, weight, bias, residual, sum});
  dispatch_float(x.dtype, [&](auto xt) {
    using T = decltype(xt);
    dispatch_float(param_dtype(weight, bias), [&](auto wt) {
      using W = decltype(wt);
      const W* w = weight ? weight->data_as<const W>() : nullptr;
      const W* b = bias ? bias->data_as<const W>() : nullptr;
      auto kernel = vec ? ln_forward<T, W, true> : ln_forward<T, W, false>;
      kernel<<<blocks, kWarpsPerBlock * 32, 0, stream_of(s)>>>(
          x.data_as<const T>(), residual ? residual->data_as<const T>() : nullptr, w, b, eps,
          sum ? sum->data_as<T>() : nullptr, y.data_as<T>(), mean.data_as<float>(), rstd.data_as<float>(), rows, d);
      ZF_CUDA_CHECK_LAUNCH("ln_forward");
    });
  });
}

void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight, const TensorView& mean,
                        const TensorView& rstd, const TensorView* grad_sum, const TensorView& dx,
                        const TensorView* dweight, const TensorView* dbias, Stream s) {
  DeviceGuard guard(x.device);
  const cudaStream_t stream = stream_of(s);
  const int d = int(x.shape[x.ndim - 1]);
  const std::int64_t rows = x.numel() / d;
  const bool vec = vectorizable(d, {&x, &dy, &dx, weight, grad_sum});
  dispatch_float(x.dtype, [&](auto xt) {
    using T = decltype(xt);
    dispatch_float(param_dtype(dweight ? dweight : weight, dbias), [&](auto wt) {
      using W = decltype(wt);
      if (rows > 0) {
        const unsigned blocks = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
        auto kernel = vec ? ln_backward_dx<T, W, true> : ln_backward_dx<T, W, false>;
        kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
            dy.data_as<const T>(), x.data_as<const T>(), weight ? weight->data_as<const W>() : nullptr,
            mean.data_as<const float>(), rstd.data_as<const float>(),
            grad_sum ? grad_sum->data_as<const T>() : nullptr, dx.data_as<T>(), rows, d);
        ZF_CUDA_CHECK_LAUNCH("ln_backward_dx");
      }
      if (!dweight && !dbias) return;
      // Slabs of rows: about kTargetSlabs of them, fixed by the shape alone.
      const std::int64_t slab_rows = std::max<std::int64_t>(1, (rows + kTargetSlabs - 1) / kTargetSlabs);
      const int slabs = int(std::max<std::int64_t>(1, (rows + slab_rows - 1) / slab_rows));
      StreamBuffer parts(std::size_t(2) * slabs * d * sizeof(float), stream);
      float* dw_part = dweight ? parts.as<float>() : nullptr;
      float* db_part = dbias ? parts.as<float>() + std::int64_t(slabs) * d : nullptr;
      if (rows == 0) ZF_CUDA_CHECK(cudaMemsetAsync(parts.as<float>(), 0, 2 * sizeof(float) * slabs * d, stream));
      const dim3 grid(unsigned(rows ? slabs : 0), unsigned((d + kColumnThreads - 1) / kColumnThreads));
      if (rows > 0) {
        ln_backward_partials<T><<<grid, kColumnThreads, 0, stream>>>(
            dy.data_as<const T>(), x.data_as<const T>(), mean.data_as<const float>(), rstd.data_as<const float>(),
            dw_part, db_part, rows, d, slab_rows);
        ZF_CUDA_CHECK_LAUNCH("ln_backward_partials");
      }
      if (dweight) sum_slabs(dw_part, slabs, d, dweight->data_as<W>(), stream);
      if (dbias) sum_slabs(db_part, slabs, d, dbias->data_as<W>(), stream);
    });
  });
}

}  // namespace zerofuse::cuda

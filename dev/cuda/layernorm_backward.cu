// LayerNorm backward, bfloat16 in and out (dx, dweight, dbias), float32 math,
// laid out as llm.c's dev/cuda: a float64 CPU reference, numbered kernel
// versions, and a driver that validates every version before timing it.
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * weight
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
//
// version 0  what zerofuse ships (zerofuse::layernorm_backward, cuda/layernorm.cu):
//            dx by a warp per row; dweight/dbias by (row slab, 256 columns)
//            blocks into partials, then a column pass adding them in order
// version 1  naive: dx by a thread per row, dweight/dbias by a thread per
//            column over every row
// version 2  one pass: a warp per row with the row in registers (16-byte
//            accesses) writes dx and keeps its columns' dweight/dbias partials
//            in registers across the rows it visits (grid-stride); the block's
//            4 warps combine them in shared memory into one partial row per
//            block, added in block order by a second kernel. Deterministic;
//            width a multiple of 256, up to 1024 (wider rows would spill)
//
//   ./dev_layernorm_backward [version|all] [rows] [width]     (default: 16384 x 768)
#include <zerofuse/zerofuse.h>

#include "common.cuh"

using bf16 = __nv_bfloat16;
constexpr float kEps = 1e-5f;

// --- version 1 ---------------------------------------------------------------------------------

__global__ void dx_v1(const bf16* dy, const bf16* x, const bf16* w, const float* mean, const float* rstd, bf16* dx,
                      int rows, int d) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const std::int64_t base = std::int64_t(row) * d;
  const float mu = mean[row], rs = rstd[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int c = 0; c < d; ++c) {
    const float g = __bfloat162float(dy[base + c]) * __bfloat162float(w[c]);
    sum_g += g;
    sum_gx += g * (__bfloat162float(x[base + c]) - mu) * rs;
  }
  const float mean_g = sum_g / d, mean_gx = sum_gx / d;
  for (int c = 0; c < d; ++c) {
    const float xhat = (__bfloat162float(x[base + c]) - mu) * rs;
    const float g = __bfloat162float(dy[base + c]) * __bfloat162float(w[c]);
    dx[base + c] = __float2bfloat16(rs * (g - mean_g - xhat * mean_gx));
  }
}

__global__ void dparams_v1(const bf16* dy, const bf16* x, const float* mean, const float* rstd, bf16* dw, bf16* db,
                           int rows, int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float sw = 0.0f, sb = 0.0f;
  for (int row = 0; row < rows; ++row) {
    const std::int64_t i = std::int64_t(row) * d + c;
    const float g = __bfloat162float(dy[i]);
    sw += g * (__bfloat162float(x[i]) - mean[row]) * rstd[row];
    sb += g;
  }
  dw[c] = __float2bfloat16(sw);
  db[c] = __float2bfloat16(sb);
}

// --- version 2 ---------------------------------------------------------------------------------

constexpr int kV2Warps = 4;

// partial_w/partial_b: [gridDim.x][d], one row per block.
template <int kChunks>
__global__ void __launch_bounds__(kV2Warps * 32)
    backward_v2(const bf16* dy, const bf16* x, const bf16* w, const float* mean, const float* rstd, bf16* dx,
                float* partial_w, float* partial_b, int rows) {
  constexpr int d = kChunks * 32 * 8;
  __shared__ float block_w[d], block_b[d];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < d; i += blockDim.x) block_w[i] = block_b[i] = 0.0f;
  float wv[kChunks][8], pw[kChunks][8], pb[kChunks][8];
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    unpack8(reinterpret_cast<const uint4*>(w)[k * 32 + lane], wv[k]);
#pragma unroll
    for (int j = 0; j < 8; ++j) pw[k][j] = pb[k][j] = 0.0f;
  }
  for (int row = blockIdx.x * kV2Warps + warp; row < rows; row += gridDim.x * kV2Warps) {
    const uint4* xr = reinterpret_cast<const uint4*>(x + std::int64_t(row) * d);
    const uint4* dyr = reinterpret_cast<const uint4*>(dy + std::int64_t(row) * d);
    const float mu = mean[row], rs = rstd[row];
    float xhat[kChunks][8], g[kChunks][8];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float dyv[8];
      unpack8(xr[k * 32 + lane], xhat[k]);
      unpack8(dyr[k * 32 + lane], dyv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        xhat[k][j] = (xhat[k][j] - mu) * rs;
        g[k][j] = dyv[j] * wv[k][j];
        sum_g += g[k][j];
        sum_gx += g[k][j] * xhat[k][j];
        pw[k][j] += dyv[j] * xhat[k][j];
        pb[k][j] += dyv[j];
      }
    }
    const float mean_g = warp_sum(sum_g) / d, mean_gx = warp_sum(sum_gx) / d;
    uint4* dxr = reinterpret_cast<uint4*>(dx + std::int64_t(row) * d);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = rs * (g[k][j] - mean_g - xhat[k][j] * mean_gx);
      dxr[k * 32 + lane] = pack8(o);
    }
  }
  // The block's warps add their partials in warp order (a barrier between
  // warps keeps the order fixed), then the block writes its row.
  __syncthreads();
  for (int turn = 0; turn < kV2Warps; ++turn) {
    if (warp == turn) {
#pragma unroll
      for (int k = 0; k < kChunks; ++k)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = (k * 32 + lane) * 8 + j;
          block_w[c] += pw[k][j];
          block_b[c] += pb[k][j];
        }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    partial_w[std::int64_t(blockIdx.x) * d + i] = block_w[i];
    partial_b[std::int64_t(blockIdx.x) * d + i] = block_b[i];
  }
}

__global__ void sum_partials_v2(const float* partial_w, const float* partial_b, int blocks, int d, bf16* dw,
                                bf16* db) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float sw = 0.0f, sb = 0.0f;
  for (int b = 0; b < blocks; ++b) {
    sw += partial_w[std::int64_t(b) * d + c];
    sb += partial_b[std::int64_t(b) * d + c];
  }
  dw[c] = __float2bfloat16(sw);
  db[c] = __float2bfloat16(sb);
}

// --- the driver ----------------------------------------------------------------------------------

struct Buffers {
  int rows, d, sms;
  bf16 *x, *dy, *w, *b, *y, *dx, *dw, *db;
  float *mean, *rstd, *partial_w, *partial_b;
  int partial_blocks;
};

bool launch(int version, const Buffers& m) {
  using zerofuse::DType;
  using zerofuse::TensorView;
  const auto dev = zerofuse::Device::cuda(0);
  switch (version) {
    case 0: {
      const TensorView dy = TensorView::contiguous(m.dy, DType::BFloat16, {m.rows, m.d}, dev);
      const TensorView x = TensorView::contiguous(m.x, DType::BFloat16, {m.rows, m.d}, dev);
      const TensorView w = TensorView::contiguous(m.w, DType::BFloat16, {m.d}, dev);
      const TensorView mean = TensorView::contiguous(m.mean, DType::Float32, {m.rows}, dev);
      const TensorView rstd = TensorView::contiguous(m.rstd, DType::Float32, {m.rows}, dev);
      const TensorView dx = TensorView::contiguous(m.dx, DType::BFloat16, {m.rows, m.d}, dev);
      const TensorView dw = TensorView::contiguous(m.dw, DType::BFloat16, {m.d}, dev);
      const TensorView db = TensorView::contiguous(m.db, DType::BFloat16, {m.d}, dev);
      zerofuse::layernorm_backward(dy, x, &w, mean, rstd, dx, &dw, &db);
      return true;
    }
    case 1:
      dx_v1<<<(m.rows + 127) / 128, 128>>>(m.dy, m.x, m.w, m.mean, m.rstd, m.dx, m.rows, m.d);
      dparams_v1<<<(m.d + 127) / 128, 128>>>(m.dy, m.x, m.mean, m.rstd, m.dw, m.db, m.rows, m.d);
      return true;
    case 2: {
      if (m.d % 256 != 0 || m.d > 1024) return false;
      const int blocks = m.partial_blocks;
      switch (m.d / 256) {
#define ZF_DEV_V2(K)                                                                                       \
  case K:                                                                                                  \
    backward_v2<K><<<blocks, kV2Warps * 32>>>(m.dy, m.x, m.w, m.mean, m.rstd, m.dx, m.partial_w, m.partial_b, \
                                              m.rows);                                                     \
    break;
        ZF_DEV_V2(1) ZF_DEV_V2(2) ZF_DEV_V2(3) ZF_DEV_V2(4)
#undef ZF_DEV_V2
        default: return false;
      }
      sum_partials_v2<<<(m.d + 127) / 128, 128>>>(m.partial_w, m.partial_b, blocks, m.d, m.dw, m.db);
      return true;
    }
    default:
      return false;
  }
}

struct Reference {
  std::vector<double> dx, dw, db;
};

// Everything in float64 from the bfloat16 inputs (mean and rstd recomputed too).
Reference reference(const Buffers& m) {
  const std::int64_t n = std::int64_t(m.rows) * m.d;
  const std::vector<bf16> x = to_host(m.x, n), dy = to_host(m.dy, n), w = to_host(m.w, m.d);
  Reference ref;
  ref.dx.resize(std::size_t(n));
  ref.dw.assign(std::size_t(m.d), 0.0);
  ref.db.assign(std::size_t(m.d), 0.0);
  std::vector<double> xhat(std::size_t(m.d)), g(std::size_t(m.d));
  for (int row = 0; row < m.rows; ++row) {
    const std::size_t base = std::size_t(row) * m.d;
    double sum = 0.0, sq = 0.0;
    for (int c = 0; c < m.d; ++c) sum += to_f32(x[base + c]);
    const double mu = sum / m.d;
    for (int c = 0; c < m.d; ++c) sq += (to_f32(x[base + c]) - mu) * (to_f32(x[base + c]) - mu);
    const double rs = 1.0 / std::sqrt(sq / m.d + kEps);
    double sum_g = 0.0, sum_gx = 0.0;
    for (int c = 0; c < m.d; ++c) {
      xhat[c] = (to_f32(x[base + c]) - mu) * rs;
      g[c] = double(to_f32(dy[base + c])) * to_f32(w[c]);
      sum_g += g[c];
      sum_gx += g[c] * xhat[c];
      ref.dw[c] += to_f32(dy[base + c]) * xhat[c];
      ref.db[c] += to_f32(dy[base + c]);
    }
    for (int c = 0; c < m.d; ++c) ref.dx[base + c] = rs * (g[c] - sum_g / m.d - xhat[c] * sum_gx / m.d);
  }
  return ref;
}

std::vector<float> as_float(const std::vector<bf16>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_f32(v[i]);
  return out;
}

bool check(const Buffers& m, const Reference& ref) {
  const std::int64_t n = std::int64_t(m.rows) * m.d;
  const double sums = std::sqrt(double(m.rows));  // column sums grow like sqrt(rows) for random signs
  const bool ok_dx = validate("dx", as_float(to_host(m.dx, n)), ref.dx, 1.0 / 64, 1.0 / 64);
  const bool ok_dw = validate("dweight", as_float(to_host(m.dw, m.d)), ref.dw, 0.02 * sums, 1.0 / 64);
  const bool ok_db = validate("dbias", as_float(to_host(m.db, m.d)), ref.db, 0.02 * sums, 1.0 / 64);
  return ok_dx && ok_dw && ok_db;
}

int main(int argc, char** argv) {
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  Buffers m{};
  m.rows = argc >= 3 ? std::atoi(argv[2]) : 16384;
  m.d = argc >= 4 ? std::atoi(argv[3]) : 768;
  CUDA_CHECK(cudaDeviceGetAttribute(&m.sms, cudaDevAttrMultiProcessorCount, 0));
  const std::int64_t n = std::int64_t(m.rows) * m.d;
  m.x = device_alloc_hashed<bf16>(n, 21, 2.0f, 0.5f);
  m.dy = device_alloc_hashed<bf16>(n, 22, 1.0f);
  m.w = device_alloc_hashed<bf16>(m.d, 23, 0.5f, 1.0f);
  m.b = device_alloc_hashed<bf16>(m.d, 24, 0.2f);
  m.y = device_alloc_nan<bf16>(n);
  m.dx = device_alloc_nan<bf16>(n);
  m.dw = device_alloc_nan<bf16>(m.d);
  m.db = device_alloc_nan<bf16>(m.d);
  m.mean = device_alloc_nan<float>(m.rows);
  m.rstd = device_alloc_nan<float>(m.rows);
  m.partial_blocks = std::min(2 * m.sms, (m.rows + kV2Warps - 1) / kV2Warps);
  m.partial_w = device_alloc_nan<float>(std::int64_t(m.partial_blocks) * m.d);
  m.partial_b = device_alloc_nan<float>(std::int64_t(m.partial_blocks) * m.d);
  {  // mean and rstd from the shipped forward (what the backward gets in training)
    using zerofuse::DType;
    using zerofuse::TensorView;
    const auto dev = zerofuse::Device::cuda(0);
    const TensorView w = TensorView::contiguous(m.w, DType::BFloat16, {m.d}, dev);
    const TensorView b = TensorView::contiguous(m.b, DType::BFloat16, {m.d}, dev);
    zerofuse::layernorm_forward(TensorView::contiguous(m.x, DType::BFloat16, {m.rows, m.d}, dev), &w, &b, kEps,
                                TensorView::contiguous(m.y, DType::BFloat16, {m.rows, m.d}, dev),
                                TensorView::contiguous(m.mean, DType::Float32, {m.rows}, dev),
                                TensorView::contiguous(m.rstd, DType::Float32, {m.rows}, dev));
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  const Reference ref = reference(m);
  // dy and x read, dx written (2 bytes each), mean/rstd read; the parameters are noise.
  const double bytes = 3.0 * 2.0 * double(n) + 8.0 * m.rows;
  const double roof = copy_gbs(std::size_t(bytes / 2));
  std::printf("layernorm backward bf16 %d x %d: copy roof %.0f GB/s\n", m.rows, m.d, roof);
  int failures = 0;
  for (int version = 0; version <= 2; ++version) {
    if (!wanted(argc, argv, version)) continue;
    CUDA_CHECK(cudaMemset(m.dx, 0xff, sizeof(bf16) * std::size_t(n)));
    CUDA_CHECK(cudaMemset(m.dw, 0xff, sizeof(bf16) * std::size_t(m.d)));
    CUDA_CHECK(cudaMemset(m.db, 0xff, sizeof(bf16) * std::size_t(m.d)));
    if (!launch(version, m)) {
      std::printf("version %d: does not take width %d\n", version, m.d);
      continue;
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    std::printf("version %d:\n", version);
    if (!check(m, ref)) {
      ++failures;
      continue;
    }
    const float ms = time_ms([&] { launch(version, m); });
    const double gbs = bytes / (ms * 1e6);
    std::printf("  %.4f ms  %.0f GB/s  %.0f%% of copy\n", ms, gbs, 100.0 * gbs / roof);
  }
  for (void* p : {static_cast<void*>(m.x), static_cast<void*>(m.dy), static_cast<void*>(m.w),
                  static_cast<void*>(m.b), static_cast<void*>(m.y), static_cast<void*>(m.dx),
                  static_cast<void*>(m.dw), static_cast<void*>(m.db), static_cast<void*>(m.mean),
                  static_cast<void*>(m.rstd), static_cast<void*>(m.partial_w), static_cast<void*>(m.partial_b)})
    CUDA_CHECK(cudaFree(p));
  return failures == 0 ? 0 : 1;
}

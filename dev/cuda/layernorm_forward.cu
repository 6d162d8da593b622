// LayerNorm forward, bfloat16 in and out, float32 statistics, laid out as
// llm.c's dev/cuda: a float64 CPU reference, numbered kernel versions, and a
// driver that validates every version against the reference before timing it.
//
// version 0  what zerofuse ships (zerofuse::layernorm_forward, cuda/layernorm.cu):
//            a warp per row, 4 elements per access, the row re-read (from L1)
//            for the mean, the variance and the output
// version 1  a thread per row: the naive baseline
// version 2  a warp per row holding its row in registers: 16-byte loads of 8
//            elements, statistics and output from registers, 16-byte stores;
//            width a multiple of 256, up to 2048
// version 3  a block of 128 threads per row, row in registers, block
//            reduction through shared memory: for wide rows (4096); width a
//            multiple of 8, up to 8192
//
//   ./dev_layernorm_forward [version|all] [rows] [width]
// (defaults: all versions at 16384 x 768, then 8192 x 4096: the issue's shapes)
#include <zerofuse/zerofuse.h>

#include <string>

#include "common.cuh"

using bf16 = __nv_bfloat16;
constexpr float kEps = 1e-5f;

// --- version 1: a thread per row ---------------------------------------------------------------

__global__ void layernorm_v1(const bf16* x, const bf16* w, const bf16* b, bf16* y, float* mean, float* rstd,
                             int rows, int d) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const bf16* xr = x + std::int64_t(row) * d;
  float sum = 0.0f;
  for (int c = 0; c < d; ++c) sum += __bfloat162float(xr[c]);
  const float mu = sum / d;
  float sq = 0.0f;
  for (int c = 0; c < d; ++c) {
    const float v = __bfloat162float(xr[c]) - mu;
    sq += v * v;
  }
  const float rs = rsqrtf(sq / d + kEps);
  for (int c = 0; c < d; ++c)
    y[std::int64_t(row) * d + c] =
        __float2bfloat16((__bfloat162float(xr[c]) - mu) * rs * __bfloat162float(w[c]) + __bfloat162float(b[c]));
  mean[row] = mu;
  rstd[row] = rs;
}

// --- version 2: a warp per row, row in registers -----------------------------------------------

// kChunks 16-byte chunks per lane: lane l holds chunks l, l + 32, ... (coalesced).
template <int kChunks>
__global__ void __launch_bounds__(128) layernorm_v2(const bf16* x, const bf16* w, const bf16* b, bf16* y,
                                                    float* mean, float* rstd, int rows) {
  constexpr int d = kChunks * 32 * 8;
  const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const uint4* xr = reinterpret_cast<const uint4*>(x + std::int64_t(row) * d);
  float v[kChunks][8];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    unpack8(xr[k * 32 + lane], v[k]);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum += v[k][j];
  }
  const float mu = warp_sum(sum) / d;
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int j = 0; j < 8; ++j) sq += (v[k][j] - mu) * (v[k][j] - mu);
  const float rs = rsqrtf(warp_sum(sq) / d + kEps);
  uint4* yr = reinterpret_cast<uint4*>(y + std::int64_t(row) * d);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    float wv[8], bv[8], o[8];
    unpack8(reinterpret_cast<const uint4*>(w)[k * 32 + lane], wv);
    unpack8(reinterpret_cast<const uint4*>(b)[k * 32 + lane], bv);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = (v[k][j] - mu) * rs * wv[j] + bv[j];
    yr[k * 32 + lane] = pack8(o);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// --- version 3: a block per row, row in registers ----------------------------------------------

constexpr int kV3Threads = 128;

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch is free (it may hold the previous sum)
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int k = 0; k < kV3Threads / 32; ++k) total += scratch[k];
  return total;
}

// Thread t holds chunks t, t + 128, ... (kChunks of them at most; those past
// the row's d / 8 chunks are empty).
template <int kChunks>
__global__ void __launch_bounds__(kV3Threads) layernorm_v3(const bf16* x, const bf16* w, const bf16* b, bf16* y,
                                                           float* mean, float* rstd, int d) {
  __shared__ float scratch[kV3Threads / 32];
  const int row = blockIdx.x, t = threadIdx.x, chunks = d / 8;
  const uint4* xr = reinterpret_cast<const uint4*>(x + std::int64_t(row) * d);
  float v[kChunks][8];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int chunk = k * kV3Threads + t;
    if (chunk < chunks) {
      unpack8(xr[chunk], v[k]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[k][j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) sum += v[k][j];
  }
  const float mu = block_sum(sum, scratch) / d;
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
    if (k * kV3Threads + t < chunks)
#pragma unroll
      for (int j = 0; j < 8; ++j) sq += (v[k][j] - mu) * (v[k][j] - mu);
  const float rs = rsqrtf(block_sum(sq, scratch) / d + kEps);
  uint4* yr = reinterpret_cast<uint4*>(y + std::int64_t(row) * d);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int chunk = k * kV3Threads + t;
    if (chunk >= chunks) continue;
    float wv[8], bv[8], o[8];
    unpack8(reinterpret_cast<const uint4*>(w)[chunk], wv);
    unpack8(reinterpret_cast<const uint4*>(b)[chunk], bv);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = (v[k][j] - mu) * rs * wv[j] + bv[j];
    yr[chunk] = pack8(o);
  }
  if (t == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// --- the driver ----------------------------------------------------------------------------------

struct Buffers {
  int rows, d;
  bf16 *x, *w, *b, *y;
  float *mean, *rstd;
};

// Launches `version`; false when it does not take this width.
bool launch(int version, const Buffers& m) {
  using zerofuse::DType;
  using zerofuse::TensorView;
  const auto dev = zerofuse::Device::cuda(0);
  switch (version) {
    case 0: {
      const TensorView x = TensorView::contiguous(m.x, DType::BFloat16, {m.rows, m.d}, dev);
      const TensorView w = TensorView::contiguous(m.w, DType::BFloat16, {m.d}, dev);
      const TensorView b = TensorView::contiguous(m.b, DType::BFloat16, {m.d}, dev);
      const TensorView y = TensorView::contiguous(m.y, DType::BFloat16, {m.rows, m.d}, dev);
      const TensorView mean = TensorView::contiguous(m.mean, DType::Float32, {m.rows}, dev);
      const TensorView rstd = TensorView::contiguous(m.rstd, DType::Float32, {m.rows}, dev);
      zerofuse::layernorm_forward(x, &w, &b, kEps, y, mean, rstd);
      return true;
    }
    case 1:
      layernorm_v1<<<(m.rows + 127) / 128, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows, m.d);
      return true;
    case 2: {
      if (m.d % 256 != 0 || m.d > 2048) return false;
      const dim3 grid((m.rows + 3) / 4);
      switch (m.d / 256) {
        case 1: layernorm_v2<1><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        case 2: layernorm_v2<2><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        case 3: layernorm_v2<3><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        case 4: layernorm_v2<4><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        case 5: layernorm_v2<5><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        case 6: layernorm_v2<6><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        case 7: layernorm_v2<7><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
        default: layernorm_v2<8><<<grid, 128>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.rows); break;
      }
      return true;
    }
    case 3: {
      if (m.d % 8 != 0 || m.d > 8192) return false;
      const int chunks_per_thread = (m.d / 8 + kV3Threads - 1) / kV3Threads;
      if (chunks_per_thread <= 1) layernorm_v3<1><<<m.rows, kV3Threads>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.d);
      else if (chunks_per_thread <= 2) layernorm_v3<2><<<m.rows, kV3Threads>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.d);
      else if (chunks_per_thread <= 4) layernorm_v3<4><<<m.rows, kV3Threads>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.d);
      else layernorm_v3<8><<<m.rows, kV3Threads>>>(m.x, m.w, m.b, m.y, m.mean, m.rstd, m.d);
      return true;
    }
    default:
      return false;
  }
}

// The float64 reference for `check_rows` rows spread over the input.
struct Reference {
  std::vector<int> rows;
  std::vector<double> y, mean, rstd;
};

Reference reference(const Buffers& m, int check_rows) {
  const std::vector<bf16> x = to_host(m.x, std::int64_t(m.rows) * m.d), w = to_host(m.w, m.d), b = to_host(m.b, m.d);
  Reference ref;
  for (int k = 0; k < check_rows; ++k) {
    const int row = int(std::int64_t(k) * (m.rows - 1) / std::max(1, check_rows - 1));
    ref.rows.push_back(row);
    double sum = 0.0, sq = 0.0;
    for (int c = 0; c < m.d; ++c) sum += to_f32(x[std::size_t(row) * m.d + c]);
    const double mu = sum / m.d;
    for (int c = 0; c < m.d; ++c) sq += (to_f32(x[std::size_t(row) * m.d + c]) - mu) * (to_f32(x[std::size_t(row) * m.d + c]) - mu);
    const double rs = 1.0 / std::sqrt(sq / m.d + kEps);
    for (int c = 0; c < m.d; ++c)
      ref.y.push_back((to_f32(x[std::size_t(row) * m.d + c]) - mu) * rs * to_f32(w[c]) + to_f32(b[c]));
    ref.mean.push_back(mu);
    ref.rstd.push_back(rs);
  }
  return ref;
}

bool check(const Buffers& m, const Reference& ref) {
  const std::vector<bf16> y = to_host(m.y, std::int64_t(m.rows) * m.d);
  const std::vector<float> mean = to_host(m.mean, m.rows), rstd = to_host(m.rstd, m.rows);
  std::vector<float> got_y, got_mean, got_rstd;
  for (int row : ref.rows) {
    for (int c = 0; c < m.d; ++c) got_y.push_back(to_f32(y[std::size_t(row) * m.d + c]));
    got_mean.push_back(mean[row]);
    got_rstd.push_back(rstd[row]);
  }
  const bool ok_y = validate("y", got_y, ref.y, 1.0 / 128, 1.0 / 128);  // a bfloat16 rounding and a bit
  const bool ok_mean = validate("mean", got_mean, ref.mean, 1e-5, 1e-4);
  const bool ok_rstd = validate("rstd", got_rstd, ref.rstd, 1e-5, 1e-4);
  return ok_y && ok_mean && ok_rstd;
}

int run_shape(int argc, char** argv, int rows, int d) {
  Buffers m{rows, d};
  m.x = device_alloc_hashed<bf16>(std::int64_t(rows) * d, 1, 2.0f, 0.5f);
  m.w = device_alloc_hashed<bf16>(d, 2, 0.5f, 1.0f);
  m.b = device_alloc_hashed<bf16>(d, 3, 0.2f);
  m.y = device_alloc_nan<bf16>(std::int64_t(rows) * d);
  m.mean = device_alloc_nan<float>(rows);
  m.rstd = device_alloc_nan<float>(rows);
  CUDA_CHECK(cudaDeviceSynchronize());
  const Reference ref = reference(m, 64);
  const double bytes = 2.0 * 2.0 * double(rows) * d + 8.0 * rows;  // x read, y written, statistics
  const double roof = copy_gbs(std::size_t(bytes / 2));
  std::printf("layernorm forward bf16 %d x %d: copy roof %.0f GB/s\n", rows, d, roof);
  int failures = 0;
  for (int version = 0; version <= 3; ++version) {
    if (!wanted(argc, argv, version)) continue;
    CUDA_CHECK(cudaMemset(m.y, 0xff, sizeof(bf16) * std::size_t(rows) * d));  // poison: unwritten fails
    CUDA_CHECK(cudaMemset(m.mean, 0xff, sizeof(float) * rows));
    CUDA_CHECK(cudaMemset(m.rstd, 0xff, sizeof(float) * rows));
    if (!launch(version, m)) {
      std::printf("version %d: does not take width %d\n", version, d);
      continue;
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    std::printf("version %d:\n", version);
    if (!check(m, ref)) {
      ++failures;
      continue;  // a wrong kernel is not timed
    }
    const float ms = time_ms([&] { launch(version, m); });
    const double gbs = bytes / (ms * 1e6);
    std::printf("  %.4f ms  %.0f GB/s  %.0f%% of copy\n", ms, gbs, 100.0 * gbs / roof);
  }
  for (void* p : {static_cast<void*>(m.x), static_cast<void*>(m.w), static_cast<void*>(m.b),
                  static_cast<void*>(m.y), static_cast<void*>(m.mean), static_cast<void*>(m.rstd)})
    CUDA_CHECK(cudaFree(p));
  return failures;
}

int main(int argc, char** argv) {
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  int failures = 0;
  if (argc >= 4) {
    failures += run_shape(argc, argv, std::atoi(argv[2]), std::atoi(argv[3]));
  } else {
    failures += run_shape(argc, argv, 16384, 768);
    failures += run_shape(argc, argv, 8192, 4096);
  }
  return failures == 0 ? 0 : 1;
}

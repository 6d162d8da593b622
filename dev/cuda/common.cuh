// What the dev/cuda drivers share (after llm.c's dev/cuda/common.h): CUDA
// error checks, deterministic inputs generated on the device and re-derivable
// on the host, validation against a float64 reference, and CUDA-event timing.
// Standalone on purpose: a kernel version here can be read, changed and rerun
// without the library; version 0 of each driver calls the shipped kernel
// through zerofuse's public C++ API so the two are measured side by side.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string_view>
#include <type_traits>
#include <vector>

#define CUDA_CHECK(call)                                                                             \
  do {                                                                                               \
    const cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

// Input element i of stream `seed`: a value in [-1, 1) from a hash, the same on
// host and device, so inputs far larger than host memory can be generated on
// the GPU and any element re-derived on the host for the reference.
__host__ __device__ inline float hashed_uniform(std::uint64_t i, std::uint32_t seed) {
  std::uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float(z >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits
}

template <typename T>
__host__ __device__ inline T from_f32(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(v);
  else return v;
}

template <typename T>
__host__ __device__ inline float to_f32(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return float(v);
}

// out[i] = T(offset + scale * hashed_uniform(i, seed)) for i < n.
template <typename T>
__global__ void fill_hashed(T* out, std::int64_t n, std::uint32_t seed, float scale, float offset) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(offset + scale * hashed_uniform(std::uint64_t(i), seed));
}

template <typename T>
T* device_alloc_hashed(std::int64_t n, std::uint32_t seed, float scale = 1.0f, float offset = 0.0f) {
  T* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, sizeof(T) * std::max<std::int64_t>(n, 1)));
  fill_hashed<T><<<1024, 256>>>(p, n, seed, scale, offset);
  CUDA_CHECK(cudaGetLastError());
  return p;
}

template <typename T>
T* device_alloc_nan(std::int64_t n) {  // outputs start as NaN: an element left unwritten fails validation
  T* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, sizeof(T) * std::max<std::int64_t>(n, 1)));
  CUDA_CHECK(cudaMemset(p, 0xff, sizeof(T) * std::max<std::int64_t>(n, 1)));
  return p;
}

template <typename T>
std::vector<T> to_host(const T* device, std::int64_t n) {
  std::vector<T> host(std::size_t(std::max<std::int64_t>(n, 0)));
  CUDA_CHECK(cudaMemcpy(host.data(), device, sizeof(T) * host.size(), cudaMemcpyDeviceToHost));
  return host;
}

// Checks got[k] against want[k] (float64) within atol + rtol * |want|; prints
// the worst element and returns whether all passed (NaN never passes).
inline bool validate(const char* what, const std::vector<float>& got, const std::vector<double>& want, double atol,
                     double rtol) {
  std::size_t worst = 0, bad = 0;
  double worst_ratio = -1.0;
  for (std::size_t k = 0; k < want.size(); ++k) {
    const double err = std::fabs(double(got[k]) - want[k]), bound = atol + rtol * std::fabs(want[k]);
    const double ratio = std::isnan(err) ? INFINITY : err / bound;
    if (ratio > 1.0) ++bad;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = k;
    }
  }
  std::printf("  %-10s %s: %zu of %zu outside tolerance; worst [%zu] got %.6g want %.6g\n", what,
              bad ? "FAIL" : "ok", bad, want.size(), worst, want.empty() ? 0.0 : double(got[worst]),
              want.empty() ? 0.0 : want[worst]);
  return bad == 0;
}

// Median milliseconds of launch() over `repeat` runs after `warmup`, by CUDA events.
inline float time_ms(const std::function<void()>& launch, int warmup = 5, int repeat = 50) {
  for (int i = 0; i < warmup; ++i) launch();
  CUDA_CHECK(cudaGetLastError());
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> samples;
  for (int i = 0; i < repeat; ++i) {
    CUDA_CHECK(cudaEventRecord(start));
    launch();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(ms);
  }
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return samples[samples.size() / 2];
}

// Device-to-device copy bandwidth (bytes read + written per second) on a
// buffer of `bytes`: the roof the memory-bound kernels are compared with.
inline double copy_gbs(std::size_t bytes) {
  void *a = nullptr, *b = nullptr;
  CUDA_CHECK(cudaMalloc(&a, bytes));
  CUDA_CHECK(cudaMalloc(&b, bytes));
  const float ms = time_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 3, 20);
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));
  return 2.0 * double(bytes) / (ms * 1e6);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// 8 bfloat16 in one 16-byte word, to and from float: the vectorised kernels'
// loads and stores.
__device__ __forceinline__ void unpack8(const uint4& u, float (&v)[8]) {
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(h[j]);
}

__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  uint4 u;
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = __float2bfloat16(v[j]);
  return u;
}

// Which versions to run: all (argv[1] absent or "all") or the one named.
inline bool wanted(int argc, char** argv, int version) {
  return argc < 2 || std::string_view(argv[1]) == "all" || std::atoi(argv[1]) == version;
}

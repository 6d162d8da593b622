// AdamW on one flat float32 buffer (params, grads, exp_avg, exp_avg_sq: 28
// bytes moved per parameter), laid out as llm.c's dev/cuda: a float64 CPU
// reference, numbered kernel versions, and a driver that validates every
// version against the reference before timing it.
//
// version 0  what zerofuse ships (zerofuse::adam_step, cuda/adam.cu): 16K-element
//            chunks per 512-thread block from a segment table, float4 accesses
// version 1  one element per thread: the naive baseline
// version 2  float4 accesses, a grid-stride loop over a grid of 4 blocks per SM
// version 3  version 2 with two float4 per thread per iteration (more bytes in
//            flight) and streaming (evict-first) loads and stores, since nothing
//            is read twice
//
//   ./dev_adam [version|all] [params]      (default: all versions, 1e9 params)
// Inputs are generated on the GPU from a hash; the reference re-derives the
// ~1e6 elements it checks on the host, so no 28 GB copy is needed.
#include <zerofuse/zerofuse.h>

#include "common.cuh"

struct Hyper {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  int step = 7;
};

struct Coefficients {  // the per-step constants every version derives the same way
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt;
};

Coefficients coefficients(const Hyper& h) {
  const double bc1 = 1.0 - std::pow(double(h.beta1), h.step), bc2 = 1.0 - std::pow(double(h.beta2), h.step);
  return {h.beta1, float(1.0 - h.beta1), h.beta2, float(1.0 - h.beta2), h.eps,
          float(1.0 - double(h.lr) * h.weight_decay), float(h.lr / bc1), float(std::sqrt(bc2))};
}

__device__ __forceinline__ void adam_element(float& p, float g, float& m, float& v, const Coefficients& k) {
  m = k.beta1 * m + k.one_minus_beta1 * g;
  v = k.beta2 * v + k.one_minus_beta2 * g * g;
  p = p * k.decay - k.step_size * (m / (sqrtf(v) / k.bc2_sqrt + k.eps));
}

// --- version 1 -------------------------------------------------------------------------------------

__global__ void adam_v1(float* p, const float* g, float* m, float* v, std::int64_t n, Coefficients k) {
  const std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (i < n) adam_element(p[i], g[i], m[i], v[i], k);
}

// --- versions 2 and 3 --------------------------------------------------------------------------------

__device__ __forceinline__ void adam4(float4& p, const float4& g, float4& m, float4& v, const Coefficients& k) {
  adam_element(p.x, g.x, m.x, v.x, k);
  adam_element(p.y, g.y, m.y, v.y, k);
  adam_element(p.z, g.z, m.z, v.z, k);
  adam_element(p.w, g.w, m.w, v.w, k);
}

// The last n % 4 elements, by the first threads of the grid.
__device__ __forceinline__ void adam_tail(float* p, const float* g, float* m, float* v, std::int64_t n,
                                          const Coefficients& k) {
  const std::int64_t i = n / 4 * 4 + blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (i < n) adam_element(p[i], g[i], m[i], v[i], k);
}

__global__ void adam_v2(float* p, const float* g, float* m, float* v, std::int64_t n, Coefficients k) {
  const std::int64_t n4 = n / 4;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    float4 pv = reinterpret_cast<float4*>(p)[i], mv = reinterpret_cast<float4*>(m)[i],
           vv = reinterpret_cast<float4*>(v)[i];
    const float4 gv = reinterpret_cast<const float4*>(g)[i];
    adam4(pv, gv, mv, vv, k);
    reinterpret_cast<float4*>(p)[i] = pv;
    reinterpret_cast<float4*>(m)[i] = mv;
    reinterpret_cast<float4*>(v)[i] = vv;
  }
  adam_tail(p, g, m, v, n, k);
}

__global__ void adam_v3(float* p, const float* g, float* m, float* v, std::int64_t n, Coefficients k) {
  const std::int64_t n4 = n / 4, stride = std::int64_t(gridDim.x) * blockDim.x;
  float4* p4 = reinterpret_cast<float4*>(p);
  float4* m4 = reinterpret_cast<float4*>(m);
  float4* v4 = reinterpret_cast<float4*>(v);
  const float4* g4 = reinterpret_cast<const float4*>(g);
  std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  for (; i + stride < n4; i += 2 * stride) {  // two independent float4 per thread in flight
    float4 pa = __ldcs(p4 + i), pb = __ldcs(p4 + i + stride);
    const float4 ga = __ldcs(g4 + i), gb = __ldcs(g4 + i + stride);
    float4 ma = __ldcs(m4 + i), mb = __ldcs(m4 + i + stride);
    float4 va = __ldcs(v4 + i), vb = __ldcs(v4 + i + stride);
    adam4(pa, ga, ma, va, k);
    adam4(pb, gb, mb, vb, k);
    __stcs(p4 + i, pa);
    __stcs(p4 + i + stride, pb);
    __stcs(m4 + i, ma);
    __stcs(m4 + i + stride, mb);
    __stcs(v4 + i, va);
    __stcs(v4 + i + stride, vb);
  }
  if (i < n4) {
    float4 pv = __ldcs(p4 + i), mv = __ldcs(m4 + i), vv = __ldcs(v4 + i);
    adam4(pv, __ldcs(g4 + i), mv, vv, k);
    __stcs(p4 + i, pv);
    __stcs(m4 + i, mv);
    __stcs(v4 + i, vv);
  }
  adam_tail(p, g, m, v, n, k);
}

// --- the driver ----------------------------------------------------------------------------------------

struct Buffers {
  std::int64_t n;
  float *p, *g, *m, *v;
};

constexpr std::uint32_t kSeedP = 11, kSeedG = 12, kSeedM = 13, kSeedV = 14;

void reset(const Buffers& b) {  // the same inputs before every version
  fill_hashed<float><<<4096, 256>>>(b.p, b.n, kSeedP, 1.0f, 0.0f);
  fill_hashed<float><<<4096, 256>>>(b.g, b.n, kSeedG, 1.0f, 0.0f);
  fill_hashed<float><<<4096, 256>>>(b.m, b.n, kSeedM, 0.1f, 0.0f);
  fill_hashed<float><<<4096, 256>>>(b.v, b.n, kSeedV, 0.005f, 0.005f);  // exp_avg_sq >= 0
  CUDA_CHECK(cudaGetLastError());
}

bool launch(int version, const Buffers& b, const Hyper& h, int sms) {
  const Coefficients k = coefficients(h);
  switch (version) {
    case 0: {
      using zerofuse::DType;
      using zerofuse::TensorView;
      const auto dev = zerofuse::Device::cuda(0);
      zerofuse::AdamConfig c;
      c.lr = h.lr;
      c.beta1 = h.beta1;
      c.beta2 = h.beta2;
      c.eps = h.eps;
      c.weight_decay = h.weight_decay;
      c.adam_w_mode = true;
      c.step = h.step;
      zerofuse::adam_step(TensorView::contiguous(b.p, DType::Float32, {b.n}, dev),
                          TensorView::contiguous(b.g, DType::Float32, {b.n}, dev),
                          TensorView::contiguous(b.m, DType::Float32, {b.n}, dev),
                          TensorView::contiguous(b.v, DType::Float32, {b.n}, dev), nullptr, c);
      return true;
    }
    case 1:
      adam_v1<<<unsigned((b.n + 255) / 256), 256>>>(b.p, b.g, b.m, b.v, b.n, k);
      return true;
    case 2:
      adam_v2<<<4 * sms, 512>>>(b.p, b.g, b.m, b.v, b.n, k);
      return true;
    case 3:
      adam_v3<<<4 * sms, 512>>>(b.p, b.g, b.m, b.v, b.n, k);
      return true;
    default:
      return false;
  }
}

// Indices checked: a stride through the buffer plus both ends (the vector tails).
std::vector<std::int64_t> checked_indices(std::int64_t n) {
  std::vector<std::int64_t> idx;
  const std::int64_t stride = std::max<std::int64_t>(1, n / 1'000'000);
  for (std::int64_t i = 0; i < n; i += stride) idx.push_back(i);
  for (std::int64_t i = std::max<std::int64_t>(0, n - 64); i < n; ++i) idx.push_back(i);
  return idx;
}

__global__ void gather(const float* src, const std::int64_t* idx, float* out, std::int64_t count) {
  const std::int64_t k = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (k < count) out[k] = src[idx[k]];
}

// The checked elements of a device buffer, gathered on the device and copied once.
std::vector<float> gathered(const float* src, const std::vector<std::int64_t>& idx) {
  std::int64_t* d_idx = nullptr;
  float* d_out = nullptr;
  const std::int64_t count = std::int64_t(idx.size());
  CUDA_CHECK(cudaMalloc(&d_idx, sizeof(std::int64_t) * idx.size()));
  CUDA_CHECK(cudaMalloc(&d_out, sizeof(float) * idx.size()));
  CUDA_CHECK(cudaMemcpy(d_idx, idx.data(), sizeof(std::int64_t) * idx.size(), cudaMemcpyHostToDevice));
  gather<<<unsigned((count + 255) / 256), 256>>>(src, d_idx, d_out, count);
  CUDA_CHECK(cudaGetLastError());
  std::vector<float> out = to_host(d_out, count);
  CUDA_CHECK(cudaFree(d_idx));
  CUDA_CHECK(cudaFree(d_out));
  return out;
}

bool check(const Buffers& b, const Hyper& h, const std::vector<std::int64_t>& idx) {
  const std::vector<float> got_p = gathered(b.p, idx), got_m = gathered(b.m, idx), got_v = gathered(b.v, idx);
  std::vector<double> want_p, want_m, want_v;
  const double bc1 = 1.0 - std::pow(double(h.beta1), h.step), bc2 = 1.0 - std::pow(double(h.beta2), h.step);
  for (std::int64_t i : idx) {
    // The inputs, re-derived exactly as fill_hashed made them (float32 values).
    const double p0 = float(1.0f * hashed_uniform(i, kSeedP)), g = float(1.0f * hashed_uniform(i, kSeedG));
    const double m0 = float(0.1f * hashed_uniform(i, kSeedM)), v0 = float(0.005f + 0.005f * hashed_uniform(i, kSeedV));
    const double m1 = h.beta1 * m0 + (1.0 - h.beta1) * g, v1 = h.beta2 * v0 + (1.0 - h.beta2) * g * g;
    want_m.push_back(m1);
    want_v.push_back(v1);
    want_p.push_back(p0 * (1.0 - double(h.lr) * h.weight_decay) -
                     (h.lr / bc1) * m1 / (std::sqrt(v1) / std::sqrt(bc2) + h.eps));
  }
  const bool ok_p = validate("param", got_p, want_p, 1e-6, 1e-5);
  const bool ok_m = validate("exp_avg", got_m, want_m, 1e-7, 1e-5);
  const bool ok_v = validate("exp_avg_sq", got_v, want_v, 1e-9, 1e-5);
  return ok_p && ok_m && ok_v;
}

int main(int argc, char** argv) {
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  const std::int64_t n = argc >= 3 ? std::atoll(argv[2]) : 1'000'000'000;
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  Buffers b{n};
  for (float** buf : {&b.p, &b.g, &b.m, &b.v}) CUDA_CHECK(cudaMalloc(buf, sizeof(float) * std::size_t(n)));
  const Hyper h;
  const std::vector<std::int64_t> idx = checked_indices(n);
  const double bytes = 28.0 * double(n);
  const double roof = copy_gbs(std::size_t(std::min<double>(bytes / 2, 8e9)));
  std::printf("AdamW flat fp32, %lld params (%.1f GB moved per step): copy roof %.0f GB/s\n",
              static_cast<long long>(n), bytes / 1e9, roof);
  int failures = 0;
  for (int version = 0; version <= 3; ++version) {
    if (!wanted(argc, argv, version)) continue;
    reset(b);
    launch(version, b, h, sms);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    std::printf("version %d:\n", version);
    if (!check(b, h, idx)) {
      ++failures;
      continue;  // a wrong kernel is not timed
    }
    // Timed on the updated buffers: the values drift, the memory traffic does not.
    const float ms = time_ms([&] { launch(version, b, h, sms); }, 2, 10);
    const double gbs = bytes / (ms * 1e6);
    std::printf("  %.3f ms  %.0f GB/s  %.0f%% of copy\n", ms, gbs, 100.0 * gbs / roof);
  }
  for (float* buf : {b.p, b.g, b.m, b.v}) CUDA_CHECK(cudaFree(buf));
  return failures == 0 ? 0 : 1;
}

// Times zerofuse's kernels from C++ (no Python): the CPU kernels with a wall
// clock, and -- in a CUDA build with a GPU present -- the CUDA kernels with CUDA
// events on the device's own buffers. Median of repeated calls.
//   ./zerofuse_bench_kernels [adam_params] [layernorm_rows] [layernorm_width]
#include <zerofuse/zerofuse.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#ifdef ZEROFUSE_BENCH_CUDA
#include <cuda_runtime.h>
#endif

using zerofuse::DType;
using zerofuse::TensorView;

namespace {

double median_ms(const std::function<void()>& fn, int repeat = 20) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> samples;
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    samples.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return samples[samples.size() / 2];
}

#ifdef ZEROFUSE_BENCH_CUDA
double median_ms_cuda(const std::function<void()>& fn, int repeat = 50) {
  for (int i = 0; i < 5; ++i) fn();
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> samples;
  for (int i = 0; i < repeat; ++i) {
    cudaEventRecord(start);
    fn();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    samples.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return samples[samples.size() / 2];
}

void bench_cuda(std::int64_t n, std::int64_t rows, std::int64_t width) {
  if (zerofuse::cuda_device_count() == 0) {
    std::printf("CUDA: %s -- GPU kernels not timed\n", zerofuse::cuda_status().c_str());
    return;
  }
  const zerofuse::Device dev = zerofuse::Device::cuda(0);
  float *p, *g, *m, *v;
  for (float** b : {&p, &g, &m, &v}) {
    cudaMalloc(reinterpret_cast<void**>(b), n * sizeof(float));
    cudaMemset(*b, 0, n * sizeof(float));
  }
  auto flat = [&](float* b) { return TensorView::contiguous(b, DType::Float32, {n}, dev); };
  zerofuse::AdamConfig cfg;
  const double adam = median_ms_cuda([&] { zerofuse::adam_step(flat(p), flat(g), flat(m), flat(v), nullptr, cfg); });
  std::printf("CUDA adam_step  %10lld params  %8.3f ms  %7.1f GB/s (28 B/param)\n", static_cast<long long>(n), adam,
              28.0 * n / adam / 1e6);
  void *x, *y, *mean, *rstd;
  const std::size_t bytes = std::size_t(rows * width) * 2;  // bfloat16
  cudaMalloc(&x, bytes);
  cudaMalloc(&y, bytes);
  cudaMemset(x, 0, bytes);
  cudaMalloc(&mean, rows * sizeof(float));
  cudaMalloc(&rstd, rows * sizeof(float));
  const TensorView xv = TensorView::contiguous(x, DType::BFloat16, {rows, width}, dev);
  const TensorView yv = TensorView::contiguous(y, DType::BFloat16, {rows, width}, dev);
  const TensorView mv = TensorView::contiguous(mean, DType::Float32, {rows}, dev);
  const TensorView rv = TensorView::contiguous(rstd, DType::Float32, {rows}, dev);
  const double ln = median_ms_cuda([&] { zerofuse::layernorm_forward(xv, nullptr, nullptr, 1e-5f, yv, mv, rv); });
  std::printf("CUDA layernorm fwd bf16 %lld x %lld  %8.4f ms  %7.1f GB/s\n", static_cast<long long>(rows),
              static_cast<long long>(width), ln, 2.0 * bytes / ln / 1e6);
  for (void* b : {static_cast<void*>(p), static_cast<void*>(g), static_cast<void*>(m), static_cast<void*>(v), x, y,
                  mean, rstd})
    cudaFree(b);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 10'000'000;
  const std::int64_t rows = argc > 2 ? std::atoll(argv[2]) : 16384;
  const std::int64_t width = argc > 3 ? std::atoll(argv[3]) : 768;
  std::printf("zerofuse %s, CPU kernels %s, %d threads\n", zerofuse::build_info().version.c_str(),
              zerofuse::build_info().cpu_isa.c_str(), zerofuse::num_threads());

  std::vector<float> p(n, 1.0f), g(n, 0.5f), m(n, 0.0f), v(n, 0.0f);
  auto flat = [&](std::vector<float>& b) { return TensorView::contiguous(b.data(), DType::Float32, {n}); };
  zerofuse::AdamConfig cfg;
  const double adam = median_ms([&] { zerofuse::adam_step(flat(p), flat(g), flat(m), flat(v), nullptr, cfg); });
  std::printf("adam_step       %10lld params  %8.3f ms  %6.1f GB/s (28 B/param)\n", static_cast<long long>(n), adam,
              28.0 * n / adam / 1e6);

  std::vector<float> x(rows * width, 1.0f), y(rows * width), mean(rows), rstd(rows), dx(rows * width),
      dw(width), db(width), w(width, 1.0f);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i % 97) * 0.01f;
  const TensorView xv = TensorView::contiguous(x.data(), DType::Float32, {rows, width});
  const TensorView yv = TensorView::contiguous(y.data(), DType::Float32, {rows, width});
  const TensorView dxv = TensorView::contiguous(dx.data(), DType::Float32, {rows, width});
  const TensorView wv = TensorView::contiguous(w.data(), DType::Float32, {width});
  const TensorView dwv = TensorView::contiguous(dw.data(), DType::Float32, {width});
  const TensorView dbv = TensorView::contiguous(db.data(), DType::Float32, {width});
  const TensorView mv = TensorView::contiguous(mean.data(), DType::Float32, {rows});
  const TensorView rv = TensorView::contiguous(rstd.data(), DType::Float32, {rows});
  const double fwd = median_ms([&] { zerofuse::layernorm_forward(xv, &wv, nullptr, 1e-5f, yv, mv, rv); });
  const double bwd = median_ms([&] { zerofuse::layernorm_backward(yv, xv, &wv, mv, rv, dxv, &dwv, &dbv); });
  std::printf("layernorm fwd   %6lld x %-6lld  %8.3f ms  %6.1f GB/s\n", static_cast<long long>(rows),
              static_cast<long long>(width), fwd, 8.0 * rows * width / fwd / 1e6);
  std::printf("layernorm bwd   %6lld x %-6lld  %8.3f ms  %6.1f GB/s\n", static_cast<long long>(rows),
              static_cast<long long>(width), bwd, 12.0 * rows * width / bwd / 1e6);
#ifdef ZEROFUSE_BENCH_CUDA
  bench_cuda(n, rows, width);
#endif
  return 0;
}

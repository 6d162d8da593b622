// Times zerofuse's CPU kernels from C++ (no Python): median of repeated calls.
//   ./zerofuse_bench_kernels [adam_params] [layernorm_rows] [layernorm_width]
#include <zerofuse/zerofuse.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

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
  return 0;
}

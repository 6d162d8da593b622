// Using zerofuse's core from C++ on your own buffers: a LayerNorm forward, then
// Adam steps with loss scaling that fit a linear model to the normalised data.
// Exits non-zero if a result is wrong, so it doubles as a smoke test.
#include <zerofuse/zerofuse.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using zerofuse::DType;
using zerofuse::TensorView;

int main() {
  const zerofuse::BuildInfo info = zerofuse::build_info();
  std::printf("zerofuse %s (CPU kernels: %s, CUDA: %s)\n", info.version.c_str(), info.cpu_isa.c_str(),
              info.cuda ? zerofuse::cuda_status().c_str() : "not built");

  // 1. LayerNorm of 64 rows of width 96, no affine parameters.
  const std::int64_t rows = 64, width = 96;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  std::vector<float> x(rows * width), y(rows * width), mean(rows), rstd(rows);
  for (float& v : x) v = normal(rng);
  zerofuse::layernorm_forward(TensorView::contiguous(x.data(), DType::Float32, {rows, width}), nullptr, nullptr,
                              1e-5f, TensorView::contiguous(y.data(), DType::Float32, {rows, width}),
                              TensorView::contiguous(mean.data(), DType::Float32, {rows}),
                              TensorView::contiguous(rstd.data(), DType::Float32, {rows}));
  double worst_mean = 0.0;
  for (std::int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (std::int64_t c = 0; c < width; ++c) s += y[r * width + c];
    worst_mean = std::max(worst_mean, std::fabs(s / width));
  }
  std::printf("layernorm: largest row mean after normalisation %.2e\n", worst_mean);
  if (worst_mean > 1e-5) return 1;

  // 2. Fit w so that y_row . w = target_row, with Adam and a dynamic loss scale.
  std::vector<float> w(width, 0.0f), grad(width), m(width, 0.0f), v(width, 0.0f), target(rows);
  for (std::int64_t r = 0; r < rows; ++r) target[r] = float(r % 7) - 3.0f;
  auto view = [&](std::vector<float>& b) { return TensorView::contiguous(b.data(), DType::Float32, {width}); };
  zerofuse::LossScaler scaler = zerofuse::LossScaler::dynamic({/*initial_scale_power=*/8});
  zerofuse::AdamConfig adam;
  adam.lr = 0.05;
  float loss = 0.0f, first_loss = -1.0f;
  std::int64_t updates = 0;  // Adam's step count: skipped steps do not count
  std::vector<float> stats(2);
  for (int step = 1; step <= 300; ++step) {
    // Scaled gradient of the mean squared error, as fp16 training would produce.
    loss = 0.0f;
    std::fill(grad.begin(), grad.end(), 0.0f);
    for (std::int64_t r = 0; r < rows; ++r) {
      float pred = 0.0f;
      for (std::int64_t c = 0; c < width; ++c) pred += y[r * width + c] * w[c];
      const float err = pred - target[r];
      loss += err * err / rows;
      for (std::int64_t c = 0; c < width; ++c) grad[c] += float(scaler.loss_scale()) * 2.0f * err * y[r * width + c] / rows;
    }
    if (first_loss < 0) first_loss = loss;
    zerofuse::grad_stats({view(grad)}, TensorView::contiguous(stats.data(), DType::Float32, {2}));
    if (scaler.update(/*overflow=*/stats[1] != 0.0f)) continue;  // skipped step
    adam.step = ++updates;
    adam.inv_scale = 1.0 / scaler.loss_scale();
    zerofuse::adam_step(view(w), view(grad), view(m), view(v), nullptr, adam);
  }
  std::printf("adam: loss %.4f -> %.6f after 300 steps (loss scale %.0f)\n", first_loss, loss, scaler.loss_scale());
  return loss < 1e-3f * first_loss ? 0 : 1;
}

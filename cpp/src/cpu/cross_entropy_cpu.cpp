// CPU softmax cross-entropy. Forward: one pass per row with an online max and
// sum (blocks of 64 logits: the block's max, then its exponentials against
// the running max, rescaling the running sum when the max grows). Backward:
// one pass writing the gradient, which may overwrite the logits in place.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/convert.h"
#include "cpu/fast_math.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

constexpr std::int64_t kBlock = 512;  // logits per online-softmax block (2 KiB on the stack)

template <typename T>
void forward_typed(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& c,
                   const TensorView& loss, const TensorView& lse) {
  const std::int64_t n = logits.shape[0], v = logits.shape[1];
  const T* x = logits.data_as<const T>();
  const std::int64_t* t = target.data_as<const std::int64_t>();
  float* loss_out = loss.data_as<float>();
  float* lse_out = lse.data_as<float>();
  const float smoothing = float(c.label_smoothing);
  const bool slice = c.vocab_total > 0;  // tensor parallelism: see cross_entropy.h
  const float classes = float(slice ? c.vocab_total : v);
  detail::parallel_for(n, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(v, 1)),
                       [&](std::int64_t r0, std::int64_t r1, int) {
    float block[kBlock];
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* __restrict row = x + r * v;
      float m = -std::numeric_limits<float>::infinity(), s = 0.0f, total = 0.0f;
      for (std::int64_t j0 = 0; j0 < v; j0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, v - j0);
        for (std::int64_t j = 0; j < nb; ++j) block[j] = to_float(row[j0 + j]);
        // Separate passes: a max folded into this loop kept all three scalar.
        const float block_max = max_of(block, nb);
        float block_total = 0.0f;
#pragma omp simd reduction(+ : block_total)
        for (std::int64_t j = 0; j < nb; ++j) block_total += block[j];
        total += block_total;
        if (block_max > m) {
          s *= exp_approx(m - block_max);  // 0 on the first block (m = -inf)
          m = block_max;
        }
        float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
        for (std::int64_t j = 0; j < nb; ++j) block_sum += exp_approx(block[j] - m);
        s += block_sum;
      }
      const float row_lse = m + std::log(s);
      lse_out[r] = row_lse;
      const std::int64_t tr = t[r];
      if (tr == c.ignore_index) {
        loss_out[r] = 0.0f;
        continue;
      }
      const std::int64_t lt = tr - c.vocab_start;  // the target's column in this slice, if it is here
      const float target_term = (lt >= 0 && lt < v) ? (1.0f - smoothing) * to_float(row[lt]) : 0.0f;
      loss_out[r] = (slice ? 0.0f : row_lse) - target_term - smoothing * total / classes;
    }
  });
}

template <typename T>
void backward_typed(const TensorView& logits, const TensorView& target, const TensorView& lse,
                    const TensorView& grad, const CrossEntropyConfig& c, const TensorView& dlogits) {
  const std::int64_t n = logits.shape[0], v = logits.shape[1];
  const T* x = logits.data_as<const T>();
  T* dx = dlogits.data_as<T>();  // may be x itself: each element is read before it is written
  const std::int64_t* t = target.data_as<const std::int64_t>();
  const float* lse_in = lse.data_as<const float>();
  const float* g = grad.data_as<const float>();
  const bool per_row = grad.numel() == n && n != 1;
  const float smoothing = float(c.label_smoothing);
  const float uniform = smoothing / float(c.vocab_total > 0 ? c.vocab_total : v);
  detail::parallel_for(n, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(v, 1)),
                       [&](std::int64_t r0, std::int64_t r1, int) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * v;
      T* out = dx + r * v;
      const std::int64_t tr = t[r];
      const float gr = per_row ? g[r] : g[0];
      if (tr == c.ignore_index) {
        for (std::int64_t j = 0; j < v; ++j) out[j] = from_float<T>(0.0f);
        continue;
      }
      const float row_lse = lse_in[r];
      const std::int64_t lt = tr - c.vocab_start;  // the target's column in this slice, if it is here
      const bool here = lt >= 0 && lt < v;
      const float target_logit = here ? to_float(row[lt]) : 0.0f;  // read before an in-place write replaces it
      for (std::int64_t j = 0; j < v; ++j)
        out[j] = from_float<T>(gr * (exp_approx(to_float(row[j]) - row_lse) - uniform));
      if (here) out[lt] = from_float<T>(gr * (exp_approx(target_logit - row_lse) - uniform - (1.0f - smoothing)));
    }
  });
}

}  // namespace

void cross_entropy_forward(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& config,
                           const TensorView& loss, const TensorView& lse) {
  dispatch_float(logits.dtype, [&](auto tag) { forward_typed<decltype(tag)>(logits, target, config, loss, lse); });
}

void cross_entropy_backward(const TensorView& logits, const TensorView& target, const TensorView& lse,
                            const TensorView& grad, const CrossEntropyConfig& config, const TensorView& dlogits) {
  dispatch_float(logits.dtype,
                 [&](auto tag) { backward_typed<decltype(tag)>(logits, target, lse, grad, config, dlogits); });
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA

// CPU Adam/AdamW: one pass over every element, threads over contiguous ranges of
// the concatenated tensors (so 148 small tensors balance as well as one flat one).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/adam_math.h"
#include "cpu/convert.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

struct NoCopy {};

// Everything a call's elements share; see common/adam_math.h.
struct AdamCoefficients {
  float grad_multiplier;  // inv_scale * clip_coef * the optional device multiplier, rounded once
  detail::AdamConstants constants;
  detail::AdamStepCoefficients step;
};

AdamCoefficients coefficients(const AdamConfig& c) {
  // On the CPU the device scalars are plain memory: read them here, once.
  double multiplier = c.inv_scale * c.clip_coef;
  if (c.grad_multiplier.data != nullptr) multiplier *= *static_cast<const float*>(c.grad_multiplier.data);
  const double lr = c.lr_tensor.data != nullptr ? *static_cast<const double*>(c.lr_tensor.data) : c.lr;
  const double step = c.step_tensor.data != nullptr ? *static_cast<const double*>(c.step_tensor.data) : double(c.step);
  return {float(multiplier), detail::adam_constants(c),
          detail::adam_step_coefficients(lr, step, c.beta1, c.beta2, c.weight_decay, c.adam_w_mode,
                                         c.bias_correction)};
}

ZF_FORCE_INLINE void adam_element(float& p, float g, float& m, float& v, const AdamCoefficients& k) {
  detail::adam_update(p, g, m, v, k.grad_multiplier, k.constants, k.step);
}

// float16 operands are converted a block at a time by to_float_row /
// from_float_row (AVX2/F16C): converting element by element does not
// vectorise, and float16 gradients made a step 2.9x slower than bfloat16 ones.
template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, Half>;

template <typename P, typename G, typename S, typename C>
void adam_range(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
                S* __restrict exp_avg_sq, C* __restrict copy, std::int64_t n,
                const AdamCoefficients& k) {
  constexpr bool kHasCopy = !std::is_same_v<C, NoCopy>;
  if constexpr (kIsHalf<P> || kIsHalf<G> || kIsHalf<S> || kIsHalf<C>) {
    constexpr std::int64_t kBlock = 256;
    float p[kBlock], g[kBlock], m[kBlock], v[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const std::int64_t len = std::min(kBlock, n - i0);
      to_float_row(param + i0, p, len);
      to_float_row(grad + i0, g, len);
      to_float_row(exp_avg + i0, m, len);
      to_float_row(exp_avg_sq + i0, v, len);
#pragma omp simd
      for (std::int64_t i = 0; i < len; ++i) adam_element(p[i], g[i], m[i], v[i], k);
      from_float_row(p, param + i0, len);
      from_float_row(m, exp_avg + i0, len);
      from_float_row(v, exp_avg_sq + i0, len);
      if constexpr (kHasCopy) from_float_row(p, copy + i0, len);
    }
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      float p = to_float(param[i]), m = to_float(exp_avg[i]), v = to_float(exp_avg_sq[i]);
      adam_element(p, to_float(grad[i]), m, v, k);
      exp_avg[i] = from_float<S>(m);
      exp_avg_sq[i] = from_float<S>(v);
      param[i] = from_float<P>(p);
      if constexpr (kHasCopy) copy[i] = from_float<C>(p);
    }
  }
}

template <typename P, typename G, typename S, typename C>
void run_typed(const AdamTensorLists& t, const AdamCoefficients& k) {
  const std::size_t count = t.params.size();
  std::vector<std::int64_t> starts(count + 1, 0);  // prefix sums of numel
  for (std::size_t i = 0; i < count; ++i) starts[i + 1] = starts[i] + t.params[i].numel();

  // Elements [begin, end) of the concatenation, tensor by tensor.
  auto range = [&](std::int64_t begin, std::int64_t end, int) {
    std::size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; i < count && starts[i] < end; ++i) {
      const std::int64_t lo = std::max(begin, starts[i]) - starts[i];
      const std::int64_t hi = std::min(end, starts[i + 1]) - starts[i];
      if (hi <= lo) continue;
      C* copy = nullptr;  // C is NoCopy exactly when there are no copies
      if constexpr (!std::is_same_v<C, NoCopy>) copy = t.param_copies[i].data_as<C>() + lo;
      adam_range<P, G, S, C>(t.params[i].data_as<P>() + lo, t.grads[i].data_as<const G>() + lo,
                             t.exp_avgs[i].data_as<S>() + lo, t.exp_avg_sqs[i].data_as<S>() + lo,
                             copy, hi - lo, k);
    }
  };
  detail::parallel_for(starts[count], 1 << 15, range);
}

}  // namespace

void adam_step_multi(const AdamTensorLists& t, const AdamConfig& config) {
  if (t.params.empty()) return;
  if (config.skip_if_nonzero.data != nullptr &&
      *static_cast<const float*>(config.skip_if_nonzero.data) != 0.0f)
    return;
  const AdamCoefficients k = coefficients(config);
  const DType param_dtype = t.params[0].dtype;
  const DType grad_dtype = t.grads[0].dtype;
  const DType state_dtype = t.exp_avgs[0].dtype;

  if (param_dtype == DType::Float32) {
    // float32 master params: grads of any float dtype, optional low-precision copy.
    dispatch_float(grad_dtype, [&](auto g) {
      using G = decltype(g);
      if (t.param_copies.empty()) {
        run_typed<float, G, float, NoCopy>(t, k);
      } else {
        dispatch_float(t.param_copies[0].dtype, [&](auto c) {
          using C = decltype(c);
          if constexpr (!std::is_same_v<C, float>) run_typed<float, G, float, C>(t, k);
        });
      }
    });
    return;
  }
  // Low-precision params: grads of the param dtype, states of that dtype or float32.
  dispatch_float(param_dtype, [&](auto p) {
    using P = decltype(p);
    if constexpr (!std::is_same_v<P, float>) {
      if (state_dtype == DType::Float32)
        run_typed<P, P, float, NoCopy>(t, k);
      else
        run_typed<P, P, P, NoCopy>(t, k);
    }
  });
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA

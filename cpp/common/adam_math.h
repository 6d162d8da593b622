// Adam/AdamW arithmetic shared by the CPU kernel (cpp/src/cpu/adam_cpu.cpp)
// and the CUDA kernel (cuda/adam.cu), so the two devices compute the same
// numbers: the per-element update of zerofuse/adam.h and the coefficients that
// change with the step count and the learning rate.
#pragma once

#include <math.h>

#include "common/host_device.h"
#include "zerofuse/adam.h"

namespace zerofuse::detail {

// Constants of one call, rounded once from the double hyper-parameters.
struct AdamConstants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float eps;
  float l2;  // Adam: weight_decay (an L2 penalty in the gradient); AdamW: 0
};

inline AdamConstants adam_constants(const AdamConfig& c) {
  AdamConstants k;
  k.beta1 = float(c.beta1);
  k.one_minus_beta1 = float(1.0 - c.beta1);
  k.beta2 = float(c.beta2);
  k.one_minus_beta2 = float(1.0 - c.beta2);
  k.eps = float(c.eps);
  k.l2 = c.adam_w_mode ? 0.0f : float(c.weight_decay);
  return k;
}

// What depends on the step count and the learning rate. Either may be read
// from device memory when the kernel runs (AdamConfig::step_tensor,
// lr_tensor), so this is computed where the kernel runs -- in double, rounded
// once, on both devices alike.
struct AdamStepCoefficients {
  float decay;                  // AdamW: 1 - lr * weight_decay; Adam: 1
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

ZF_HOST_DEVICE inline AdamStepCoefficients adam_step_coefficients(double lr, double step, double beta1,
                                                                  double beta2, double weight_decay,
                                                                  bool adam_w_mode, bool bias_correction) {
  step = step > 1.0 ? step : 1.0;  // counts from 1 (a fresh device counter reads 0)
  const double bc1 = bias_correction ? 1.0 - pow(beta1, step) : 1.0;
  const double bc2 = bias_correction ? 1.0 - pow(beta2, step) : 1.0;
  AdamStepCoefficients k;
  k.decay = adam_w_mode ? float(1.0 - lr * weight_decay) : 1.0f;
  k.step_size = float(lr / bc1);
  k.bias_correction2_sqrt = float(sqrt(bc2));
  return k;
}

// One element: p, m and v updated in place from gradient g (float32 math).
ZF_HOST_DEVICE ZF_FORCE_INLINE void adam_update(float& p, float g, float& m, float& v, float grad_multiplier,
                                                const AdamConstants& c, const AdamStepCoefficients& k) {
  g = g * grad_multiplier + c.l2 * p;
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  p *= k.decay;
  p -= k.step_size * (m / (sqrtf(v) / k.bias_correction2_sqrt + c.eps));
}

}  // namespace zerofuse::detail

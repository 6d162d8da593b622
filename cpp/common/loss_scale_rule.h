// DeepSpeed's dynamic loss-scale update and the step decision as pure
// functions, shared by the host LossScaler, the CPU step control and the CUDA
// step-control kernel (hence the host/device qualifiers).
#pragma once

#include <math.h>

#include <cstdint>

#include "common/host_device.h"
#include "zerofuse/loss_scaler.h"
#include "zerofuse/step_control.h"

namespace zerofuse::detail {

// Updates `s` for one step; returns true when an overflow found the scale
// already at min_loss_scale (the step is skipped and the run goes on).
ZF_HOST_DEVICE inline bool apply_loss_scale_rule(LossScalerState& s, bool overflow,
                                                  const DynamicLossScaleConfig& c) {
  bool at_minimum = false;
  if (overflow) {
    if (c.hysteresis == 1 || s.cur_hysteresis == 1) {
      at_minimum = s.scale <= c.min_loss_scale;
      const double halved = s.scale / 2.0;
      s.scale = halved > c.min_loss_scale ? halved : c.min_loss_scale;
    } else {
      s.cur_hysteresis -= 1;
    }
    s.last_overflow_iter = s.cur_iter;
  } else {
    if (c.consecutive_hysteresis) s.cur_hysteresis = c.hysteresis;
    // Clean steps since the last overflow, minus one: the scale grows on clean
    // step window + 1, 2 * window + 1, ... (DeepSpeed's current rule).
    const std::int64_t stable_interval = s.cur_iter - s.last_overflow_iter - 1;
    if (stable_interval > 0 && stable_interval % c.loss_scale_window == 0) {
      if (!c.consecutive_hysteresis) s.cur_hysteresis = c.hysteresis;
      s.scale *= 2.0;
    }
  }
  s.cur_iter += 1;
  return at_minimum;
}

// One optimizer step's decision (see zerofuse/step_control.h): reads stats,
// updates state, writes out.
ZF_HOST_DEVICE inline void apply_step_control(const float* stats, double* state, float* out,
                                              const StepControlConfig& c) {
  const double scale = state[kStateLossScale];
  const bool overflow = stats[1] != 0.0f || !isfinite(stats[0]);
  const double norm = sqrt(double(stats[0])) / scale;
  double clip_coef = 1.0;
  if (c.max_grad_norm > 0.0 && !overflow) clip_coef = fmin(1.0, c.max_grad_norm / (norm + 1e-6));
  out[kOutGradMultiplier] = float(clip_coef / scale);
  out[kOutSkip] = overflow ? 1.0f : 0.0f;
  out[kOutGradNorm] = overflow ? NAN : float(norm);

  LossScalerState s{scale, std::int64_t(state[kStateCurIter]), std::int64_t(state[kStateLastOverflowIter]),
                    int(state[kStateCurHysteresis])};
  bool at_minimum = false;
  if (c.dynamic_loss_scale) {
    at_minimum = apply_loss_scale_rule(s, overflow, c.scaler);
  } else {
    if (overflow) s.last_overflow_iter = s.cur_iter;
    s.cur_iter += 1;
  }
  state[kStateLossScale] = s.scale;
  state[kStateCurIter] = double(s.cur_iter);
  state[kStateLastOverflowIter] = double(s.last_overflow_iter);
  state[kStateCurHysteresis] = double(s.cur_hysteresis);
  state[kStateAppliedSteps] += overflow ? 0.0 : 1.0;
  state[kStateSkippedSteps] += overflow ? 1.0 : 0.0;
  state[kStateAtMinimum] = at_minimum ? 1.0 : 0.0;
}

}  // namespace zerofuse::detail

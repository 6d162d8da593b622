// DeepSpeed's dynamic loss-scale update as one pure function, shared by the
// host LossScaler and the device-side step control (CPU now; CUDA kernels
// include it too, hence the host/device qualifiers).
#pragma once

#include <cstdint>

#include "zerofuse/loss_scaler.h"

#if defined(__CUDACC__)
#define ZF_HOST_DEVICE __host__ __device__
#else
#define ZF_HOST_DEVICE
#endif

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

}  // namespace zerofuse::detail

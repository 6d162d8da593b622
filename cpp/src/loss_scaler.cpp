#include "zerofuse/loss_scaler.h"

#include <algorithm>
#include <cmath>

#include "common/loss_scale_rule.h"
#include "zerofuse/error.h"

namespace zerofuse {

LossScaler LossScaler::dynamic(const DynamicLossScaleConfig& c) {
  const char* op = "zerofuse.DynamicLossScaler";
  // 2^127 is the largest power of two a float32 gradient multiply can use.
  if (c.initial_scale_power < 0 || c.initial_scale_power > 127)
    value_error(op, ": 'initial_scale_power' must be in [0, 127], got ", c.initial_scale_power);
  if (c.loss_scale_window < 1) value_error(op, ": 'loss_scale_window' must be >= 1, got ", c.loss_scale_window);
  if (c.hysteresis < 1) value_error(op, ": 'hysteresis' must be >= 1, got ", c.hysteresis);
  const double initial = std::ldexp(1.0, c.initial_scale_power);
  if (!(c.min_loss_scale > 0.0 && std::isfinite(c.min_loss_scale)))
    value_error(op, ": 'min_loss_scale' must be a finite number > 0, got ", c.min_loss_scale);
  if (c.min_loss_scale > initial)
    value_error(op, ": 'min_loss_scale' (", c.min_loss_scale, ") must not exceed the initial scale 2^",
                c.initial_scale_power, " = ", initial);
  LossScaler s;
  s.dynamic_ = true;
  s.config_ = c;
  s.state_ = LossScalerState{initial, 0, -1, c.hysteresis};
  return s;
}

LossScaler LossScaler::fixed(double scale) {
  if (!(scale > 0.0 && std::isfinite(scale)))
    value_error("zerofuse.StaticLossScaler: 'loss_scale' must be a finite number > 0, got ", scale);
  LossScaler s;
  s.dynamic_ = false;
  s.state_ = LossScalerState{scale, 0, -1, 1};
  return s;
}

bool LossScaler::update(bool overflow) {
  at_minimum_ = false;
  if (!dynamic_) {
    state_.cur_iter += 1;
    if (overflow) state_.last_overflow_iter = state_.cur_iter - 1;
    return overflow;
  }
  at_minimum_ = detail::apply_loss_scale_rule(state_, overflow, config_);
  return overflow;
}

void LossScaler::set_state(const LossScalerState& state) {
  const char* op = "zerofuse.LossScaler.load_state_dict";
  if (!(state.scale > 0.0 && std::isfinite(state.scale)))
    value_error(op, ": 'cur_scale' must be a finite number > 0, got ", state.scale);
  if (state.cur_iter < 0) value_error(op, ": 'cur_iter' must be >= 0, got ", state.cur_iter);
  if (state.last_overflow_iter < -1 || state.last_overflow_iter > state.cur_iter - 1)
    value_error(op, ": 'last_overflow_iter' must be in [-1, cur_iter - 1] = [-1, ", state.cur_iter - 1, "], got ",
                state.last_overflow_iter);
  if (dynamic_) {
    if (state.cur_hysteresis < 1 || state.cur_hysteresis > config_.hysteresis)
      value_error(op, ": 'cur_hysteresis' must be in [1, ", config_.hysteresis, "], got ", state.cur_hysteresis);
    if (state.scale < config_.min_loss_scale)
      value_error(op, ": 'cur_scale' (", state.scale, ") is below min_loss_scale (", config_.min_loss_scale, ")");
  }
  state_ = state;
  at_minimum_ = false;
}

}  // namespace zerofuse

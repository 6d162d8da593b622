// Loss scaling for fp16 training, with DeepSpeed's semantics.
//
// Dynamic mode: the scale starts at 2^initial_scale_power. An overflowed step is
// skipped; it first spends the hysteresis budget, and once that is used up each
// overflow halves the scale (never below min_loss_scale). Counting clean
// (non-overflowed) steps since the last overflow or the start, the scale doubles
// on clean step window + 1, 2 * window + 1, ... and the hysteresis budget is
// refilled then (as DeepSpeed's current scaler does). With consecutive_hysteresis
// the budget is refilled after every clean step.
//
// Unlike DeepSpeed, an overflow at min_loss_scale does not end the run: the step
// is skipped, the scale stays at the minimum, and at_minimum() tells the caller.
//
// Static mode: the scale never changes; an overflowed step is still skipped.
#pragma once

#include <cstdint>

namespace zerofuse {

struct DynamicLossScaleConfig {
  int initial_scale_power = 16;
  std::int64_t loss_scale_window = 1000;
  int hysteresis = 2;
  bool consecutive_hysteresis = false;
  double min_loss_scale = 1.0;
};

// Everything that changes from step to step: saving and restoring it resumes
// the scaler exactly.
struct LossScalerState {
  double scale = 1.0;
  std::int64_t cur_iter = 0;
  std::int64_t last_overflow_iter = -1;
  int cur_hysteresis = 1;
};

class LossScaler {
 public:
  static LossScaler dynamic(const DynamicLossScaleConfig& config);  // validates config
  static LossScaler fixed(double scale);                            // static mode, scale > 0

  bool is_dynamic() const { return dynamic_; }
  double loss_scale() const { return state_.scale; }
  const DynamicLossScaleConfig& config() const { return config_; }

  // Records the outcome of one step; returns true when that step must be
  // skipped (that is, when `overflow` is true).
  bool update(bool overflow);

  // True after an overflow that found the scale already at min_loss_scale.
  bool at_minimum() const { return at_minimum_; }

  const LossScalerState& state() const { return state_; }
  void set_state(const LossScalerState& state);  // validates

 private:
  LossScaler() = default;
  bool dynamic_ = false;
  DynamicLossScaleConfig config_{};
  LossScalerState state_{};
  bool at_minimum_ = false;
};

}  // namespace zerofuse

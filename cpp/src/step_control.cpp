#include "zerofuse/step_control.h"

#include <cmath>

#include "checks.h"
#include "loss_scale_rule.h"

namespace zerofuse {
namespace {

using namespace detail;

void check_config(const StepControlConfig& c, const char* op) {
  if (c.dynamic_loss_scale) LossScaler::dynamic(c.scaler);  // validates, or throws naming the field
  if (!(c.max_grad_norm >= 0.0 && std::isfinite(c.max_grad_norm)))
    value_error(op, ": 'max_grad_norm' must be a finite number >= 0 (0: no clipping), got ", c.max_grad_norm);
}

void check_vector(const TensorView& t, DType dtype, std::int64_t n, const char* op, const char* name) {
  check_dtype(t, op, name, {dtype});
  check_shape(t, op, name, {n});
  check_contiguous(t, op, name);
  check_present(t, op, name);
  check_device_supported(t, op, name);
}

// The rule itself, on host memory (the CPU "device").
void step_control_cpu(const float* stats, double* state, float* out, const StepControlConfig& c) {
  const double scale = state[kStateLossScale];
  const bool overflow = stats[1] != 0.0f || !std::isfinite(stats[0]);
  const double norm = std::sqrt(double(stats[0])) / scale;
  double clip_coef = 1.0;
  if (c.max_grad_norm > 0.0 && !overflow) clip_coef = std::fmin(1.0, c.max_grad_norm / (norm + 1e-6));
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

}  // namespace

void step_control_init(const TensorView& state, const StepControlConfig& config, double static_scale, Stream) {
  const char* op = "zerofuse.step_control_init";
  check_config(config, op);
  check_vector(state, DType::Float64, kStepStateSize, op, "state");
  if (!config.dynamic_loss_scale) LossScaler::fixed(static_scale);  // validates the scale
  const LossScaler scaler =
      config.dynamic_loss_scale ? LossScaler::dynamic(config.scaler) : LossScaler::fixed(static_scale);
  double init[kStepStateSize] = {};
  init[kStateLossScale] = scaler.loss_scale();
  init[kStateCurIter] = 0.0;
  init[kStateLastOverflowIter] = -1.0;
  init[kStateCurHysteresis] = double(scaler.state().cur_hysteresis);
  if (state.device.is_cpu()) {
    for (int i = 0; i < kStepStateSize; ++i) state.data_as<double>()[i] = init[i];
    return;
  }
  no_cuda_kernel(op);
}

void step_control(const TensorView& stats, const TensorView& state, const TensorView& out,
                  const StepControlConfig& config, Stream) {
  const char* op = "zerofuse.step_control";
  check_config(config, op);
  check_vector(stats, DType::Float32, 2, op, "stats");
  check_vector(state, DType::Float64, kStepStateSize, op, "state");
  check_vector(out, DType::Float32, kStepOutputSize, op, "out");
  check_same_device(state, op, "state", stats, "stats");
  check_same_device(out, op, "out", stats, "stats");
  if (stats.device.is_cpu()) {
    step_control_cpu(stats.data_as<const float>(), state.data_as<double>(), out.data_as<float>(), config);
    return;
  }
  no_cuda_kernel(op);
}

}  // namespace zerofuse

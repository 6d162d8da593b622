#include "zerofuse/step_control.h"

#include <cmath>

#include "checks.h"
#include "dispatch.h"
#include "common/loss_scale_rule.h"

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

}  // namespace

void step_control_init(const TensorView& state, const StepControlConfig& config, double static_scale, Stream stream) {
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
  ZF_CUDA_KERNEL(op, cuda::step_control_init(state, init, stream));
}

void step_control(const TensorView& stats, const TensorView& state, const TensorView& out,
                  const StepControlConfig& config, Stream stream) {
  const char* op = "zerofuse.step_control";
  check_config(config, op);
  check_vector(stats, DType::Float32, 2, op, "stats");
  check_vector(state, DType::Float64, kStepStateSize, op, "state");
  check_vector(out, DType::Float32, kStepOutputSize, op, "out");
  check_same_device(state, op, "state", stats, "stats");
  check_same_device(out, op, "out", stats, "stats");
  if (stats.device.is_cpu()) {
    apply_step_control(stats.data_as<const float>(), state.data_as<double>(), out.data_as<float>(), config);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::step_control(stats, state, out, config, stream));
}

}  // namespace zerofuse

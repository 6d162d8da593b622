// The optimizer step's decision, made where the gradients are (CPU or GPU) so
// a training step needs no host round trip: from the gradient statistics of
// all ranks (zerofuse/grad_stats.h, all-reduced with SUM), whether the step is
// skipped, the factor the update multiplies gradients by (loss unscale and
// global-norm clipping), and the next loss scale (DeepSpeed's rules, as
// zerofuse::LossScaler).
#pragma once

#include "zerofuse/loss_scaler.h"
#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

// Entries of the float64 state tensor. Counters are float64 so they stay exact
// far beyond any run's length.
enum StepState : int {
  kStateLossScale = 0,
  kStateCurIter,            // loss-scaler steps seen (applied or skipped)
  kStateLastOverflowIter,   // -1 before the first overflow
  kStateCurHysteresis,
  kStateAppliedSteps,       // optimizer steps applied: Adam's step count
  kStateSkippedSteps,
  kStateAtMinimum,          // 1 when the last overflow found the scale at its minimum
  kStepStateSize
};

// Entries of the float32 output tensor (what the update kernel reads).
enum StepOutput : int {
  kOutGradMultiplier = 0,  // clip_coef / loss_scale
  kOutSkip,                // 1: leave parameters and optimizer state untouched
  kOutGradNorm,            // global L2 norm of the unscaled gradients, before clipping (inf/NaN on overflow)
  kStepOutputSize
};

struct StepControlConfig {
  bool dynamic_loss_scale = false;  // false: the scale in the state never changes
  DynamicLossScaleConfig scaler{};
  double max_grad_norm = 0.0;       // 0: no clipping
};

// A fresh state for `config` (the initial scale, or `static_scale` when the
// scale is not dynamic), written into a float64 tensor of kStepStateSize.
void step_control_init(const TensorView& state, const StepControlConfig& config, double static_scale,
                       Stream stream = {});

// stats: float32 [2] (sum of squares of the scaled gradients, non-finite
// count); state: float64 [kStepStateSize], updated; out: float32
// [kStepOutputSize], written. All on one device.
void step_control(const TensorView& stats, const TensorView& state, const TensorView& out,
                  const StepControlConfig& config, Stream stream = {});

}  // namespace zerofuse

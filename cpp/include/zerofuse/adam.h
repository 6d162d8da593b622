// Adam / AdamW update, fused into one pass over memory.
//
// For every element, with g the gradient:
//   g  = g * inv_scale * clip_coef [* grad_multiplier]     (unscale + clip, same pass)
//   g += weight_decay * p                                   (Adam: L2 penalty)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g * g
//   p *= 1 - lr * weight_decay                              (AdamW: decoupled decay)
//   p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
//   param_copy = low-precision(p)                           (optional, same pass)
// which is what torch.optim.AdamW (adam_w_mode) and torch.optim.Adam compute.
#pragma once

#include <cstdint>
#include <vector>

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

// Hyper-parameters are double, as Python numbers are: derived constants such as
// 1 - beta2 are formed in double and rounded once (0.999f would make 1 - beta2
// off by 1.3e-5 relative, which shows after a few hundred steps).
struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adam_w_mode = true;      // decoupled weight decay (AdamW); false: L2 (Adam)
  bool bias_correction = true;
  std::int64_t step = 1;        // 1-based: the count including this update
  double inv_scale = 1.0;       // gradient unscale (1 / loss scale)
  double clip_coef = 1.0;       // global-norm clipping coefficient, <= 1

  // Optional values read from memory on the tensors' device when the kernel
  // runs, so that a step can be decided without a host round trip. Each is a
  // float32 tensor of one element, or has data == nullptr when unused.
  TensorView grad_multiplier;   // multiplies the gradient, on top of inv_scale * clip_coef
  TensorView skip_if_nonzero;   // when its value is not 0, nothing is written
  // A float64 tensor of one element holding the step count (replaces `step`):
  // the step-control state's applied-steps entry, so the count advances on the
  // device exactly when a step is applied.
  TensorView step_tensor;
  // A float64 tensor of one element holding the learning rate (replaces `lr`),
  // so a schedule can change it between replays of a captured CUDA graph.
  // Its value is read where the kernel runs; on a GPU it cannot be checked
  // without a host round trip, so a negative or non-finite value there is the
  // caller's to prevent (on the CPU it is checked like `lr`).
  TensorView lr_tensor;
};

// One flat buffer: param float32; grad float32/float16/bfloat16; exp_avg and
// exp_avg_sq float32; param_copy (may be null) float16/bfloat16. All the same
// shape, contiguous, on one device.
void adam_step(const TensorView& param, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const TensorView* param_copy, const AdamConfig& config,
               Stream stream = {});

// Many tensors in one call (the drop-in optimizer's path). Index i of every
// list belongs together. Params all share one dtype: float32 (grads of any
// floating dtype, states float32, optional float16/bfloat16 copies), or
// float16/bfloat16 (grads of the param dtype, states of the param dtype or
// float32, no copies). Math is float32 throughout.
struct AdamTensorLists {
  std::vector<TensorView> params;
  std::vector<TensorView> grads;
  std::vector<TensorView> exp_avgs;
  std::vector<TensorView> exp_avg_sqs;
  std::vector<TensorView> param_copies;  // empty, or one per param
};

void adam_step_multi(const AdamTensorLists& tensors, const AdamConfig& config, Stream stream = {});

}  // namespace zerofuse

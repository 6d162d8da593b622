// The CUDA kernels behind the device dispatch in cpp/src (declared here,
// defined in cuda/*.cu; compiled only when nvcc is found). Arguments are
// validated before any of these is called.
#pragma once

#include <vector>

#include "zerofuse/adam.h"
#include "zerofuse/attention.h"
#include "zerofuse/step_control.h"
#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse::cuda {

void adam_step_multi(const AdamTensorLists& tensors, const AdamConfig& config, Stream stream);
void grad_stats(const std::vector<TensorView>& grads, const TensorView& out, Stream stream);
void layernorm_forward(const TensorView& x, const TensorView* weight, const TensorView* bias, float eps,
                       const TensorView& y, const TensorView& mean, const TensorView& rstd, Stream stream);
void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight, const TensorView& mean,
                        const TensorView& rstd, const TensorView& dx, const TensorView* dweight,
                        const TensorView* dbias, Stream stream);
void step_control_init(const TensorView& state, const double* values, Stream stream);
void step_control(const TensorView& stats, const TensorView& state, const TensorView& out,
                  const StepControlConfig& config, Stream stream);
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                       const AttentionConfig& config, const TensorView& out, const TensorView& lse, Stream stream);
void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView* mask,
                        const AttentionConfig& config, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, Stream stream);

}  // namespace zerofuse::cuda

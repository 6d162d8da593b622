// The CUDA kernels behind the device dispatch in cpp/src (declared here,
// defined in cuda/*.cu; compiled only when nvcc is found). Arguments are
// validated before any of these is called.
#pragma once

#include <vector>

#include "zerofuse/adam.h"
#include "zerofuse/attention.h"
#include "zerofuse/bias_gelu.h"
#include "zerofuse/cross_entropy.h"
#include "zerofuse/masked_softmax.h"
#include "zerofuse/step_control.h"
#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse::cuda {

void adam_step_multi(const AdamTensorLists& tensors, const AdamConfig& config, Stream stream);
void grad_stats(const std::vector<TensorView>& grads, const TensorView& out, Stream stream);
void layernorm_forward(const TensorView& x, const TensorView* residual, const TensorView* weight,
                       const TensorView* bias, float eps, const TensorView* sum, const TensorView& y,
                       const TensorView& mean, const TensorView& rstd, Stream stream);
void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight, const TensorView& mean,
                        const TensorView& rstd, const TensorView* grad_sum, const TensorView& dx,
                        const TensorView* dweight, const TensorView* dbias, Stream stream);
void step_control_init(const TensorView& state, const double* values, Stream stream);
void step_control(const TensorView& stats, const TensorView& state, const TensorView& out,
                  const StepControlConfig& config, Stream stream);
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                       const AttentionConfig& config, const TensorView& out, const TensorView& lse, Stream stream);
void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView* mask,
                        const AttentionConfig& config, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, Stream stream);

void cross_entropy_forward(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& config,
                           const TensorView& loss, const TensorView& lse, Stream stream);
void cross_entropy_backward(const TensorView& logits, const TensorView& target, const TensorView& lse,
                            const TensorView& grad, const CrossEntropyConfig& config, const TensorView& dlogits,
                            Stream stream);
void bias_gelu_forward(const TensorView& x, const TensorView& bias, GeluApproximation approximate,
                       const TensorView& y, Stream stream);
void bias_gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& bias,
                        GeluApproximation approximate, const TensorView& dx, const TensorView* dbias, Stream stream);
// The mma.sync forward (attention_mma.cu): runs and returns true for float16/bfloat16,
// head_dim 64 or 128 and 16-byte aligned rows; returns false, having done nothing, otherwise.
bool attention_forward_tensor_cores(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView* mask, const AttentionConfig& config, const TensorView& out,
                                    const TensorView& lse, Stream stream);
// The mma.sync backward (attention_mma_backward.cu), taken in the same cases as
// the forward; `di` holds rowsum(dO * O) per (batch, head, query) row.
bool attention_backward_tensor_cores(const TensorView& dout, const TensorView& q, const TensorView& k,
                                     const TensorView& v, const TensorView& lse, const float* di,
                                     const TensorView* mask, const AttentionConfig& config, const TensorView& dq,
                                     const TensorView& dk, const TensorView& dv, Stream stream);
void masked_softmax_forward(const TensorView& x, const TensorView* mask, const MaskedSoftmaxConfig& config,
                            const TensorView& y, Stream stream);
void masked_softmax_backward(const TensorView& dy, const TensorView& y, float scale, const TensorView& dx,
                             Stream stream);

}  // namespace zerofuse::cuda

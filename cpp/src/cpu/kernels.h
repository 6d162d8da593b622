// The CPU kernels, declared once per instruction-set variant. Each kernel
// source is compiled once per variant (cmake/cpu_kernels.cmake) with ZF_CPU_ISA
// naming the namespace it defines; cpu_dispatch.cpp picks the variant this
// processor runs. Arguments are validated before any of these is called.
#pragma once

#include <vector>

#include "zerofuse/adam.h"
#include "zerofuse/attention.h"
#include "zerofuse/bias_gelu.h"
#include "zerofuse/cross_entropy.h"
#include "zerofuse/masked_softmax.h"
#include "zerofuse/tensor.h"

#define ZEROFUSE_DECLARE_CPU_KERNELS(isa)                                                         \
  namespace isa {                                                                                 \
  void adam_step_multi(const AdamTensorLists& tensors, const AdamConfig& config);                 \
  void grad_stats(const std::vector<TensorView>& grads, float* out);                              \
  void layernorm_forward(const TensorView& x, const TensorView* residual, const TensorView* weight,\
                         const TensorView* bias, float eps, const TensorView* sum,                \
                         const TensorView& y, const TensorView& mean, const TensorView& rstd);    \
  void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight,    \
                          const TensorView& mean, const TensorView& rstd,                         \
                          const TensorView* grad_sum, const TensorView& dx,                       \
                          const TensorView* dweight, const TensorView* dbias);                    \
  void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,           \
                         const TensorView* mask, const AttentionConfig& config,                   \
                         const TensorView& out, const TensorView& lse);                           \
  void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,       \
                          const TensorView& v, const TensorView& out, const TensorView& lse,      \
                          const TensorView* mask, const AttentionConfig& config,                  \
                          const TensorView& dq, const TensorView& dk, const TensorView& dv);      \
  void cross_entropy_forward(const TensorView& logits, const TensorView& target,                  \
                             const CrossEntropyConfig& config, const TensorView& loss,            \
                             const TensorView& lse);                                              \
  void cross_entropy_backward(const TensorView& logits, const TensorView& target,                 \
                              const TensorView& lse, const TensorView& grad,                      \
                              const CrossEntropyConfig& config, const TensorView& dlogits);       \
  void bias_gelu_forward(const TensorView& x, const TensorView& bias, GeluApproximation approx,    \
                         const TensorView& y);                                                    \
  void bias_gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& bias,      \
                          GeluApproximation approx, const TensorView& dx,                         \
                          const TensorView* dbias);                                               \
  void masked_softmax_forward(const TensorView& x, const TensorView* mask,                        \
                              const MaskedSoftmaxConfig& config, const TensorView& y);            \
  void masked_softmax_backward(const TensorView& dy, const TensorView& y, float scale,            \
                               const TensorView& dx);                                             \
  }

namespace zerofuse::cpu {

ZEROFUSE_DECLARE_CPU_KERNELS(baseline)
#if defined(__x86_64__) || defined(_M_X64)
ZEROFUSE_DECLARE_CPU_KERNELS(avx2)
#endif

// The kernels of the variant chosen for this processor.
struct Kernels {
  const char* isa;
  decltype(&baseline::adam_step_multi) adam_step_multi;
  decltype(&baseline::grad_stats) grad_stats;
  decltype(&baseline::layernorm_forward) layernorm_forward;
  decltype(&baseline::layernorm_backward) layernorm_backward;
  decltype(&baseline::attention_forward) attention_forward;
  decltype(&baseline::attention_backward) attention_backward;
  decltype(&baseline::cross_entropy_forward) cross_entropy_forward;
  decltype(&baseline::cross_entropy_backward) cross_entropy_backward;
  decltype(&baseline::bias_gelu_forward) bias_gelu_forward;
  decltype(&baseline::bias_gelu_backward) bias_gelu_backward;
  decltype(&baseline::masked_softmax_forward) masked_softmax_forward;
  decltype(&baseline::masked_softmax_backward) masked_softmax_backward;
};

const Kernels& kernels();
std::vector<const char*> compiled_isas();

}  // namespace zerofuse::cpu

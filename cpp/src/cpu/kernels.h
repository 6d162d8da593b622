// The CPU kernels, declared once per instruction-set variant. Each kernel
// source is compiled once per variant (cmake/cpu_kernels.cmake) with ZF_CPU_ISA
// naming the namespace it defines; cpu_dispatch.cpp picks the variant this
// processor runs. Arguments are validated before any of these is called.
//
// A kernel is one line of ZEROFUSE_CPU_KERNELS: its name and its type (below).
// The per-variant declarations, the table's members and each variant's table
// are all generated from that list, so a kernel cannot be declared but left
// out of the table.
#pragma once

#include <vector>

#include "zerofuse/adam.h"
#include "zerofuse/attention.h"
#include "zerofuse/bias_gelu.h"
#include "zerofuse/cross_entropy.h"
#include "zerofuse/masked_softmax.h"
#include "zerofuse/tensor.h"

namespace zerofuse::cpu {

using AdamStepMulti = void(const AdamTensorLists& tensors, const AdamConfig& config);
using GradStats = void(const std::vector<TensorView>& grads, float* out);
using LayerNormForward = void(const TensorView& x, const TensorView* residual, const TensorView* weight,
                              const TensorView* bias, float eps, const TensorView* sum, const TensorView& y,
                              const TensorView& mean, const TensorView& rstd);
using LayerNormBackward = void(const TensorView& dy, const TensorView& x, const TensorView* weight,
                               const TensorView& mean, const TensorView& rstd, const TensorView* grad_sum,
                               const TensorView& dx, const TensorView* dweight, const TensorView* dbias);
using AttentionForward = void(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                              const AttentionConfig& config, const TensorView& out, const TensorView& lse);
using AttentionBackward = void(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView& lse, const TensorView* mask,
                               const AttentionConfig& config, const TensorView& dq, const TensorView& dk,
                               const TensorView& dv);
using CrossEntropyForward = void(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& config,
                                 const TensorView& loss, const TensorView& lse);
using CrossEntropyBackward = void(const TensorView& logits, const TensorView& target, const TensorView& lse,
                                  const TensorView& grad, const CrossEntropyConfig& config,
                                  const TensorView& dlogits);
using BiasGeluForward = void(const TensorView& x, const TensorView& bias, GeluApproximation approx,
                             const TensorView& y);
using BiasGeluBackward = void(const TensorView& dy, const TensorView& x, const TensorView& bias,
                              GeluApproximation approx, const TensorView& dx, const TensorView* dbias);
using MaskedSoftmaxForward = void(const TensorView& x, const TensorView* mask, const MaskedSoftmaxConfig& config,
                                  const TensorView& y);
using MaskedSoftmaxBackward = void(const TensorView& dy, const TensorView& y, float scale, const TensorView& dx);

#define ZEROFUSE_CPU_KERNELS(X)                     \
  X(adam_step_multi, AdamStepMulti)                 \
  X(grad_stats, GradStats)                          \
  X(layernorm_forward, LayerNormForward)            \
  X(layernorm_backward, LayerNormBackward)          \
  X(attention_forward, AttentionForward)            \
  X(attention_backward, AttentionBackward)          \
  X(cross_entropy_forward, CrossEntropyForward)     \
  X(cross_entropy_backward, CrossEntropyBackward)   \
  X(bias_gelu_forward, BiasGeluForward)             \
  X(bias_gelu_backward, BiasGeluBackward)           \
  X(masked_softmax_forward, MaskedSoftmaxForward)   \
  X(masked_softmax_backward, MaskedSoftmaxBackward)

// A function type names a function declaration: `AdamStepMulti adam_step_multi;`.
#define ZEROFUSE_DECLARE_CPU_KERNEL(name, Type) Type name;
namespace baseline {
ZEROFUSE_CPU_KERNELS(ZEROFUSE_DECLARE_CPU_KERNEL)
}
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
ZEROFUSE_CPU_KERNELS(ZEROFUSE_DECLARE_CPU_KERNEL)
}
namespace avx512 {
ZEROFUSE_CPU_KERNELS(ZEROFUSE_DECLARE_CPU_KERNEL)
}
#endif
#undef ZEROFUSE_DECLARE_CPU_KERNEL

// The kernels of the variant chosen for this processor.
struct Kernels {
  const char* isa;
#define ZEROFUSE_CPU_KERNEL_MEMBER(name, Type) Type* name;
  ZEROFUSE_CPU_KERNELS(ZEROFUSE_CPU_KERNEL_MEMBER)
#undef ZEROFUSE_CPU_KERNEL_MEMBER
};

const Kernels& kernels();
std::vector<const char*> compiled_isas();

}  // namespace zerofuse::cpu

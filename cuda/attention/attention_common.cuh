// What every attention kernel shares -- the CUDA-core kernels (attention.cu)
// and the tensor-core ones (attention_mma.cu, attention_mma_backward.cu, with
// their building blocks in mma.cuh): how a [batch, heads, seq, head_dim]
// tensor is addressed, and the constants of the base-2 softmax.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace zerofuse::cuda {

// A [B, H, S, D] view with a dense last dimension: element (b, h, s, c) is at
// base + b*sb + h*sh + s*ss + c.
struct Head {
  std::int64_t sb, sh, ss;
};

inline Head head_of(const TensorView& t) { return {t.strides[0], t.strides[1], t.strides[2]}; }

// exp(x) = exp2(x * log2(e)): the kernels fold log2(e) into the softmax scale
// and use exp2; the saved row logsumexp is natural-log (ln 2 converts back).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace zerofuse::cuda

// Scaled, masked softmax over the last dimension: y = softmax(x * scale + mask),
// the attention probabilities for a mask that is neither causal nor key
// padding (relative-position biases, sliding windows, packed sequences). The
// attention op falls back to it, between two matrix multiplies, when it is
// given an arbitrary mask; it is also useful on its own, as Megatron's
// scaled_masked_softmax is.
//
// x: [..., rows, n] with 1 to 4 dimensions, contiguous; float32/float16/bfloat16
// (and float64 on the CPU), math in float32 (float64 for float64).
// mask (optional): x's shape with any strides, 0 included, so a broadcast
// [batch, 1, 1, n] key mask or a [1, heads, q, k] bias costs no copy. Either
// bool (true where an element may take part, as torch's attn_mask) or a float
// added after scaling (x's dtype or float32; -inf excludes an element).
// causal: element j of row i (i counted along the second-to-last dimension) is
// excluded when j > i, top-left aligned as torch's is_causal.
// A row with every element excluded gives zeros (and zero gradient), not NaN.
#pragma once

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

struct MaskedSoftmaxConfig {
  float scale = 1.0f;
  bool causal = false;
};

// y: like x (same dtype and shape, contiguous).
void masked_softmax_forward(const TensorView& x, const TensorView* mask, const MaskedSoftmaxConfig& config,
                            const TensorView& y, Stream stream = {});

// dx = scale * y * (dy - sum(dy * y)) row by row; needs only the forward's y.
// dx may be dy itself (written in place).
void masked_softmax_backward(const TensorView& dy, const TensorView& y, float scale, const TensorView& dx,
                             Stream stream = {});

}  // namespace zerofuse

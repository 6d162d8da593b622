// LayerNorm over the last dimension of a contiguous [..., D] input (rows = the
// product of the leading dimensions):
//   y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)
// x and y are float32/float16/bfloat16 (float64 too on the CPU); weight/bias
// have x's dtype or float32; mean and rstd are float32 [rows] (float64 for
// float64 input), one per row in any shape, and are what the backward needs.
#pragma once

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

// weight and bias may each be null (no affine scale / no shift).
void layernorm_forward(const TensorView& x, const TensorView* weight, const TensorView* bias,
                       float eps, const TensorView& y, const TensorView& mean,
                       const TensorView& rstd, Stream stream = {});

// dx has x's dtype; dweight/dbias (each may be null: not wanted) have the
// weight's dtype. dweight needs a weight.
void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight,
                        const TensorView& mean, const TensorView& rstd, const TensorView& dx,
                        const TensorView* dweight, const TensorView* dbias, Stream stream = {});

// The pre-LN transformer's residual stream in one pass: sum = x + residual
// (written, in x's dtype) and y = LayerNorm(sum). residual is like x.
void add_layernorm_forward(const TensorView& x, const TensorView& residual, const TensorView* weight,
                           const TensorView* bias, float eps, const TensorView& sum, const TensorView& y,
                           const TensorView& mean, const TensorView& rstd, Stream stream = {});

// Its backward: dsum = LayerNorm'(dy) + grad_sum (the gradient reaching `sum`
// from the rest of the network); dsum is the gradient of both x and residual.
// `sum` is the forward's sum (LayerNorm's input).
void add_layernorm_backward(const TensorView& dy, const TensorView& grad_sum, const TensorView& sum,
                            const TensorView* weight, const TensorView& mean, const TensorView& rstd,
                            const TensorView& dsum, const TensorView* dweight, const TensorView* dbias,
                            Stream stream = {});

}  // namespace zerofuse

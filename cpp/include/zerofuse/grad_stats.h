// Gradient statistics in one pass: the sum of squares (float32 accumulation) and
// whether any element is inf or NaN -- what loss scaling and global-norm
// clipping need, computed together so the gradients are read once.
#pragma once

#include <vector>

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

// `out` is a float32 tensor of two elements on the gradients' device:
//   out[0] = sum of squares of every element of every tensor
//   out[1] = 1 if any element is inf or NaN, else 0
// Both are plain sums over ranks, so `out` can be all-reduced as it is. The
// result is deterministic: the same input gives the same bits whatever the
// number of threads. Tensors may mix float32, float16 and bfloat16.
void grad_stats(const std::vector<TensorView>& grads, const TensorView& out, Stream stream = {});

}  // namespace zerofuse

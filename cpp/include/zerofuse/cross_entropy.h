// Softmax cross-entropy over the last dimension of [N, V] logits, with
// torch.nn.functional.cross_entropy's semantics (ignore_index, label
// smoothing), float32 math for any input dtype. Reductions over rows are left
// to the caller: the kernels produce and consume per-row values.
//
//   loss_i = lse_i - (1 - e) * x[i, t_i] - (e / V) * sum_j x[i, j],   lse_i = log sum_j exp(x[i, j])
//   dx[i, j] = g_i * (softmax(x_i)_j - (1 - e) * [j == t_i] - e / V)
// with loss_i = 0 and dx[i, :] = 0 for rows whose target is ignore_index.
//
// A vocabulary slice (vocab_total > 0; tensor parallelism): the logits are
// columns [vocab_start, vocab_start + V) of rows vocab_total wide, targets are
// indices into the whole row, and e / V above becomes e / vocab_total. The
// forward then writes this slice's log-sum-exp to lse and, to loss, only its
// share of the target terms: -(1 - e) x[i, t_i] when t_i falls in the slice,
// and -(e / vocab_total) * sum over the slice -- the caller combines the
// slices' lse into the row's and adds it. The backward takes that whole-row
// lse and writes the slice of dx (the one-hot term only where t_i falls).
#pragma once

#include <cstdint>

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

struct CrossEntropyConfig {
  std::int64_t ignore_index = -100;
  double label_smoothing = 0.0;  // in [0, 1]
  std::int64_t vocab_start = 0;  // a slice's first column in the whole row
  std::int64_t vocab_total = 0;  // the whole row's width; 0: the logits are whole rows
};

// logits: contiguous [N, V] float32/float16/bfloat16; target: int64 [N]; loss
// and lse: float32 [N]. A target that is neither ignore_index nor in [0, V):
// on the CPU an error naming the row; on CUDA (where checking would stall the
// host) that row's loss is NaN.
void cross_entropy_forward(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& config,
                           const TensorView& loss, const TensorView& lse, Stream stream = {});

// grad: float32, [N] (dL/dloss_i) or [1] (the same for every row). dlogits:
// like logits; it may be the logits tensor itself (the gradient then replaces
// the logits, so no second [N, V] buffer is needed).
void cross_entropy_backward(const TensorView& logits, const TensorView& target, const TensorView& lse,
                            const TensorView& grad, const CrossEntropyConfig& config, const TensorView& dlogits,
                            Stream stream = {});

}  // namespace zerofuse

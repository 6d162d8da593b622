// Softmax attention, O = softmax(Q K^T * scale + mask) V, computed block by
// block with an online softmax so the [seq_q, seq_k] matrix never exists.
//
// q: [batch, heads, seq_q, head_dim]; k, v: [batch, heads, seq_k, head_dim];
// float32/float16/bfloat16 (and float64 on the CPU), all one dtype; any strides with the last one 1
// (so [B, S, H, D] tensors transposed to [B, H, S, D] need no copy).
// causal: query i sees keys j <= i (top-left aligned, as torch's is_causal).
// key_padding_mask: optional bool [batch, seq_k], true where a key may be seen.
// A query that sees no key gets a zero output and a zero gradient.
#pragma once

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

struct AttentionConfig {
  bool causal = false;
  float scale = 1.0f;  // usually head_dim ** -0.5
};

// out: like q; lse: float32 [batch, heads, seq_q] contiguous (float64 for float64
// inputs), the natural log of
// each row's softmax denominator (-inf where the row sees no key).
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView* key_padding_mask, const AttentionConfig& config,
                       const TensorView& out, const TensorView& lse, Stream stream = {});

// dq, dk, dv: like q, k, v. out and lse are the forward's.
void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                        const TensorView& v, const TensorView& out, const TensorView& lse,
                        const TensorView* key_padding_mask, const AttentionConfig& config,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv,
                        Stream stream = {});

}  // namespace zerofuse

// y = gelu(x + bias) over [..., D] (bias [D]), forward and backward in one pass
// each; float32/float16/bfloat16 with float32 math. approximate: the exact erf
// form or the tanh one (GPT-2's), as torch.nn.functional.gelu.
#pragma once

#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse {

enum class GeluApproximation { None, Tanh };

void bias_gelu_forward(const TensorView& x, const TensorView& bias, GeluApproximation approximate,
                       const TensorView& y, Stream stream = {});

// dx = dy * gelu'(x + bias); dbias (may be null) = dx summed over rows, in bias's dtype.
void bias_gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& bias,
                        GeluApproximation approximate, const TensorView& dx, const TensorView* dbias,
                        Stream stream = {});

}  // namespace zerofuse

// Where each row of a masked softmax finds its mask: x is viewed as
// [d0, d1, d2, n] (leading dimensions padded with 1) and row r = (a, b, c) with
// c fastest. Shared by the CPU and CUDA kernels (hence the qualifiers); built
// on the host from the validated views.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "zerofuse/tensor.h"

namespace zerofuse::detail {

struct SoftmaxRows {
  std::int64_t rows = 0;           // d0 * d1 * d2
  std::int64_t n = 0;              // elements per row
  std::int64_t d0 = 1, d1 = 1, d2 = 1;  // d2 is the query length of causal masking
  std::int64_t mask_stride[4] = {0, 0, 0, 0};  // for (a, b, c, j); 0 along broadcast dimensions

  ZF_HOST_DEVICE std::int64_t query_of(std::int64_t r) const { return r % d2; }

  ZF_HOST_DEVICE std::int64_t mask_row_offset(std::int64_t r) const {
    const std::int64_t c = r % d2, ab = r / d2;
    return mask_offset(ab / d1, ab % d1, c);
  }

  ZF_HOST_DEVICE std::int64_t mask_offset(std::int64_t a, std::int64_t b, std::int64_t c) const {
    return a * mask_stride[0] + b * mask_stride[1] + c * mask_stride[2];
  }
};

inline SoftmaxRows softmax_rows(const TensorView& x, const TensorView* mask) {
  SoftmaxRows rows;
  std::int64_t shape[4] = {1, 1, 1, 1};
  const int pad = 4 - x.ndim;
  for (int d = 0; d < x.ndim; ++d) {
    shape[pad + d] = x.shape[d];
    // A size-1 dimension is only ever indexed at 0, whatever its stride says.
    if (mask != nullptr && x.shape[d] != 1) rows.mask_stride[pad + d] = mask->strides[d];
  }
  rows.d0 = shape[0];
  rows.d1 = shape[1];
  rows.d2 = shape[2];
  rows.n = shape[3];
  rows.rows = shape[0] * shape[1] * shape[2];
  return rows;
}

}  // namespace zerofuse::detail

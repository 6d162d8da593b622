#include "zerofuse/masked_softmax.h"

#include <cmath>

#include "checks.h"
#include "dispatch.h"
#include "memory_hint.h"

namespace zerofuse {
namespace {

using namespace detail;

void check_scores(const TensorView& x, const char* op, const char* name) {
  if (x.device.is_cpu())  // float64 on the CPU only (for gradcheck and reference work)
    check_dtype(x, op, name, {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  else
    check_dtype(x, op, name, {DType::Float32, DType::Float16, DType::BFloat16});
  check_device_supported(x, op, name);
  if (x.ndim < 1 || x.ndim > 4)
    value_error(op, ": argument '", name, "' must have 1 to 4 dimensions ([..., rows, n]), got ", describe(x));
  check_contiguous(x, op, name);
  check_present(x, op, name);
}

void check_mask(const TensorView& mask, const TensorView& x, const char* op) {
  if (x.dtype == DType::Float64)
    check_dtype(mask, op, "mask", {DType::Bool, DType::Float64, DType::Float32});
  else
    check_dtype(mask, op, "mask", {DType::Bool, x.dtype, DType::Float32});
  check_same_shape(mask, op, "mask", x, "input");  // broadcast masks come with stride 0
  for (int d = 0; d < mask.ndim; ++d)
    if (mask.strides[d] < 0)
      value_error(op, ": argument 'mask' must have non-negative strides, got stride ", mask.strides[d],
                  " in dimension ", d);
  check_same_device(mask, op, "mask", x, "input");
  check_present(mask, op, "mask");
}

}  // namespace

void masked_softmax_forward(const TensorView& x, const TensorView* mask, const MaskedSoftmaxConfig& config,
                            const TensorView& y, Stream stream) {
  const char* op = "zerofuse.masked_softmax";
  check_scores(x, op, "input");
  if (mask != nullptr) check_mask(*mask, x, op);
  check_like(y, op, "out", x, "input");
  if (!std::isfinite(config.scale)) value_error(op, ": 'scale' must be finite, got ", config.scale);
  if (config.causal && x.ndim < 2)
    value_error(op, ": causal masking needs [..., rows, n] input (at least 2 dimensions), got ", describe(x));
  if (x.numel() == 0) return;
  if (x.device.is_cpu()) {
    prefer_huge_pages(y.data, std::size_t(y.numel()) * y.element_size());
    cpu::kernels().masked_softmax_forward(x, mask, config, y);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::masked_softmax_forward(x, mask, config, y, stream));
}

void masked_softmax_backward(const TensorView& dy, const TensorView& y, float scale, const TensorView& dx,
                             Stream stream) {
  const char* op = "zerofuse.masked_softmax_backward";
  check_scores(y, op, "out");
  check_like(dy, op, "grad_out", y, "out");
  check_like(dx, op, "grad_input", y, "out");
  if (!std::isfinite(scale)) value_error(op, ": 'scale' must be finite, got ", scale);
  if (y.numel() == 0) return;
  if (y.device.is_cpu()) {
    cpu::kernels().masked_softmax_backward(dy, y, scale, dx);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::masked_softmax_backward(dy, y, scale, dx, stream));
}

}  // namespace zerofuse

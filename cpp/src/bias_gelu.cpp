#include "zerofuse/bias_gelu.h"

#include "checks.h"
#include "dispatch.h"
#include "memory_hint.h"

namespace zerofuse {
namespace {

using namespace detail;

void check_pair(const TensorView& x, const TensorView& bias, const char* op) {
  check_dtype(x, op, "input", {DType::Float32, DType::Float16, DType::BFloat16});
  if (x.ndim < 1) value_error(op, ": argument 'input' must have at least one dimension, got ", describe(x));
  check_contiguous(x, op, "input");
  check_present(x, op, "input");
  check_device_supported(x, op, "input");
  check_dtype(bias, op, "bias", {x.dtype, DType::Float32});
  check_shape(bias, op, "bias", {x.shape[x.ndim - 1]});
  check_contiguous(bias, op, "bias");
  check_same_device(bias, op, "bias", x, "input");
  check_present(bias, op, "bias");
}

}  // namespace

void bias_gelu_forward(const TensorView& x, const TensorView& bias, GeluApproximation approximate,
                       const TensorView& y, Stream stream) {
  const char* op = "zerofuse.bias_gelu";
  check_pair(x, bias, op);
  check_like(y, op, "out", x, "input");
  if (x.device.is_cpu()) {
    prefer_huge_pages(y.data, std::size_t(y.numel()) * y.element_size());
    cpu::kernels().bias_gelu_forward(x, bias, approximate, y);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::bias_gelu_forward(x, bias, approximate, y, stream));
}

void bias_gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& bias,
                        GeluApproximation approximate, const TensorView& dx, const TensorView* dbias, Stream stream) {
  const char* op = "zerofuse.bias_gelu_backward";
  check_pair(x, bias, op);
  check_like(dy, op, "grad_out", x, "input");
  check_like(dx, op, "grad_input", x, "input");
  if (dbias) {
    check_dtype(*dbias, op, "grad_bias", {bias.dtype});
    check_same_shape(*dbias, op, "grad_bias", bias, "bias");
    check_same_device(*dbias, op, "grad_bias", x, "input");
    check_present(*dbias, op, "grad_bias");
  }
  if (x.device.is_cpu()) {
    prefer_huge_pages(dx.data, std::size_t(dx.numel()) * dx.element_size());
    cpu::kernels().bias_gelu_backward(dy, x, bias, approximate, dx, dbias);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::bias_gelu_backward(dy, x, bias, approximate, dx, dbias, stream));
}

}  // namespace zerofuse

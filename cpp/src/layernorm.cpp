#include "zerofuse/layernorm.h"

#include <cmath>

#include "checks.h"
#include "dispatch.h"
#include "memory_hint.h"

namespace zerofuse {
namespace {

using namespace detail;

// x is [..., D] (rows = all leading dimensions); an affine parameter is [D], of
// x's dtype or float32. float64 runs on the CPU only (for gradcheck and
// reference work).
std::int64_t width(const TensorView& x) { return x.shape[x.ndim - 1]; }

void check_input(const TensorView& x, const char* op, const char* name) {
  if (x.device.is_cpu())
    check_dtype(x, op, name, {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  else
    check_dtype(x, op, name, {DType::Float32, DType::Float16, DType::BFloat16});
  if (x.ndim < 1) value_error(op, ": argument '", name, "' must have at least one dimension, got ", describe(x));
  check_contiguous(x, op, name);
  check_present(x, op, name);
  check_device_supported(x, op, name);
  if (width(x) < 1) value_error(op, ": argument '", name, "' must have a last dimension >= 1, got ", describe(x));
}

void check_affine(const TensorView* p, const TensorView& x, const char* op, const char* name) {
  if (p == nullptr) return;
  check_dtype(*p, op, name, {x.dtype, DType::Float32});
  check_shape(*p, op, name, {width(x)});
  check_contiguous(*p, op, name);
  check_same_device(*p, op, name, x, "input");
  check_present(*p, op, name);
}

// mean and rstd: one per row (any shape), float32, or float64 for float64 input.
void check_stats(const TensorView& s, const TensorView& x, const char* op, const char* name) {
  check_dtype(s, op, name, {x.dtype == DType::Float64 ? DType::Float64 : DType::Float32});
  if (s.numel() != x.numel() / width(x))
    value_error(op, ": argument '", name, "' must have one element per row of 'input' (", x.numel() / width(x),
                "), got ", describe(s));
  check_contiguous(s, op, name);
  check_same_device(s, op, name, x, "input");
  check_present(s, op, name);
}

void check_same_param_dtype(const TensorView* a, const char* a_name, const TensorView* b,
                            const char* b_name, const char* op) {
  if (a && b && a->dtype != b->dtype)
    type_error(op, ": '", a_name, "' and '", b_name, "' must have the same dtype, got ", describe(*a),
               " and ", describe(*b));
}

// The checks and dispatch shared by LayerNorm and add + LayerNorm.
void forward_impl(const char* op, const TensorView& x, const TensorView* residual, const TensorView* weight,
                  const TensorView* bias, float eps, const TensorView* sum, const TensorView& y,
                  const TensorView& mean, const TensorView& rstd, Stream stream) {
  check_input(x, op, "input");
  if (residual) check_like(*residual, op, "residual", x, "input");
  if (sum) check_like(*sum, op, "sum", x, "input");
  check_affine(weight, x, op, "weight");
  check_affine(bias, x, op, "bias");
  check_same_param_dtype(weight, "weight", bias, "bias", op);
  if (!(eps >= 0.0f && std::isfinite(eps))) value_error(op, ": 'eps' must be a finite number >= 0, got ", eps);
  check_like(y, op, "out", x, "input");
  check_stats(mean, x, op, "mean");
  check_stats(rstd, x, op, "rstd");
  if (x.device.is_cpu()) {
    prefer_huge_pages(y.data, std::size_t(y.numel()) * y.element_size());
    if (sum) prefer_huge_pages(sum->data, std::size_t(sum->numel()) * sum->element_size());
    cpu::kernels().layernorm_forward(x, residual, weight, bias, eps, sum, y, mean, rstd);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::layernorm_forward(x, residual, weight, bias, eps, sum, y, mean, rstd, stream));
}

void backward_impl(const char* op, const TensorView& dy, const TensorView& x, const TensorView* weight,
                   const TensorView& mean, const TensorView& rstd, const TensorView* grad_sum, const TensorView& dx,
                   const TensorView* dweight, const TensorView* dbias, Stream stream) {
  check_input(x, op, "input");
  check_like(dy, op, "grad_out", x, "input");
  if (grad_sum) check_like(*grad_sum, op, "grad_sum", x, "input");
  check_affine(weight, x, op, "weight");
  check_stats(mean, x, op, "mean");
  check_stats(rstd, x, op, "rstd");
  check_like(dx, op, "grad_input", x, "input");
  if (dweight != nullptr && weight == nullptr)
    value_error(op, ": 'grad_weight' was asked for but there is no 'weight'");
  check_affine(dweight, x, op, "grad_weight");
  check_affine(dbias, x, op, "grad_bias");
  check_same_param_dtype(weight, "weight", dweight, "grad_weight", op);
  check_same_param_dtype(weight, "weight", dbias, "grad_bias", op);
  check_same_param_dtype(dweight, "grad_weight", dbias, "grad_bias", op);
  if (x.device.is_cpu()) {
    prefer_huge_pages(dx.data, std::size_t(dx.numel()) * dx.element_size());
    cpu::kernels().layernorm_backward(dy, x, weight, mean, rstd, grad_sum, dx, dweight, dbias);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::layernorm_backward(dy, x, weight, mean, rstd, grad_sum, dx, dweight, dbias, stream));
}

}  // namespace

void layernorm_forward(const TensorView& x, const TensorView* weight, const TensorView* bias, float eps,
                       const TensorView& y, const TensorView& mean, const TensorView& rstd, Stream stream) {
  forward_impl("zerofuse.layer_norm", x, nullptr, weight, bias, eps, nullptr, y, mean, rstd, stream);
}

void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView* weight,
                        const TensorView& mean, const TensorView& rstd, const TensorView& dx,
                        const TensorView* dweight, const TensorView* dbias, Stream stream) {
  backward_impl("zerofuse.layer_norm_backward", dy, x, weight, mean, rstd, nullptr, dx, dweight, dbias, stream);
}

void add_layernorm_forward(const TensorView& x, const TensorView& residual, const TensorView* weight,
                           const TensorView* bias, float eps, const TensorView& sum, const TensorView& y,
                           const TensorView& mean, const TensorView& rstd, Stream stream) {
  forward_impl("zerofuse.add_layer_norm", x, &residual, weight, bias, eps, &sum, y, mean, rstd, stream);
}

void add_layernorm_backward(const TensorView& dy, const TensorView& grad_sum, const TensorView& sum,
                            const TensorView* weight, const TensorView& mean, const TensorView& rstd,
                            const TensorView& dsum, const TensorView* dweight, const TensorView* dbias,
                            Stream stream) {
  backward_impl("zerofuse.add_layer_norm_backward", dy, sum, weight, mean, rstd, &grad_sum, dsum, dweight, dbias,
                stream);
}

}  // namespace zerofuse

// Adam: argument validation and device dispatch. Nothing reaches a kernel
// until every tensor has been checked.
#include "zerofuse/adam.h"

#include <cmath>
#include <string>
#include <utility>

#include "checks.h"
#include "dispatch.h"

namespace zerofuse {
namespace {

using namespace detail;

void check_config(const AdamConfig& c, const char* op, Device device) {
  auto finite_nonneg = [&](double x, const char* name) {
    if (!(std::isfinite(x) && x >= 0.0))
      value_error(op, ": '", name, "' must be a finite number >= 0, got ", x);
  };
  finite_nonneg(c.lr, "lr");
  finite_nonneg(c.weight_decay, "weight_decay");
  if (!(c.eps > 0.0 && std::isfinite(c.eps))) value_error(op, ": 'eps' must be > 0, got ", c.eps);
  if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) value_error(op, ": 'beta1' must be in [0, 1), got ", c.beta1);
  if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) value_error(op, ": 'beta2' must be in [0, 1), got ", c.beta2);
  if (c.step < 1) value_error(op, ": 'step' must be >= 1 (the count including this update), got ", c.step);
  if (!std::isfinite(c.inv_scale)) value_error(op, ": 'inv_scale' must be finite, got ", c.inv_scale);
  if (!(std::isfinite(c.clip_coef) && c.clip_coef >= 0.0))
    value_error(op, ": 'clip_coef' must be a finite number >= 0, got ", c.clip_coef);
  if (c.grad_multiplier.data != nullptr) check_scalar_f32(c.grad_multiplier, op, "grad_multiplier", device);
  if (c.skip_if_nonzero.data != nullptr) check_scalar_f32(c.skip_if_nonzero, op, "skip_if_nonzero", device);
  for (const auto& [tensor, name] : {std::pair{&c.step_tensor, "step_tensor"}, std::pair{&c.lr_tensor, "lr_tensor"}}) {
    if (tensor->data == nullptr) continue;
    if (tensor->dtype != DType::Float64 || tensor->numel() != 1 || tensor->device != device)
      value_error(op, ": argument '", name, "' must be a float64 tensor of one element on ", device_name(device),
                  ", got ", describe(*tensor));
  }
  // On the CPU the value is at hand: hold it to the rule for `lr`.
  if (c.lr_tensor.data != nullptr && device.is_cpu())
    finite_nonneg(*static_cast<const double*>(c.lr_tensor.data), "lr_tensor");
}

// `flat`: the single-buffer form, whose arguments are named without an index.
void check_lists(const AdamTensorLists& t, const char* op, bool flat) {
  const std::size_t n = t.params.size();
  if (t.grads.size() != n || t.exp_avgs.size() != n || t.exp_avg_sqs.size() != n)
    value_error(op, ": 'params', 'grads', 'exp_avgs' and 'exp_avg_sqs' must have the same length, got ",
                n, ", ", t.grads.size(), ", ", t.exp_avgs.size(), " and ", t.exp_avg_sqs.size());
  if (!t.param_copies.empty() && t.param_copies.size() != n)
    value_error(op, ": 'param_copies' must be empty or have one tensor per param (", n, "), got ",
                t.param_copies.size());
  if (n == 0) return;

  const TensorView& first = t.params[0];
  const std::string first_name = flat ? "param" : "params[0]";
  const bool master = first.dtype == DType::Float32;
  check_dtype(first, op, first_name.c_str(), {DType::Float32, DType::Float16, DType::BFloat16});
  if (!master && !t.param_copies.empty())
    value_error(op, ": 'param_copies' are only for float32 params, got params of ",
                dtype_name(first.dtype));
  check_device_supported(first, op, first_name.c_str());

  auto name = [flat](const char* list, std::size_t i) {
    std::string s(list);
    if (flat) return s == "param_copies" ? std::string("param_copy") : s.substr(0, s.size() - 1);
    return s + "[" + std::to_string(i) + "]";
  };
  for (std::size_t i = 0; i < n; ++i) {
    const std::string p = name("params", i), g = name("grads", i), m = name("exp_avgs", i),
                      v = name("exp_avg_sqs", i);
    const TensorView &param = t.params[i], &grad = t.grads[i], &ea = t.exp_avgs[i], &eas = t.exp_avg_sqs[i];
    if (param.dtype != first.dtype)
      type_error(op, ": every param must have the dtype of params[0] (", dtype_name(first.dtype),
                 "), got ", p, " ", describe(param));
    if (master) {
      check_dtype(grad, op, g.c_str(), {DType::Float32, DType::Float16, DType::BFloat16});
      if (grad.dtype != t.grads[0].dtype)
        type_error(op, ": every grad must have the dtype of grads[0] (", dtype_name(t.grads[0].dtype),
                   "), got ", g, " ", describe(grad));
      check_dtype(ea, op, m.c_str(), {DType::Float32});
      check_dtype(eas, op, v.c_str(), {DType::Float32});
    } else {
      check_dtype(grad, op, g.c_str(), {first.dtype});
      check_dtype(ea, op, m.c_str(), {first.dtype, DType::Float32});
      if (ea.dtype != t.exp_avgs[0].dtype || eas.dtype != ea.dtype)
        type_error(op, ": every exp_avg and exp_avg_sq must have the dtype of exp_avgs[0] (",
                   dtype_name(t.exp_avgs[0].dtype), "), got ", m, " ", describe(ea), " and ", v, " ",
                   describe(eas));
    }
    for (const auto* other : {&grad, &ea, &eas}) {
      const std::string& other_name = other == &grad ? g : other == &ea ? m : v;
      check_same_shape(*other, op, other_name.c_str(), param, p.c_str());
      check_same_device(*other, op, other_name.c_str(), first, first_name.c_str());
      check_contiguous(*other, op, other_name.c_str());
      check_present(*other, op, other_name.c_str());
    }
    check_same_device(param, op, p.c_str(), first, first_name.c_str());
    check_contiguous(param, op, p.c_str());
    check_present(param, op, p.c_str());
    if (!t.param_copies.empty()) {
      const std::string c = name("param_copies", i);
      const TensorView& copy = t.param_copies[i];
      check_dtype(copy, op, c.c_str(), {DType::Float16, DType::BFloat16});
      if (copy.dtype != t.param_copies[0].dtype)
        type_error(op, ": every param copy must have the dtype of param_copies[0], got ", c, " ",
                   describe(copy));
      check_same_shape(copy, op, c.c_str(), param, p.c_str());
      check_same_device(copy, op, c.c_str(), first, first_name.c_str());
      check_contiguous(copy, op, c.c_str());
      check_present(copy, op, c.c_str());
    }
  }
}

void dispatch(const AdamTensorLists& t, const AdamConfig& config, Stream stream, const char* op) {
  if (t.params.empty()) return;
  if (t.params[0].device.is_cpu()) {
    cpu::kernels().adam_step_multi(t, config);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::adam_step_multi(t, config, stream));
}

}  // namespace

void adam_step(const TensorView& param, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const TensorView* param_copy, const AdamConfig& config,
               Stream stream) {
  const char* op = "zerofuse.adam_step";
  check_dtype(param, op, "param", {DType::Float32});
  AdamTensorLists t;
  t.params.push_back(param);
  t.grads.push_back(grad);
  t.exp_avgs.push_back(exp_avg);
  t.exp_avg_sqs.push_back(exp_avg_sq);
  if (param_copy != nullptr) t.param_copies.push_back(*param_copy);
  check_lists(t, op, /*flat=*/true);
  check_config(config, op, param.device);
  dispatch(t, config, stream, op);
}

void adam_step_multi(const AdamTensorLists& tensors, const AdamConfig& config, Stream stream) {
  const char* op = "zerofuse.adam_step_multi";
  check_lists(tensors, op, /*flat=*/false);
  if (tensors.params.empty()) return;
  check_config(config, op, tensors.params[0].device);
  dispatch(tensors, config, stream, op);
}

}  // namespace zerofuse

#include "zerofuse/cross_entropy.h"

#include <cmath>

#include "checks.h"
#include "dispatch.h"

namespace zerofuse {
namespace {

using namespace detail;

void check_common(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& c, const char* op) {
  check_dtype(logits, op, "logits", {DType::Float32, DType::Float16, DType::BFloat16});
  check_ndim(logits, op, "logits", 2);
  check_contiguous(logits, op, "logits");
  check_present(logits, op, "logits");
  check_device_supported(logits, op, "logits");
  if (logits.shape[1] < 1) value_error(op, ": 'logits' must have at least one class, got ", describe(logits));
  check_dtype(target, op, "target", {DType::Int64});
  check_shape(target, op, "target", {logits.shape[0]});
  check_contiguous(target, op, "target");
  check_same_device(target, op, "target", logits, "logits");
  check_present(target, op, "target");
  if (!(c.label_smoothing >= 0.0 && c.label_smoothing <= 1.0))
    value_error(op, ": 'label_smoothing' must be in [0, 1], got ", c.label_smoothing);
  if (c.vocab_total != 0 && (c.vocab_start < 0 || c.vocab_start + logits.shape[1] > c.vocab_total))
    value_error(op, ": the slice [vocab_start, vocab_start + V) = [", c.vocab_start, ", ",
                c.vocab_start + logits.shape[1], ") must lie within [0, vocab_total = ", c.vocab_total, ")");
}

void check_rows(const TensorView& t, const TensorView& logits, const char* op, const char* name) {
  check_dtype(t, op, name, {DType::Float32});
  check_shape(t, op, name, {logits.shape[0]});
  check_contiguous(t, op, name);
  check_same_device(t, op, name, logits, "logits");
  check_present(t, op, name);
}

// On the CPU the targets are checked before any work; on CUDA that would stall
// the host, so the kernel marks a bad row's loss NaN instead.
void check_targets_on_host(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& c,
                           const char* op) {
  const std::int64_t* t = target.data_as<const std::int64_t>();
  const std::int64_t classes = c.vocab_total > 0 ? c.vocab_total : logits.shape[1];
  for (std::int64_t i = 0; i < target.numel(); ++i)
    if (t[i] != c.ignore_index && (t[i] < 0 || t[i] >= classes))
      value_error(op, ": target[", i, "] = ", t[i], " is out of range [0, ", classes, ") and is not ignore_index (",
                  c.ignore_index, ")");
}

}  // namespace

void cross_entropy_forward(const TensorView& logits, const TensorView& target, const CrossEntropyConfig& config,
                           const TensorView& loss, const TensorView& lse, Stream stream) {
  const char* op = "zerofuse.cross_entropy";
  check_common(logits, target, config, op);
  check_rows(loss, logits, op, "loss");
  check_rows(lse, logits, op, "lse");
  if (logits.device.is_cpu()) {
    check_targets_on_host(logits, target, config, op);
    cpu::kernels().cross_entropy_forward(logits, target, config, loss, lse);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::cross_entropy_forward(logits, target, config, loss, lse, stream));
}

void cross_entropy_backward(const TensorView& logits, const TensorView& target, const TensorView& lse,
                            const TensorView& grad, const CrossEntropyConfig& config, const TensorView& dlogits,
                            Stream stream) {
  const char* op = "zerofuse.cross_entropy_backward";
  check_common(logits, target, config, op);
  check_rows(lse, logits, op, "lse");
  check_dtype(grad, op, "grad", {DType::Float32});
  if (!(grad.numel() == logits.shape[0] || grad.numel() == 1) || !grad.is_contiguous())
    value_error(op, ": argument 'grad' must be a contiguous float32 tensor of ", logits.shape[0],
                " elements (one per row) or of one, got ", describe(grad));
  check_same_device(grad, op, "grad", logits, "logits");
  check_present(grad, op, "grad");
  check_dtype(dlogits, op, "grad_logits", {logits.dtype});
  check_same_shape(dlogits, op, "grad_logits", logits, "logits");
  check_contiguous(dlogits, op, "grad_logits");
  check_same_device(dlogits, op, "grad_logits", logits, "logits");
  if (logits.device.is_cpu()) {
    check_targets_on_host(logits, target, config, op);
    cpu::kernels().cross_entropy_backward(logits, target, lse, grad, config, dlogits);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::cross_entropy_backward(logits, target, lse, grad, config, dlogits, stream));
}

}  // namespace zerofuse

#include "zerofuse/grad_stats.h"

#include <string>

#include "checks.h"
#include "dispatch.h"

namespace zerofuse {

void grad_stats(const std::vector<TensorView>& grads, const TensorView& out, Stream stream) {
  using namespace detail;
  const char* op = "zerofuse.grad_stats";
  check_dtype(out, op, "out", {DType::Float32});
  if (out.numel() != 2 || !out.is_contiguous())
    value_error(op, ": argument 'out' must be a contiguous float32 tensor of 2 elements, got ", describe(out));
  check_present(out, op, "out");
  check_device_supported(out, op, "out");
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const std::string name = "grads[" + std::to_string(i) + "]";
    check_dtype(grads[i], op, name.c_str(), {DType::Float32, DType::Float16, DType::BFloat16});
    check_same_device(grads[i], op, name.c_str(), out, "out");
    check_contiguous(grads[i], op, name.c_str());
    check_present(grads[i], op, name.c_str());
  }
  if (out.device.is_cpu()) {
    cpu::kernels().grad_stats(grads, out.data_as<float>());
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::grad_stats(grads, out, stream));
}

}  // namespace zerofuse

#include "zerofuse/attention.h"

#include <cmath>

#include "checks.h"
#include "dispatch.h"
#include "memory_hint.h"

namespace zerofuse {
namespace {

using namespace detail;

// A [B, H, S, D] view whose last dimension is dense.
void check_bhsd(const TensorView& t, const char* op, const char* name) {
  check_ndim(t, op, name, 4);
  check_present(t, op, name);
  if (t.shape[3] > 1 && t.strides[3] != 1)
    value_error(op, ": argument '", name, "' must have a contiguous last dimension (stride 1), got stride ",
                t.strides[3]);
}

// Outputs take any strides the kernels take (dense last dimension).
void check_output(const TensorView& t, const TensorView& like, const char* like_name, const char* op,
                  const char* name) {
  check_bhsd(t, op, name);
  check_like(t, op, name, like, like_name, /*must_be_contiguous=*/false);
}

void check_qkv(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
               const AttentionConfig& config, const char* op) {
  if (q.device.is_cpu())  // float64 on the CPU only (for gradcheck and reference work)
    check_dtype(q, op, "q", {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  else
    check_dtype(q, op, "q", {DType::Float32, DType::Float16, DType::BFloat16});
  check_device_supported(q, op, "q");
  check_bhsd(q, op, "q");
  check_dtype(k, op, "k", {q.dtype});
  check_dtype(v, op, "v", {q.dtype});
  check_bhsd(k, op, "k");
  check_bhsd(v, op, "v");
  check_same_device(k, op, "k", q, "q");
  check_same_device(v, op, "v", q, "q");
  if (q.shape[3] < 1) value_error(op, ": head_dim must be >= 1, got ", describe(q));
  if (k.shape[0] != q.shape[0] || k.shape[1] != q.shape[1] || k.shape[3] != q.shape[3])
    value_error(op, ": argument 'k' must be [batch, heads, seq_k, head_dim] with the batch, heads and head_dim ",
                "of 'q' ", shape_string(q), ", got ", describe(k));
  check_same_shape(v, op, "v", k, "k");
  if (mask != nullptr) {
    check_dtype(*mask, op, "key_padding_mask", {DType::Bool});
    check_shape(*mask, op, "key_padding_mask", {q.shape[0], k.shape[2]});
    check_contiguous(*mask, op, "key_padding_mask");
    check_same_device(*mask, op, "key_padding_mask", q, "q");
    check_present(*mask, op, "key_padding_mask");
  }
  if (!std::isfinite(config.scale)) value_error(op, ": 'scale' must be finite, got ", config.scale);
}

// float32, or float64 for float64 inputs.
void check_lse(const TensorView& lse, const TensorView& q, const char* op) {
  check_dtype(lse, op, "lse", {q.dtype == DType::Float64 ? DType::Float64 : DType::Float32});
  check_shape(lse, op, "lse", {q.shape[0], q.shape[1], q.shape[2]});
  check_contiguous(lse, op, "lse");
  check_same_device(lse, op, "lse", q, "q");
  check_present(lse, op, "lse");
}

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView* key_padding_mask, const AttentionConfig& config, const TensorView& out,
                       const TensorView& lse, Stream stream) {
  const char* op = "zerofuse.attention";
  check_qkv(q, k, v, key_padding_mask, config, op);
  check_output(out, q, "q", op, "out");
  check_lse(lse, q, op);
  if (q.device.is_cpu()) {
    prefer_huge_pages(out.data, std::size_t(out.numel()) * out.element_size());
    cpu::kernels().attention_forward(q, k, v, key_padding_mask, config, out, lse);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::attention_forward(q, k, v, key_padding_mask, config, out, lse, stream));
}

void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView* key_padding_mask,
                        const AttentionConfig& config, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, Stream stream) {
  const char* op = "zerofuse.attention_backward";
  check_qkv(q, k, v, key_padding_mask, config, op);
  check_output(out, q, "q", op, "out");
  check_output(dout, q, "q", op, "grad_out");
  check_lse(lse, q, op);
  check_output(dq, q, "q", op, "grad_q");
  check_output(dk, k, "k", op, "grad_k");
  check_output(dv, v, "v", op, "grad_v");
  if (q.device.is_cpu()) {
    for (const TensorView* g : {&dq, &dk, &dv}) prefer_huge_pages(g->data, std::size_t(g->numel()) * g->element_size());
    cpu::kernels().attention_backward(dout, q, k, v, out, lse, key_padding_mask, config, dq, dk, dv);
    return;
  }
  ZF_CUDA_KERNEL(op, cuda::attention_backward(dout, q, k, v, out, lse, key_padding_mask, config, dq, dk, dv, stream));
}

}  // namespace zerofuse

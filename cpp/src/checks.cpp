#include "checks.h"

#include <sstream>

namespace zerofuse {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Float64: case DType::Int64: return 8;
    case DType::UInt8: case DType::Bool: return 1;
  }
  return 0;
}

std::string device_name(Device device) {
  if (device.is_cpu()) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                                  Device device) {
  if (shape.size() > std::size_t(kMaxDims)) value_error("TensorView: at most ", kMaxDims, " dimensions");
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.device = device;
  view.ndim = int(shape.size());
  int i = 0;
  for (std::int64_t s : shape) view.shape[i++] = s;
  std::int64_t stride = 1;
  for (int d = view.ndim - 1; d >= 0; --d) {
    view.strides[d] = stride;
    stride *= view.shape[d];
  }
  return view;
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

std::int64_t TensorView::size(int dim) const {
  if (dim < 0) dim += ndim;
  if (dim < 0 || dim >= ndim) value_error("TensorView::size: dimension out of range");
  return shape[dim];
}

bool TensorView::is_contiguous() const {
  std::int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string describe(const TensorView& view) {
  if (view.data == nullptr && view.ndim == 0) return "nothing";
  return std::string(dtype_name(view.dtype)) + detail::shape_string(view) + " on " +
         device_name(view.device);
}

namespace detail {

std::string shape_string(const TensorView& view) {
  std::ostringstream out;
  out << '[';
  for (int d = 0; d < view.ndim; ++d) out << (d ? ", " : "") << view.shape[d];
  out << ']';
  return out.str();
}

std::string dtype_list(std::initializer_list<DType> dtypes) {
  std::string text;
  std::size_t i = 0;
  for (DType d : dtypes) {
    if (i > 0) text += (i + 1 == dtypes.size()) ? " or " : ", ";
    text += dtype_name(d);
    ++i;
  }
  return text;
}

void check_present(const TensorView& view, const char* op, const char* name) {
  if (view.data == nullptr && view.numel() != 0)
    value_error(op, ": argument '", name, "' has no data (null pointer)");
}

void check_dtype(const TensorView& view, const char* op, const char* name,
                 std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (view.dtype == d) return;
  type_error(op, ": argument '", name, "' must be ", dtype_list(allowed), ", got ", describe(view));
}

void check_ndim(const TensorView& view, const char* op, const char* name, int ndim) {
  if (view.ndim != ndim)
    value_error(op, ": argument '", name, "' must have ", ndim, " dimensions, got ", describe(view));
}

void check_contiguous(const TensorView& view, const char* op, const char* name) {
  if (!view.is_contiguous())
    value_error(op, ": argument '", name, "' must be contiguous, got ", describe(view),
                " with non-contiguous strides");
}

void check_same_shape(const TensorView& view, const char* op, const char* name,
                      const TensorView& like, const char* like_name) {
  bool same = view.ndim == like.ndim;
  for (int d = 0; same && d < view.ndim; ++d) same = view.shape[d] == like.shape[d];
  if (!same)
    value_error(op, ": argument '", name, "' must have the shape of '", like_name, "' ",
                shape_string(like), ", got ", describe(view));
}

void check_shape(const TensorView& view, const char* op, const char* name,
                 std::initializer_list<std::int64_t> shape) {
  bool same = view.ndim == int(shape.size());
  int d = 0;
  for (std::int64_t s : shape) {
    if (!same) break;
    same = view.shape[d++] == s;
  }
  if (!same) {
    std::ostringstream want;
    want << '[';
    d = 0;
    for (std::int64_t s : shape) want << (d++ ? ", " : "") << s;
    want << ']';
    value_error(op, ": argument '", name, "' must have shape ", want.str(), ", got ", describe(view));
  }
}

void check_same_device(const TensorView& view, const char* op, const char* name,
                       const TensorView& like, const char* like_name) {
  if (view.device != like.device)
    value_error(op, ": argument '", name, "' must be on ", device_name(like.device), " like '",
                like_name, "', got ", describe(view));
}

void check_like(const TensorView& view, const char* op, const char* name, const TensorView& like,
                const char* like_name, bool must_be_contiguous) {
  check_dtype(view, op, name, {like.dtype});
  check_same_shape(view, op, name, like, like_name);
  if (must_be_contiguous) check_contiguous(view, op, name);
  check_same_device(view, op, name, like, like_name);
  check_present(view, op, name);
}

void check_scalar_f32(const TensorView& view, const char* op, const char* name, Device device) {
  if (view.dtype != DType::Float32 || view.numel() != 1)
    value_error(op, ": argument '", name, "' must be a float32 tensor of one element, got ",
                describe(view));
  if (view.device != device)
    value_error(op, ": argument '", name, "' must be on ", device_name(device), ", got ",
                describe(view));
  check_present(view, op, name);
}

void check_device_supported(const TensorView& view, const char* op, const char* name) {
#ifndef ZEROFUSE_WITH_CUDA
  if (view.device.is_cuda())
    runtime_error(op, ": argument '", name, "' is on ", device_name(view.device),
                  ", but this build of zerofuse has no CUDA support (nvcc was not found when it "
                  "was built); rebuild with the CUDA toolkit installed, or pass CPU tensors");
#else
  (void)view;
  (void)op;
  (void)name;
#endif
}

[[noreturn]] void no_cuda_kernel(const char* op) {
  runtime_error(op, ": got CUDA tensors, but this build of zerofuse has no CUDA support (nvcc was not found when "
                "it was built); rebuild with the CUDA toolkit installed, or pass CPU tensors");
}

}  // namespace detail
}  // namespace zerofuse

// Argument checks shared by every op. Each names the op and the argument and
// says what was expected, so the message is useful without a traceback:
//   "zerofuse.layer_norm: argument 'weight' must have shape [768], got float32[512] on cpu"
#pragma once

#include <initializer_list>
#include <string>

#include "zerofuse/error.h"
#include "zerofuse/tensor.h"

namespace zerofuse::detail {

std::string shape_string(const TensorView& view);
std::string dtype_list(std::initializer_list<DType> dtypes);  // "float32, float16 or bfloat16"

void check_present(const TensorView& view, const char* op, const char* name);
void check_dtype(const TensorView& view, const char* op, const char* name,
                 std::initializer_list<DType> allowed);
void check_ndim(const TensorView& view, const char* op, const char* name, int ndim);
void check_contiguous(const TensorView& view, const char* op, const char* name);
void check_same_shape(const TensorView& view, const char* op, const char* name,
                      const TensorView& like, const char* like_name);
void check_shape(const TensorView& view, const char* op, const char* name,
                 std::initializer_list<std::int64_t> shape);
void check_same_device(const TensorView& view, const char* op, const char* name,
                       const TensorView& like, const char* like_name);
// An output or companion tensor that must match `like`: its dtype, shape and
// device, with data; contiguous unless `must_be_contiguous` is false (kernels
// that take strides).
void check_like(const TensorView& view, const char* op, const char* name, const TensorView& like,
                const char* like_name, bool must_be_contiguous = true);
// A float32 tensor of exactly one element on `device` (the optional step scalars).
void check_scalar_f32(const TensorView& view, const char* op, const char* name, Device device);
// CUDA views are fine only in a CUDA build; say so before anything runs.
void check_device_supported(const TensorView& view, const char* op, const char* name);

[[noreturn]] void no_cuda_kernel(const char* op);

}  // namespace zerofuse::detail

// The DLPack exchange structs, written from the published specification
// (https://dmlc.github.io/dlpack/latest/c_api.html), so any producer -- numpy,
// cupy, jax -- can hand zerofuse its arrays without a copy.
#pragma once

#include <Python.h>

#include <cstdint>

#include "zerofuse/tensor.h"

namespace zerofuse::python {

namespace dlpack {

enum DeviceType : std::int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3 };
enum DataTypeCode : std::uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };

struct Device {
  std::int32_t device_type;
  std::int32_t device_id;
};
struct DataType {
  std::uint8_t code;
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null means row-major contiguous
  std::uint64_t byte_offset;
};
struct ManagedTensor {  // capsule "dltensor" (before DLPack 1.0)
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};
struct Version {
  std::uint32_t major;
  std::uint32_t minor;
};
constexpr std::uint64_t kFlagReadOnly = 1;
struct ManagedTensorVersioned {  // capsule "dltensor_versioned" (DLPack 1.x)
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  std::uint64_t flags;
  Tensor dl_tensor;
};

}  // namespace dlpack

// Owns what a DLPack import took until the kernel call is over.
class DLPackImport {
 public:
  DLPackImport() = default;
  DLPackImport(const DLPackImport&) = delete;
  DLPackImport& operator=(const DLPackImport&) = delete;
  DLPackImport(DLPackImport&& other) noexcept;
  ~DLPackImport();

  // Calls obj.__dlpack__() (asking for DLPack 1.0 first) and fills `view`.
  // Raises Python errors (via pybind11) that name `op` and `arg`.
  static DLPackImport from_object(PyObject* obj, const char* op, const char* arg, bool writable,
                                  TensorView& view);

 private:
  dlpack::ManagedTensor* legacy_ = nullptr;
  dlpack::ManagedTensorVersioned* versioned_ = nullptr;
};

}  // namespace zerofuse::python

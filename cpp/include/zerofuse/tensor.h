// TensorView: a non-owning description of an array in memory -- pointer, dtype,
// device, shape and strides (in elements). Every kernel takes views, so the core
// needs no tensor library: the Python bindings fill them from torch tensors or
// DLPack producers (numpy, cupy), C++ callers from their own buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace zerofuse {

enum class DType : std::uint8_t { Float32, Float16, BFloat16, Float64, Int32, Int64, UInt8, Bool };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);
inline bool is_floating(DType d) {
  return d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16 || d == DType::Float64;
}

enum class DeviceType : std::uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;  // CUDA ordinal; 0 for the CPU

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int index) { return {DeviceType::CUDA, index}; }
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
};
inline bool operator==(Device a, Device b) { return a.type == b.type && a.index == b.index; }
inline bool operator!=(Device a, Device b) { return !(a == b); }
std::string device_name(Device device);  // "cpu", "cuda:0"

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  std::int64_t shape[kMaxDims] = {};
  std::int64_t strides[kMaxDims] = {};  // in elements, not bytes

  // A contiguous (row-major) view of `data`.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                               Device device = Device::cpu());

  std::int64_t numel() const;
  std::int64_t size(int dim) const;  // negative dims count from the end
  bool is_contiguous() const;        // row-major dense; size-1 dims may have any stride
  std::size_t element_size() const { return dtype_size(dtype); }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data);
  }
};

// "float32[3, 4] on cpu" -- used in error messages.
std::string describe(const TensorView& view);

}  // namespace zerofuse

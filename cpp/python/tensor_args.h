// Turning Python arguments into TensorViews. torch tensors are read directly
// (data_ptr, dtype, shape, strides, device: a few attribute reads, no copies,
// no DLPack capsule) because the multi-tensor optimizer converts hundreds per
// step; anything else goes through __dlpack__.
#pragma once

#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "dlpack.h"
#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse::python {

namespace py = pybind11;

// One call's arguments. Keeps DLPack imports alive until the call is over
// (destroy it with the GIL held).
class Args {
 public:
  explicit Args(const char* op) : op_(op) {}

  const char* op() const { return op_; }

  TensorView tensor(py::handle obj, const std::string& name, bool writable = false);
  // None gives an empty optional.
  std::optional<TensorView> optional(py::handle obj, const std::string& name, bool writable = false);
  // A list or tuple of tensors; elements are named "name[i]" in errors.
  std::vector<TensorView> list(py::handle seq, const std::string& name, bool writable = false);

  // The stream kernels on `device` should use: `stream` if given (an int
  // cudaStream_t), else torch's current stream for that device, else the
  // default stream.
  Stream stream(py::handle stream, Device device);

 private:
  const char* op_;
  std::vector<DLPackImport> imports_;
};

}  // namespace zerofuse::python

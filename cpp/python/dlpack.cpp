#include "dlpack.h"

#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "zerofuse/error.h"

namespace py = pybind11;

namespace zerofuse::python {
namespace {

DType dtype_from_dlpack(const dlpack::DataType& t, const char* op, const char* arg) {
  if (t.lanes == 1) {
    if (t.code == dlpack::kFloat && t.bits == 32) return DType::Float32;
    if (t.code == dlpack::kFloat && t.bits == 16) return DType::Float16;
    if (t.code == dlpack::kFloat && t.bits == 64) return DType::Float64;
    if (t.code == dlpack::kBfloat && t.bits == 16) return DType::BFloat16;
    if (t.code == dlpack::kInt && t.bits == 32) return DType::Int32;
    if (t.code == dlpack::kInt && t.bits == 64) return DType::Int64;
    if (t.code == dlpack::kUInt && t.bits == 8) return DType::UInt8;
    if (t.code == dlpack::kBool && t.bits == 8) return DType::Bool;
  }
  type_error(op, ": argument '", arg, "' has a DLPack dtype zerofuse does not handle (code ", int(t.code),
             ", bits ", int(t.bits), ", lanes ", t.lanes, ")");
}

void fill_view(const dlpack::Tensor& t, const char* op, const char* arg, TensorView& view) {
  if (t.ndim < 0 || t.ndim > kMaxDims)
    value_error(op, ": argument '", arg, "' has ", t.ndim, " dimensions; zerofuse handles at most ", kMaxDims);
  view.dtype = dtype_from_dlpack(t.dtype, op, arg);
  switch (t.device.device_type) {
    case dlpack::kCPU:
    case dlpack::kCUDAHost: view.device = Device::cpu(); break;
    case dlpack::kCUDA: view.device = Device::cuda(t.device.device_id); break;
    default:
      value_error(op, ": argument '", arg, "' is on DLPack device type ", t.device.device_type,
                  "; zerofuse takes CPU and CUDA memory");
  }
  view.data = static_cast<char*>(t.data) + t.byte_offset;
  view.ndim = t.ndim;
  std::int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    view.shape[d] = t.shape[d];
    view.strides[d] = t.strides ? t.strides[d] : stride;
    stride *= t.shape[d];
  }
}

}  // namespace

DLPackImport::DLPackImport(DLPackImport&& other) noexcept
    : legacy_(std::exchange(other.legacy_, nullptr)), versioned_(std::exchange(other.versioned_, nullptr)) {}

DLPackImport::~DLPackImport() {
  if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
  if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
}

DLPackImport DLPackImport::from_object(PyObject* obj, const char* op, const char* arg, bool writable,
                                       TensorView& view) {
  py::handle h(obj);
  if (!py::hasattr(h, "__dlpack__"))
    type_error(op, ": argument '", arg, "' must be a torch.Tensor or an array with __dlpack__ (numpy, cupy), got ",
               std::string(py::str(py::type::handle_of(h).attr("__name__"))));
  DLPackImport import;
  py::object capsule;
  try {
    capsule = h.attr("__dlpack__")(py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;  // a producer from before DLPack 1.0
    capsule = h.attr("__dlpack__")();
  }
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    // Renaming marks the capsule consumed: from here on we call the deleter.
    PyCapsule_SetName(cap, "used_dltensor_versioned");
    import.versioned_ = m;
    if (m->version.major != 1)
      value_error(op, ": argument '", arg, "' uses DLPack ", m->version.major, ".", m->version.minor,
                  "; zerofuse reads DLPack 1.x");
    if (writable && (m->flags & dlpack::kFlagReadOnly))
      value_error(op, ": argument '", arg, "' is written to, but the array is read-only");
    fill_view(m->dl_tensor, op, arg, view);
  } else if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    PyCapsule_SetName(cap, "used_dltensor");
    import.legacy_ = m;
    fill_view(m->dl_tensor, op, arg, view);
  } else {
    type_error(op, ": argument '", arg, "': __dlpack__() did not return a DLPack capsule");
  }
  return import;
}

}  // namespace zerofuse::python

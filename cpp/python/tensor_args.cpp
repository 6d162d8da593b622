#include "tensor_args.h"

#include "zerofuse/error.h"

namespace zerofuse::python {
namespace {

// torch objects, looked up once torch has been imported by someone. zerofuse's
// core does not need torch; without it every argument goes through DLPack.
struct Torch {
  PyObject* tensor_type = nullptr;
  PyObject* strided = nullptr;
  PyObject* dtypes[8] = {};  // indexed like zerofuse::DType
};

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

const Torch* torch_objects() {
  static Torch torch;
  static bool ready = false;
  if (ready) return &torch;
  PyObject* modules = PyImport_GetModuleDict();
  PyObject* mod = PyDict_GetItemString(modules, "torch");  // borrowed
  if (mod == nullptr || mod == Py_None) return nullptr;  // torch not imported: no torch tensors exist
  py::handle t(mod);
  // References are kept for the life of the process on purpose.
  torch.tensor_type = py::object(t.attr("Tensor")).release().ptr();
  torch.strided = py::object(t.attr("strided")).release().ptr();
  const char* names[8] = {"float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", "bool"};
  for (int i = 0; i < 8; ++i) torch.dtypes[i] = py::object(t.attr(names[i])).release().ptr();
  ready = true;
  return &torch;
}

// Calls obj.name() or reads obj.name; throws the Python error if it fails.
py::object call0(py::handle obj, PyObject* name) {
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}
py::object getattr(py::handle obj, PyObject* name) {
  PyObject* r = PyObject_GetAttr(obj.ptr(), name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

void fill_sizes(py::handle tuple, std::int64_t* out, int ndim) {
  for (int d = 0; d < ndim; ++d) out[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple.ptr(), d));
}

TensorView view_of_torch_tensor(const Torch& torch, py::handle obj, const char* op, const std::string& name) {
  static PyObject* s_data_ptr = intern("data_ptr");
  static PyObject* s_dtype = intern("dtype");
  static PyObject* s_shape = intern("shape");
  static PyObject* s_stride = intern("stride");
  static PyObject* s_layout = intern("layout");
  static PyObject* s_is_cuda = intern("is_cuda");
  static PyObject* s_is_cpu = intern("is_cpu");
  static PyObject* s_get_device = intern("get_device");
  static PyObject* s_device = intern("device");

  TensorView view;
  if (getattr(obj, s_layout).ptr() != torch.strided)
    type_error(op, ": argument '", name, "' must be a dense (strided) tensor, got layout ",
               std::string(py::str(getattr(obj, s_layout))));
  py::object dtype = getattr(obj, s_dtype);
  int code = -1;
  for (int i = 0; i < 8; ++i)
    if (dtype.ptr() == torch.dtypes[i]) code = i;
  if (code < 0)
    type_error(op, ": argument '", name, "' has dtype ", std::string(py::str(dtype)),
               ", which zerofuse does not handle");
  view.dtype = static_cast<DType>(code);

  if (getattr(obj, s_is_cuda).ptr() == Py_True) {
    view.device = Device::cuda(int(PyLong_AsLong(call0(obj, s_get_device).ptr())));
  } else if (getattr(obj, s_is_cpu).ptr() == Py_True) {
    view.device = Device::cpu();
  } else {
    value_error(op, ": argument '", name, "' is on device '", std::string(py::str(getattr(obj, s_device))),
                "'; zerofuse takes cpu and cuda tensors");
  }

  py::object shape = getattr(obj, s_shape);
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape.ptr());
  if (ndim > kMaxDims)
    value_error(op, ": argument '", name, "' has ", ndim, " dimensions; zerofuse handles at most ", kMaxDims);
  view.ndim = int(ndim);
  fill_sizes(shape, view.shape, view.ndim);
  fill_sizes(call0(obj, s_stride), view.strides, view.ndim);
  view.data = PyLong_AsVoidPtr(call0(obj, s_data_ptr).ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  return view;
}

}  // namespace

TensorView Args::tensor(py::handle obj, const std::string& name, bool writable) {
  if (obj.is_none()) type_error(op_, ": argument '", name, "' must be a tensor, got None");
  const Torch* torch = torch_objects();
  if (torch != nullptr &&
      (Py_TYPE(obj.ptr()) == reinterpret_cast<PyTypeObject*>(torch->tensor_type) ||
       PyObject_IsInstance(obj.ptr(), torch->tensor_type) == 1))
    return view_of_torch_tensor(*torch, obj, op_, name);
  TensorView view;
  imports_.push_back(DLPackImport::from_object(obj.ptr(), op_, name.c_str(), writable, view));
  return view;
}

std::optional<TensorView> Args::optional(py::handle obj, const std::string& name, bool writable) {
  if (obj.is_none()) return std::nullopt;
  return tensor(obj, name, writable);
}

std::vector<TensorView> Args::list(py::handle seq, const std::string& name, bool writable) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
    type_error(op_, ": argument '", name, "' must be a list or tuple of tensors, got ",
               std::string(py::str(py::type::handle_of(seq).attr("__name__"))));
  py::sequence items = py::reinterpret_borrow<py::sequence>(seq);
  const std::size_t n = items.size();
  std::vector<TensorView> views;
  views.reserve(n);
  for (std::size_t i = 0; i < n; ++i) views.push_back(tensor(items[i], name + "[" + std::to_string(i) + "]", writable));
  return views;
}

Stream Args::stream(py::handle stream, Device device) {
  if (!stream.is_none()) return Stream{PyLong_AsVoidPtr(stream.ptr())};
  if (!device.is_cuda()) return Stream{};
  if (torch_objects() == nullptr) return Stream{};  // no torch: the legacy default stream
  // Leaked on purpose: destroying it after the interpreter is gone would crash.
  static PyObject* current_stream = py::object(py::module_::import("torch.cuda").attr("current_stream")).release().ptr();
  py::object s = py::reinterpret_borrow<py::object>(current_stream)(device.index);
  return Stream{PyLong_AsVoidPtr(s.attr("cuda_stream").ptr())};
}

}  // namespace zerofuse::python

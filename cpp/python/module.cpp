// zerofuse._C: the compiled core as seen from Python.
#include <pybind11/pybind11.h>

#include "zerofuse/error.h"

namespace zerofuse::python {
void bind_kernels(pybind11::module_& m);
void bind_runtime(pybind11::module_& m);
}  // namespace zerofuse::python

PYBIND11_MODULE(_C, m) {
  m.doc() = "zerofuse compiled core (C++/CUDA kernels, loss scaler, flat-buffer plan)";
  // zerofuse::Error -> the Python exception its kind names.
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const zerofuse::Error& e) {
      switch (e.kind()) {
        case zerofuse::ErrorKind::Value: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case zerofuse::ErrorKind::Type: PyErr_SetString(PyExc_TypeError, e.what()); return;
        case zerofuse::ErrorKind::Runtime: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    }
  });
  zerofuse::python::bind_kernels(m);
  zerofuse::python::bind_runtime(m);
}

// Shared helpers of the pybind11 glue: contiguous NumPy views of CPU tensors, shape checks
// whose messages name the buffer, and writable output pointers.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <string>

namespace fpkern_py {

namespace py = pybind11;

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

template <typename T>
void require(const Arr<T>& a, std::initializer_list<py::ssize_t> shape, const char* name) {
  if (static_cast<size_t>(a.ndim()) != shape.size()) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(shape.size()) +
                          " dimensions, got " + std::to_string(a.ndim()));
  }
  size_t i = 0;
  for (py::ssize_t n : shape) {
    if (a.shape(i) != n) {
      throw py::value_error(std::string(name) + ": dimension " + std::to_string(i) + " is " +
                            std::to_string(a.shape(i)) + ", expected " + std::to_string(n));
    }
    ++i;
  }
}

template <typename T>
T* wptr(Arr<T>& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + ": output is read-only");
  return a.mutable_data();
}

// One binder per kernel family (python/bind_*.cpp), called from bindings.cpp.
void bind_combine(py::module_& m);
void bind_fpe_terms(py::module_& m);
void bind_jet_act(py::module_& m);
void bind_group_norm_jet(py::module_& m);

}  // namespace fpkern_py

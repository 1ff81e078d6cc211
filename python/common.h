// Shared helpers of the pybind11 glue: contiguous NumPy views of CPU tensors, shape checks
// whose messages name the buffer, and writable output pointers.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <string>

#include "jet_layout.h"

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

// A jet layout (n1, pairs, c0, nc) checked against the row count; the pair index arrays
// must outlive the returned view.
inline fpkern::JetLayout checked_layout(py::ssize_t rows, int64_t n1, int64_t npairs,
                                        const int64_t* a, const int64_t* b, int64_t c0,
                                        int64_t nc) {
  const int64_t want = 1 + n1 + npairs + (nc > 0 ? 1 : 0);
  if (rows != want) {
    throw py::value_error("rows: the layout has " + std::to_string(want) + " rows, got " +
                          std::to_string(rows));
  }
  for (int64_t j = 0; j < npairs; ++j) {
    if (a[j] < 1 || a[j] > n1 || b[j] < 1 || b[j] > n1) {
      throw py::value_error("pair names a row outside the first-order rows 1.." +
                            std::to_string(n1));
    }
  }
  if (nc < 0 || (nc > 0 && (c0 < 1 || c0 + nc - 1 > n1))) {
    throw py::value_error("collapsed rows outside the first-order rows 1.." + std::to_string(n1));
  }
  return {rows, n1, npairs, a, b, c0, nc};
}

// One binder per kernel family (python/bind_*.cpp), called from bindings.cpp.
void bind_fpe_combine(py::module_& m);
void bind_hutchinson_reduce(py::module_& m);
void bind_laplacian_terms(py::module_& m);
void bind_jet_act(py::module_& m);
void bind_group_norm_jet(py::module_& m);

}  // namespace fpkern_py

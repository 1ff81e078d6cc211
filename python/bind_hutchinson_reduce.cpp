// pybind11 glue of fpkern::hutchinson_reduce (csrc/hutchinson_reduce.cpp).
#include "common.h"
#include "hutchinson_reduce.h"

namespace fpkern_py {
namespace {

template <typename T>
void fwd(Arr<T> v, Arr<T> jv, Arr<T> out) {
  if (v.ndim() != 3) throw py::value_error("v: expected 3 dimensions (K, rows, cols)");
  const py::ssize_t K = v.shape(0), rows = v.shape(1), cols = v.shape(2);
  require(jv, {K, rows, cols}, "jv");
  require(out, {rows}, "out");
  T* o = wptr(out, "out");
  py::gil_scoped_release nogil;
  fpkern::hutchinson_reduce_forward<T>(v.data(), jv.data(), K, rows, cols, o);
}

template <typename T>
void bwd(Arr<T> go, Arr<T> v, Arr<T> jv, Arr<T> d_v, Arr<T> d_jv) {
  if (v.ndim() != 3) throw py::value_error("v: expected 3 dimensions (K, rows, cols)");
  const py::ssize_t K = v.shape(0), rows = v.shape(1), cols = v.shape(2);
  require(go, {rows}, "grad_out");
  require(jv, {K, rows, cols}, "jv");
  require(d_v, {K, rows, cols}, "d_v");
  require(d_jv, {K, rows, cols}, "d_jv");
  T *a = wptr(d_v, "d_v"), *b = wptr(d_jv, "d_jv");
  py::gil_scoped_release nogil;
  fpkern::hutchinson_reduce_backward<T>(go.data(), v.data(), jv.data(), K, rows, cols, a, b);
}

}  // namespace

void bind_hutchinson_reduce(py::module_& m) {
  // Overloads are tried in order; py::array_t without forcecast matches the exact dtype.
  m.def("hutchinson_reduce_forward", &fwd<float>);
  m.def("hutchinson_reduce_forward", &fwd<double>);
  m.def("hutchinson_reduce_backward", &bwd<float>);
  m.def("hutchinson_reduce_backward", &bwd<double>);
}

}  // namespace fpkern_py

// pybind11 glue of fpkern::fpe_combine (csrc/fpe_combine.cpp).
#include "common.h"
#include "fpe_combine.h"

namespace fpkern_py {
namespace {

template <typename T>
void combine_fwd(Arr<T> dts, Arr<T> second, Arr<T> jc, Arr<T> s, Arr<T> g2, Arr<T> f,
                 Arr<T> out) {
  const py::ssize_t rows = dts.shape(0), cols = dts.ndim() == 2 ? dts.shape(1) : -1;
  require(dts, {rows, cols}, "dts");
  require(second, {rows, cols}, "second");
  require(jc, {rows, cols}, "jc");
  require(s, {rows, cols}, "s");
  require(g2, {rows}, "g2");
  require(f, {rows}, "f");
  require(out, {rows, cols}, "out");
  T* o = wptr(out, "out");
  py::gil_scoped_release nogil;
  fpkern::fpe_combine_forward<T>(dts.data(), second.data(), jc.data(), s.data(), g2.data(),
                                 f.data(), rows, cols, o);
}

template <typename T>
void combine_bwd(Arr<T> go, Arr<T> second, Arr<T> s, Arr<T> g2, Arr<T> f, Arr<T> d_dts,
                 Arr<T> d_second, Arr<T> d_jc, Arr<T> d_s, Arr<T> d_g2, Arr<T> d_f) {
  const py::ssize_t rows = go.shape(0), cols = go.ndim() == 2 ? go.shape(1) : -1;
  require(go, {rows, cols}, "grad_out");
  require(second, {rows, cols}, "second");
  require(s, {rows, cols}, "s");
  require(g2, {rows}, "g2");
  require(f, {rows}, "f");
  for (auto* a : {&d_dts, &d_second, &d_jc, &d_s}) require(*a, {rows, cols}, "grad buffer");
  require(d_g2, {rows}, "grad g2");
  require(d_f, {rows}, "grad f");
  T *a = wptr(d_dts, "d_dts"), *b = wptr(d_second, "d_second"), *c = wptr(d_jc, "d_jc"),
    *d = wptr(d_s, "d_s"), *e = wptr(d_g2, "d_g2"), *h = wptr(d_f, "d_f");
  py::gil_scoped_release nogil;
  fpkern::fpe_combine_backward<T>(go.data(), second.data(), s.data(), g2.data(), f.data(), rows,
                                  cols, a, b, c, d, e, h);
}

}  // namespace

void bind_fpe_combine(py::module_& m) {
  // Overloads are tried in order; py::array_t without forcecast matches the exact dtype.
  m.def("fpe_combine_forward", &combine_fwd<float>);
  m.def("fpe_combine_forward", &combine_fwd<double>);
  m.def("fpe_combine_backward", &combine_bwd<float>);
  m.def("fpe_combine_backward", &combine_bwd<double>);
}

}  // namespace fpkern_py

// pybind11 glue for the fused activation jet rule (csrc/jet_act.cpp). base: sigmoid or tanh
// of the value row (jet_act.h), from the caller.
#include <pybind11/stl.h>

#include <vector>

#include "common.h"
#include "jet_act.h"

namespace fpkern_py {
namespace {

fpkern::Act act_from(int act) {
  if (act < 0 || act > 2) throw py::value_error("act: expected 0 (silu), 1 (tanh) or 2 (sigmoid)");
  return static_cast<fpkern::Act>(act);
}

// The layout arrives as (n1, pair_a, pair_b, c0, nc); checked against the row count.
struct Layout {
  std::vector<int64_t> a, b;
  fpkern::JetLayout L{};
  Layout(py::ssize_t rows, int64_t n1, std::vector<int64_t> pa, std::vector<int64_t> pb,
         int64_t c0, int64_t nc)
      : a(std::move(pa)), b(std::move(pb)) {
    if (a.size() != b.size()) throw py::value_error("pair_a and pair_b differ in length");
    L = checked_layout(rows, n1, static_cast<int64_t>(a.size()), a.data(), b.data(), c0, nc);
  }
};

template <typename T>
void fwd(Arr<T> x, Arr<T> base, int act, int64_t n1, std::vector<int64_t> pa,
         std::vector<int64_t> pb, int64_t c0, int64_t nc, Arr<T> y) {
  if (x.ndim() != 2) throw py::value_error("rows: expected 2 dimensions (R, M)");
  const py::ssize_t R = x.shape(0), M = x.shape(1);
  require(base, {M}, "base");
  require(y, {R, M}, "out");
  Layout lay(R, n1, std::move(pa), std::move(pb), c0, nc);
  const fpkern::Act a = act_from(act);
  T* o = wptr(y, "out");
  py::gil_scoped_release nogil;
  fpkern::jet_act_forward<T>(x.data(), base.data(), a, lay.L, M, o);
}

template <typename T>
void bwd(Arr<T> gy, Arr<T> x, Arr<T> base, int act, int64_t n1, std::vector<int64_t> pa,
         std::vector<int64_t> pb, int64_t c0, int64_t nc, Arr<T> dx) {
  if (x.ndim() != 2) throw py::value_error("rows: expected 2 dimensions (R, M)");
  const py::ssize_t R = x.shape(0), M = x.shape(1);
  require(gy, {R, M}, "grad_out");
  require(base, {M}, "base");
  require(dx, {R, M}, "grad_rows");
  Layout lay(R, n1, std::move(pa), std::move(pb), c0, nc);
  const fpkern::Act a = act_from(act);
  T* o = wptr(dx, "grad_rows");
  py::gil_scoped_release nogil;
  fpkern::jet_act_backward<T>(gy.data(), x.data(), base.data(), a, lay.L, M, o);
}

}  // namespace

void bind_jet_act(py::module_& m) {
  m.def("jet_act_forward", &fwd<float>);
  m.def("jet_act_forward", &fwd<double>);
  m.def("jet_act_backward", &bwd<float>);
  m.def("jet_act_backward", &bwd<double>);
}

}  // namespace fpkern_py

// pybind11 glue for the fused GroupNorm jet rule (csrc/group_norm_jet.cpp).
//
// The layout's pair lists arrive as int64 NumPy arrays (no pybind11/stl.h here, so this
// file instantiates no STL casters); weight and bias as arrays or None.
#include <string>

#include "common.h"
#include "group_norm_jet.h"

namespace fpkern_py {
namespace {

using Index = Arr<int64_t>;

// Checks the rows (R, B, C, S) against the groups and the layout; keeps the pair arrays.
struct Shape {
  Index a, b;
  fpkern::GroupNormJetShape L{};
  Shape(py::ssize_t R, py::ssize_t B, py::ssize_t C, py::ssize_t S, int64_t groups, int64_t n1,
        Index pa, Index pb, int64_t c0, int64_t nc)
      : a(std::move(pa)), b(std::move(pb)) {
    if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0)) {
      throw py::value_error("pair_a and pair_b must be 1-D and of one length");
    }
    if (groups < 1 || C % groups != 0) {
      throw py::value_error("groups: " + std::to_string(groups) + " does not divide the " +
                            std::to_string(C) + " channels");
    }
    if (S < 1) throw py::value_error("rows: the spatial size must be at least 1");
    L = {checked_layout(R, n1, a.shape(0), a.data(), b.data(), c0, nc), B, C, S, groups};
  }
};

// The data pointer of an optional [C] parameter (None: null); `hold` keeps the array alive.
template <typename T>
const T* optional_param(const py::object& obj, py::ssize_t C, const char* name, Arr<T>& hold) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<Arr<T>>(obj)) {
    throw py::type_error(std::string(name) + ": expected a contiguous array of the rows' dtype");
  }
  hold = obj.cast<Arr<T>>();
  require(hold, {C}, name);
  return hold.data();
}

void require_rows(py::ssize_t ndim, const char* name) {
  if (ndim != 4) throw py::value_error(std::string(name) + ": expected 4 dimensions (R, B, C, S)");
}

template <typename T>
void fwd(Arr<T> x, py::object weight, py::object bias, int64_t groups, double eps, int64_t n1,
         Index pa, Index pb, int64_t c0, int64_t nc, Arr<T> y, Arr<T> mean, Arr<T> var) {
  require_rows(x.ndim(), "rows");
  const py::ssize_t R = x.shape(0), B = x.shape(1), C = x.shape(2), S = x.shape(3);
  Shape sh(R, B, C, S, groups, n1, std::move(pa), std::move(pb), c0, nc);
  Arr<T> hw, hb;
  const T* w = optional_param<T>(weight, C, "weight", hw);
  const T* b = optional_param<T>(bias, C, "bias", hb);
  require(y, {R, B, C, S}, "out");
  require(mean, {B, groups, R}, "mean");
  require(var, {B, groups, R}, "var");
  T *o = wptr(y, "out"), *m = wptr(mean, "mean"), *v = wptr(var, "var");
  py::gil_scoped_release nogil;
  fpkern::group_norm_jet_forward<T>(x.data(), w, b, sh.L, eps, o, m, v);
}

template <typename T>
void bwd(Arr<T> gy, Arr<T> x, py::object weight, Arr<T> mean, Arr<T> var, int64_t groups,
         double eps, int64_t n1, Index pa, Index pb, int64_t c0, int64_t nc, Arr<T> dx,
         Arr<T> dweight, Arr<T> dbias) {
  require_rows(x.ndim(), "rows");
  const py::ssize_t R = x.shape(0), B = x.shape(1), C = x.shape(2), S = x.shape(3);
  Shape sh(R, B, C, S, groups, n1, std::move(pa), std::move(pb), c0, nc);
  Arr<T> hw;
  const T* w = optional_param<T>(weight, C, "weight", hw);
  require(gy, {R, B, C, S}, "grad_out");
  require(mean, {B, groups, R}, "mean");
  require(var, {B, groups, R}, "var");
  require(dx, {R, B, C, S}, "grad_rows");
  require(dweight, {C}, "grad_weight");
  require(dbias, {C}, "grad_bias");
  T *d = wptr(dx, "grad_rows"), *dw = wptr(dweight, "grad_weight"), *db = wptr(dbias, "grad_bias");
  py::gil_scoped_release nogil;
  fpkern::group_norm_jet_backward<T>(gy.data(), x.data(), w, mean.data(), var.data(), sh.L, eps,
                                     d, dw, db);
}

}  // namespace

void bind_group_norm_jet(py::module_& m) {
  // Overloads are tried in order; py::array_t without forcecast matches the exact dtype.
  m.def("group_norm_jet_forward", &fwd<float>);
  m.def("group_norm_jet_forward", &fwd<double>);
  m.def("group_norm_jet_backward", &bwd<float>);
  m.def("group_norm_jet_backward", &bwd<double>);
}

}  // namespace fpkern_py

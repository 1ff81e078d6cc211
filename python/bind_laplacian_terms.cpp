// pybind11 glue of fpkern::laplacian_terms, the one-pass laplacian-form FPE terms
// (csrc/laplacian_terms.cpp).
#include "common.h"
#include "laplacian_terms.h"

namespace fpkern_py {
namespace {

template <typename T>
void fwd(Arr<T> v, Arr<T> jv, Arr<T> w, Arr<T> lap, Arr<T> s, Arr<T> x, Arr<T> g2, Arr<T> f,
         Arr<T> weight, double m, Arr<T> r, Arr<T> div, Arr<T> loss, Arr<T> h, Arr<T> sumsq) {
  if (v.ndim() != 3) throw py::value_error("v: expected 3 dimensions (K, B, N)");
  const py::ssize_t K = v.shape(0), B = v.shape(1), N = v.shape(2);
  require(jv, {K, B, N}, "jv");
  for (auto* a : {&w, &lap, &s, &x}) require(*a, {B, N}, "per-element term");
  for (auto* a : {&g2, &f, &weight}) require(*a, {B}, "per-sample coefficient");
  require(r, {B, N}, "r");
  for (auto* a : {&div, &loss, &h, &sumsq}) require(*a, {B}, "per-sample output");
  T *pr = wptr(r, "r"), *pd = wptr(div, "div"), *pl = wptr(loss, "loss"), *ph = wptr(h, "h"),
    *pq = wptr(sumsq, "sumsq");
  py::gil_scoped_release nogil;
  fpkern::laplacian_terms_forward<T>(v.data(), jv.data(), w.data(), lap.data(), s.data(),
                                     x.data(), g2.data(), f.data(), weight.data(), m, K, B, N, pr,
                                     pd, pl, ph, pq);
}

template <typename T>
void bwd(Arr<T> gr, Arr<T> gdiv, Arr<T> gloss, Arr<T> gh, Arr<T> v, Arr<T> lap, Arr<T> s,
         Arr<T> x, Arr<T> r, Arr<T> div, Arr<T> sumsq, Arr<T> g2, Arr<T> f, Arr<T> weight,
         double m, Arr<T> dw, Arr<T> dlap, Arr<T> ds, Arr<T> djv, Arr<T> dg2, Arr<T> df,
         Arr<T> dweight) {
  if (v.ndim() != 3) throw py::value_error("v: expected 3 dimensions (K, B, N)");
  const py::ssize_t K = v.shape(0), B = v.shape(1), N = v.shape(2);
  for (auto* a : {&gr, &lap, &s, &x, &r, &dw, &dlap, &ds}) require(*a, {B, N}, "per-element");
  for (auto* a : {&gdiv, &gloss, &gh, &div, &sumsq, &g2, &f, &weight, &dg2, &df, &dweight}) {
    require(*a, {B}, "per-sample");
  }
  require(djv, {K, B, N}, "djv");
  T *a = wptr(dw, "dw"), *b = wptr(dlap, "dlap"), *c = wptr(ds, "ds"), *d = wptr(djv, "djv"),
    *e = wptr(dg2, "dg2"), *g = wptr(df, "df"), *k = wptr(dweight, "dweight");
  py::gil_scoped_release nogil;
  fpkern::laplacian_terms_backward<T>(gr.data(), gdiv.data(), gloss.data(), gh.data(),
                                      v.data(), lap.data(), s.data(), x.data(), r.data(),
                                      div.data(), sumsq.data(), g2.data(), f.data(),
                                      weight.data(), m, K, B, N, a, b, c, d, e, g, k);
}

}  // namespace

void bind_laplacian_terms(py::module_& m) {
  m.def("laplacian_terms_forward", &fwd<float>);
  m.def("laplacian_terms_forward", &fwd<double>);
  m.def("laplacian_terms_backward", &bwd<float>);
  m.def("laplacian_terms_backward", &bwd<double>);
}

}  // namespace fpkern_py

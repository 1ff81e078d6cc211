// pybind11 module fpkern._C: each kernel family binds itself (python/bind_*.cpp).
// Arrays arrive as NumPy views of contiguous CPU tensors (zero copy); outputs are
// preallocated by the caller and written in place.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fpkern CPU kernels (float32 and float64; contiguous buffers)";
  fpkern_py::bind_fpe_combine(m);
  fpkern_py::bind_hutchinson_reduce(m);
  fpkern_py::bind_laplacian_terms(m);
  fpkern_py::bind_jet_act(m);
  fpkern_py::bind_group_norm_jet(m);
}

// pybind11 glue for the jet act kernels.
#include "common.h"

namespace fpkern_py {

void bind_jet_act(py::module_& m) { (void)m; }

}  // namespace fpkern_py

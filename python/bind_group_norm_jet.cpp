// pybind11 glue for the group norm jet kernels.
#include "common.h"

namespace fpkern_py {

void bind_group_norm_jet(py::module_& m) { (void)m; }

}  // namespace fpkern_py

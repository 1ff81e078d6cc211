// The row layout of a jet (fpkern/jet/tensor.py, Layout.kernel_spec) as the fused jet
// kernels take it. Row 0 is the value, rows 1..n1 first-order coefficients, then one row
// per pair (pair_a[j], pair_b[j]) (mixed second order), then, when nc > 0, the collapsed
// row averaging the second order over rows c0 .. c0+nc-1.
#pragma once

#include <cstdint>

namespace fpkern {

struct JetLayout {
  int64_t rows;           // R = 1 + n1 + npairs + (nc > 0)
  int64_t n1;
  int64_t npairs;
  const int64_t* pair_a;  // npairs entries, 1-based first-order rows
  const int64_t* pair_b;
  int64_t c0;             // first collapsed first-order row
  int64_t nc;             // number of collapsed rows (0: no collapsed row)
};

}  // namespace fpkern

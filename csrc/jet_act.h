// Elementwise jet rule of an activation phi (fpkern/jet/rules.py), fused into one pass.
//
// Rows: a contiguous (R, M) matrix, M = the elements of one row. Row 0 is the value, rows
// 1..n1 first-order coefficients, then one row per pair (pair_a[j], pair_b[j]) (mixed
// second order), then, when nc > 0, the collapsed row averaging the second order over
// rows c0 .. c0+nc-1. With d_j = phi^(j)(x0):
//   y0 = phi(x0), y_i = d1 x_i, y_pair = d1 x_pair + d2 x_a x_b,
//   y_coll = d1 x_coll + d2 mean_k x_k^2.
#pragma once

#include <cstdint>

namespace fpkern {

enum class Act : int { silu = 0, tanh = 1, sigmoid = 2 };

struct JetLayout {
  int64_t rows;          // R = 1 + n1 + npairs + (nc > 0)
  int64_t n1;
  int64_t npairs;
  const int64_t* pair_a;  // npairs entries, 1-based first-order rows
  const int64_t* pair_b;
  int64_t c0;            // first collapsed first-order row
  int64_t nc;            // number of collapsed rows (0: no collapsed row)
};

template <typename T>
void jet_act_forward(const T* x, Act act, const JetLayout& L, int64_t M, T* y);

// Vector-Jacobian product: dx (R, M) from the upstream gradient gy (R, M).
template <typename T>
void jet_act_backward(const T* gy, const T* x, Act act, const JetLayout& L, int64_t M, T* dx);

}  // namespace fpkern

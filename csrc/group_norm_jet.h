// GroupNorm jet rule (fpkern/jet/rules.py `_group_norm`), fused: every Taylor row of the
// output from one read of the input rows per (sample, group).
//
// Rows: a contiguous (R, B, C, S) array, S = the spatial size, laid out as JetLayout says
// (jet_layout.h). Per sample b and group g (N = C/G * S elements, m = mean over them):
//   c_r = X_r - m(X_r)
//   v_0 = m(c0 c0), v_i = 2 m(c0 c_i), v_q = 2 m(c0 c_q) + 2 m(c_a c_b),
//   v_z = 2 m(c0 c_z) + 2 mean_k m(c_k c_k)                    (the variance's Taylor rows)
//   u = rsqrt(v_0 + eps) to second order: u_0, u_i = u' v_i, u_q = u' v_q + u'' v_a v_b,
//   u_z = u' v_z + u'' mean_k v_k^2
//   yhat_0 = c0 u0, yhat_i = c_i u0 + c0 u_i, yhat_q = c_q u0 + c0 u_q + c_a u_b + c_b u_a,
//   yhat_z = c_z u0 + c0 u_z + 2 mean_k c_k u_k
//   Y_r = yhat_r weight[ch] (+ bias[ch] on row 0).
// Reductions (the means, variance rows and the backward's sums) accumulate in double; the
// elementwise combinations run in the storage type, so that they vectorise.
#pragma once

#include <cstdint>

#include "jet_layout.h"

namespace fpkern {

// The row layout plus the per-row tensor shape (R, B, C, S).
struct GroupNormJetShape : JetLayout {
  int64_t batch;          // B
  int64_t channels;       // C, a multiple of groups
  int64_t spatial;        // S
  int64_t groups;         // G
};

// Forward: y (R, B, C, S) and per (b, g) the row means and variance rows, mean and var
// (B, G, R), which the backward reuses. weight and bias ([C]) may be null.
template <typename T>
void group_norm_jet_forward(const T* x, const T* weight, const T* bias,
                            const GroupNormJetShape& L, double eps, T* y, T* mean, T* var);

// Vector-Jacobian product for the upstream gradient gy (R, B, C, S): dx (R, B, C, S) and,
// when not null, dweight = sum over b, rows, space of gy_r yhat_r and dbias = that of gy_0.
template <typename T>
void group_norm_jet_backward(const T* gy, const T* x, const T* weight, const T* mean,
                             const T* var, const GroupNormJetShape& L, double eps, T* dx,
                             T* dweight, T* dbias);

}  // namespace fpkern

// Elementwise jet rule of an activation phi (fpkern/jet/rules.py), fused into one pass.
//
// Rows: a contiguous (R, M) matrix, M = the elements of one row, laid out as JetLayout
// says (jet_layout.h). With d_j = phi^(j)(x0):
//   y0 = phi(x0), y_i = d1 x_i, y_pair = d1 x_pair + d2 x_a x_b,
//   y_coll = d1 x_coll + d2 mean_k x_k^2.
// base (M): phi's transcendental part at the value row, sigmoid(x0) for silu and sigmoid,
// tanh(x0) for tanh, from the caller (torch's vectorised exp); the derivatives are
// polynomials in it and x0, so the loops here make no calls and vectorise.
#pragma once

#include <cstdint>

#include "jet_layout.h"

namespace fpkern {

enum class Act : int { silu = 0, tanh = 1, sigmoid = 2 };

template <typename T>
void jet_act_forward(const T* x, const T* base, Act act, const JetLayout& L, int64_t M, T* y);

// Vector-Jacobian product: dx (R, M) from the upstream gradient gy (R, M).
template <typename T>
void jet_act_backward(const T* gy, const T* x, const T* base, Act act, const JetLayout& L, int64_t M, T* dx);

}  // namespace fpkern

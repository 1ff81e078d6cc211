// fpkern::hutchinson_reduce on the CPU: raw pointers and sizes, no Python and no torch headers.
//
// Probe stacks are contiguous (K, rows, cols), one row a sample; the per-sample output is a
// contiguous vector of length rows. Sums accumulate in double.
#pragma once

#include <cstdint>

namespace fpkern {

// Hutchinson reduction (MATH.md section 3): out[r] = 1/K sum_k sum_c v[k,r,c] jv[k,r,c].
template <typename T>
void hutchinson_reduce_forward(const T* v, const T* jv, int64_t K, int64_t rows, int64_t cols,
                               T* out);

// Its vector-Jacobian product: d_v = go[r]/K jv, d_jv = go[r]/K v.
template <typename T>
void hutchinson_reduce_backward(const T* go, const T* v, const T* jv, int64_t K, int64_t rows,
                                int64_t cols, T* d_v, T* d_jv);

}  // namespace fpkern

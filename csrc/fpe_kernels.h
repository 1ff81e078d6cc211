// fpkern CPU kernels on raw pointers and sizes: no Python and no torch headers.
//
// Layout: every per-element tensor is a contiguous (rows, cols) matrix, one row a sample;
// per-sample coefficients are contiguous vectors of length rows. Probe stacks are
// contiguous (K, rows, cols). Sums accumulate in double whatever the storage type.
#pragma once

#include <cstdint>

namespace fpkern {

// Score-FPE residual assembled from its terms (MATH.md section 2):
//   out = dts - 0.5 * g2[r] * second - jc + f[r] * s
// "second" is grad(div s) (div form) or Lap s (laplacian form); "jc" is J^T c or J c.
template <typename T>
void fpe_combine_forward(const T* dts, const T* second, const T* jc, const T* s,
                         const T* g2, const T* f, int64_t rows, int64_t cols, T* out);

// Its vector-Jacobian product for an upstream gradient go (rows, cols):
//   d_dts = go, d_second = -0.5 g2 go, d_jc = -go, d_s = f go,
//   d_g2[r] = -0.5 sum_c second go, d_f[r] = sum_c s go.
template <typename T>
void fpe_combine_backward(const T* go, const T* second, const T* s, const T* g2, const T* f,
                          int64_t rows, int64_t cols, T* d_dts, T* d_second, T* d_jc, T* d_s,
                          T* d_g2, T* d_f);

// Hutchinson reduction (MATH.md section 3): out[r] = 1/K sum_k sum_c v[k,r,c] jv[k,r,c].
template <typename T>
void hutchinson_forward(const T* v, const T* jv, int64_t K, int64_t rows, int64_t cols, T* out);

// Its vector-Jacobian product: d_v = go[r]/K jv, d_jv = go[r]/K v.
template <typename T>
void hutchinson_backward(const T* go, const T* v, const T* jv, int64_t K, int64_t rows,
                         int64_t cols, T* d_v, T* d_jv);

}  // namespace fpkern

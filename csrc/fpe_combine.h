// fpkern::fpe_combine on the CPU: raw pointers and sizes, no Python and no torch headers.
//
// Per-element tensors are contiguous (rows, cols) matrices, one row a sample; per-sample
// coefficients are contiguous vectors of length rows. Sums accumulate in double.
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

}  // namespace fpkern

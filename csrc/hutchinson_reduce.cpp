#include "hutchinson_reduce.h"

namespace fpkern {

template <typename T>
void hutchinson_reduce_forward(const T* v, const T* jv, int64_t K, int64_t rows, int64_t cols,
                               T* out) {
  const int64_t plane = rows * cols;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (K * plane > 32768)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    double acc = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const T* vr = v + k * plane + r * cols;
      const T* jr = jv + k * plane + r * cols;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) {
        acc += static_cast<double>(vr[c]) * static_cast<double>(jr[c]);
      }
    }
    out[r] = static_cast<T>(acc / static_cast<double>(K));
  }
}

template <typename T>
void hutchinson_reduce_backward(const T* go, const T* v, const T* jv, int64_t K, int64_t rows,
                                int64_t cols, T* d_v, T* d_jv) {
  const int64_t plane = rows * cols;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (K * plane > 32768)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T w = go[r] / static_cast<T>(K);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t base = k * plane + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        d_v[base + c] = w * jv[base + c];
        d_jv[base + c] = w * v[base + c];
      }
    }
  }
}

template void hutchinson_reduce_forward<float>(const float*, const float*, int64_t, int64_t,
                                               int64_t, float*);
template void hutchinson_reduce_forward<double>(const double*, const double*, int64_t, int64_t,
                                                int64_t, double*);
template void hutchinson_reduce_backward<float>(const float*, const float*, const float*, int64_t,
                                                int64_t, int64_t, float*, float*);
template void hutchinson_reduce_backward<double>(const double*, const double*, const double*,
                                                 int64_t, int64_t, int64_t, double*, double*);

}  // namespace fpkern

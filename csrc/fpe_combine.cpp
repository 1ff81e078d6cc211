#include "fpe_combine.h"

namespace fpkern {

template <typename T>
void fpe_combine_forward(const T* dts, const T* second, const T* jc, const T* s,
                         const T* g2, const T* f, int64_t rows, int64_t cols, T* out) {
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T half_g2 = T(0.5) * g2[r];
    const T fr = f[r];
    const int64_t base = r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = base + c;
      out[i] = dts[i] - half_g2 * second[i] - jc[i] + fr * s[i];
    }
  }
}

template <typename T>
void fpe_combine_backward(const T* go, const T* second, const T* s, const T* g2, const T* f,
                          int64_t rows, int64_t cols, T* d_dts, T* d_second, T* d_jc, T* d_s,
                          T* d_g2, T* d_f) {
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T half_g2 = T(0.5) * g2[r];
    const T fr = f[r];
    const int64_t base = r * cols;
    double acc_g2 = 0.0, acc_f = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = base + c;
      const T g = go[i];
      d_dts[i] = g;
      d_second[i] = -half_g2 * g;
      d_jc[i] = -g;
      d_s[i] = fr * g;
      acc_g2 += static_cast<double>(second[i]) * static_cast<double>(g);
      acc_f += static_cast<double>(s[i]) * static_cast<double>(g);
    }
    d_g2[r] = static_cast<T>(-0.5 * acc_g2);
    d_f[r] = static_cast<T>(acc_f);
  }
}

template void fpe_combine_forward<float>(const float*, const float*, const float*, const float*,
                                         const float*, const float*, int64_t, int64_t, float*);
template void fpe_combine_forward<double>(const double*, const double*, const double*,
                                          const double*, const double*, const double*, int64_t,
                                          int64_t, double*);
template void fpe_combine_backward<float>(const float*, const float*, const float*, const float*,
                                          const float*, int64_t, int64_t, float*, float*, float*,
                                          float*, float*, float*);
template void fpe_combine_backward<double>(const double*, const double*, const double*,
                                           const double*, const double*, int64_t, int64_t,
                                           double*, double*, double*, double*, double*, double*);

}  // namespace fpkern

#include "laplacian_terms.h"

#include <cmath>

// Reductions carry `omp simd reduction` so that they vectorise (plain loops may not reorder
// floating-point sums); the partial sums are still in double.
namespace fpkern {
namespace {

// |r|^m and m |r|^(m-2) from |r|^2 (the latter 0 at r = 0, where no direction exists).
inline double norm_pow(double sumsq, double m) { return std::pow(sumsq, 0.5 * m); }
inline double norm_slope(double sumsq, double m) {
  return sumsq > 0.0 ? m * std::pow(sumsq, 0.5 * m - 1.0) : (m == 2.0 ? 2.0 : 0.0);
}

}  // namespace

template <typename T>
void laplacian_terms_forward(const T* v, const T* jv, const T* w, const T* lap, const T* s,
                             const T* x, const T* g2, const T* f, const T* weight, double m,
                             int64_t K, int64_t B, int64_t N, T* r, T* div, T* loss, T* h,
                             T* sumsq) {
  const int64_t plane = B * N;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if ((K + 4) * plane > 32768)
#endif
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * N;
    const T hg = T(0.5) * g2[b], fb = f[b];
    double rr = 0.0, ss = 0.0, xs = 0.0, dv = 0.0;
#pragma omp simd reduction(+ : rr, ss, xs)
    for (int64_t n = 0; n < N; ++n) {
      const T ri = w[o + n] - hg * lap[o + n] + fb * s[o + n];
      r[o + n] = ri;
      rr += static_cast<double>(ri) * ri;
      ss += static_cast<double>(s[o + n]) * s[o + n];
      xs += static_cast<double>(x[o + n]) * s[o + n];
    }
    for (int64_t k = 0; k < K; ++k) {
      const T *vk = v + k * plane + o, *jk = jv + k * plane + o;
#pragma omp simd reduction(+ : dv)
      for (int64_t n = 0; n < N; ++n) dv += static_cast<double>(vk[n]) * jk[n];
    }
    dv /= static_cast<double>(K);
    div[b] = static_cast<T>(dv);
    sumsq[b] = static_cast<T>(rr);
    loss[b] = static_cast<T>(static_cast<double>(weight[b]) * norm_pow(rr, m));
    h[b] = static_cast<T>(0.5 * static_cast<double>(g2[b]) * (dv + ss) -
                          static_cast<double>(fb) * xs);
  }
}

template <typename T>
void laplacian_terms_backward(const T* gr, const T* gdiv, const T* gloss, const T* gh,
                              const T* v, const T* lap, const T* s, const T* x, const T* r,
                              const T* div, const T* sumsq, const T* g2, const T* f,
                              const T* weight, double m, int64_t K, int64_t B, int64_t N, T* dw,
                              T* dlap, T* ds, T* djv, T* dg2, T* df, T* dweight) {
  const int64_t plane = B * N;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if ((K + 4) * plane > 32768)
#endif
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * N;
    const double rr = sumsq[b];
    const T a = static_cast<T>(static_cast<double>(gloss[b]) * weight[b] * norm_slope(rr, m));
    const T hg = T(0.5) * g2[b], fb = f[b], ghb = gh[b];
    double lap_dr = 0.0, s_dr = 0.0, ss = 0.0, xs = 0.0;
#pragma omp simd reduction(+ : lap_dr, s_dr, ss, xs)
    for (int64_t n = 0; n < N; ++n) {
      const T dr = gr[o + n] + a * r[o + n];
      dw[o + n] = dr;
      dlap[o + n] = -hg * dr;
      ds[o + n] = fb * dr + ghb * (g2[b] * s[o + n] - fb * x[o + n]);
      lap_dr += static_cast<double>(lap[o + n]) * dr;
      s_dr += static_cast<double>(s[o + n]) * dr;
      ss += static_cast<double>(s[o + n]) * s[o + n];
      xs += static_cast<double>(x[o + n]) * s[o + n];
    }
    const T cdiv = (gdiv[b] + hg * ghb) / static_cast<T>(K);
    for (int64_t k = 0; k < K; ++k) {
      const T* vk = v + k * plane + o;
      T* dk = djv + k * plane + o;
      for (int64_t n = 0; n < N; ++n) dk[n] = cdiv * vk[n];
    }
    dg2[b] = static_cast<T>(-0.5 * lap_dr + 0.5 * static_cast<double>(ghb) * (div[b] + ss));
    df[b] = static_cast<T>(s_dr - static_cast<double>(ghb) * xs);
    dweight[b] = static_cast<T>(static_cast<double>(gloss[b]) * norm_pow(rr, m));
  }
}

#define FPKERN_INSTANTIATE(T)                                                                  \
  template void laplacian_terms_forward<T>(const T*, const T*, const T*, const T*, const T*,   \
                                           const T*, const T*, const T*, const T*, double,     \
                                           int64_t, int64_t, int64_t, T*, T*, T*, T*, T*);     \
  template void laplacian_terms_backward<T>(const T*, const T*, const T*, const T*, const T*,  \
                                            const T*, const T*, const T*, const T*, const T*,  \
                                            const T*, const T*, const T*, const T*, double,    \
                                            int64_t, int64_t, int64_t, T*, T*, T*, T*, T*, T*, \
                                            T*);
FPKERN_INSTANTIATE(float)
FPKERN_INSTANTIATE(double)
#undef FPKERN_INSTANTIATE

}  // namespace fpkern

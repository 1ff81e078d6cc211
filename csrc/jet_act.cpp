#include "jet_act.h"

#include <algorithm>
#include <cmath>

namespace fpkern {
namespace {

constexpr int64_t kBlock = 256;  // elements per tile: derivative tiles stay in L1

// phi, phi', phi'' (and phi-triple-prime when d3) on a tile from x and base (jet_act.h).
template <typename T>
void derivs(Act act, const T* x, const T* base, int64_t n, T* d0, T* d1, T* d2, T* d3) {
  switch (act) {
    case Act::silu:
#pragma omp simd
      for (int64_t m = 0; m < n; ++m) {
        const T s = base[m], p = s * (T(1) - s), q = T(1) - T(2) * s;
        d0[m] = x[m] * s;
        d1[m] = s * (T(1) + x[m] * (T(1) - s));
        d2[m] = p * (T(2) + x[m] * q);
      }
      if (d3) {
#pragma omp simd
        for (int64_t m = 0; m < n; ++m) {
          const T s = base[m], p = s * (T(1) - s), q = T(1) - T(2) * s;
          d3[m] = p * (q * (T(3) + x[m] * q) - T(2) * x[m] * p);
        }
      }
      break;
    case Act::tanh:
#pragma omp simd
      for (int64_t m = 0; m < n; ++m) {
        const T y = base[m], e = T(1) - y * y;
        d0[m] = y;
        d1[m] = e;
        d2[m] = T(-2) * y * e;
      }
      if (d3) {
#pragma omp simd
        for (int64_t m = 0; m < n; ++m) {
          const T y = base[m], e = T(1) - y * y;
          d3[m] = e * (T(6) * y * y - T(2));
        }
      }
      break;
    case Act::sigmoid:
#pragma omp simd
      for (int64_t m = 0; m < n; ++m) {
        const T s = base[m], p = s * (T(1) - s);
        d0[m] = s;
        d1[m] = p;
        d2[m] = p * (T(1) - T(2) * s);
      }
      if (d3) {
#pragma omp simd
        for (int64_t m = 0; m < n; ++m) {
          const T s = base[m], p = s * (T(1) - s);
          d3[m] = p - T(6) * p * p;
        }
      }
      break;
  }
}

inline int64_t tiles(int64_t M) { return (M + kBlock - 1) / kBlock; }

}  // namespace

template <typename T>
void jet_act_forward(const T* x, const T* base, Act act, const JetLayout& L, int64_t M,
                     T* y) {
  const int64_t first_pair = 1 + L.n1, coll = first_pair + L.npairs;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (L.rows * M > 32768)
#endif
  for (int64_t tile = 0; tile < tiles(M); ++tile) {
    const int64_t o = tile * kBlock, n = std::min(kBlock, M - o);
    T d1[kBlock], d2[kBlock];
    derivs<T>(act, x + o, base + o, n, y + o, d1, d2, nullptr);
    for (int64_t i = 1; i <= L.n1; ++i) {
      const T* xi = x + i * M + o;
      T* yi = y + i * M + o;
      for (int64_t m = 0; m < n; ++m) yi[m] = d1[m] * xi[m];
    }
    for (int64_t j = 0; j < L.npairs; ++j) {
      const int64_t r = first_pair + j;
      const T *xr = x + r * M + o, *xa = x + L.pair_a[j] * M + o, *xb = x + L.pair_b[j] * M + o;
      T* yr = y + r * M + o;
      for (int64_t m = 0; m < n; ++m) yr[m] = d1[m] * xr[m] + d2[m] * xa[m] * xb[m];
    }
    if (L.nc > 0) {
      T sq[kBlock] = {};
      for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) {
        const T* xk = x + k * M + o;
        for (int64_t m = 0; m < n; ++m) sq[m] += xk[m] * xk[m];
      }
      const T inv = T(1) / static_cast<T>(L.nc);
      const T* xz = x + coll * M + o;
      T* yz = y + coll * M + o;
      for (int64_t m = 0; m < n; ++m) yz[m] = d1[m] * xz[m] + d2[m] * sq[m] * inv;
    }
  }
}

template <typename T>
void jet_act_backward(const T* gy, const T* x, const T* base, Act act, const JetLayout& L,
                      int64_t M, T* dx) {
  const int64_t first_pair = 1 + L.n1, coll = first_pair + L.npairs;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (L.rows * M > 32768)
#endif
  for (int64_t tile = 0; tile < tiles(M); ++tile) {
    const int64_t o = tile * kBlock, n = std::min(kBlock, M - o);
    T d0[kBlock], d1[kBlock], d2[kBlock], d3[kBlock], g0[kBlock];
    derivs<T>(act, x + o, base + o, n, d0, d1, d2, d3);
    const T* gv = gy + o;
    for (int64_t m = 0; m < n; ++m) g0[m] = gv[m] * d1[m];       // the value row
    for (int64_t i = 1; i <= L.n1; ++i) {                         // first order
      const T *gi = gy + i * M + o, *xi = x + i * M + o;
      T* di = dx + i * M + o;
      for (int64_t m = 0; m < n; ++m) {
        g0[m] += gi[m] * d2[m] * xi[m];
        di[m] = gi[m] * d1[m];
      }
    }
    for (int64_t j = 0; j < L.npairs; ++j) {                      // mixed second order
      const int64_t r = first_pair + j, a = L.pair_a[j], b = L.pair_b[j];
      const T *gq = gy + r * M + o, *xr = x + r * M + o, *xa = x + a * M + o, *xb = x + b * M + o;
      T *da = dx + a * M + o, *db = dx + b * M + o, *dr = dx + r * M + o;
      for (int64_t m = 0; m < n; ++m) {
        g0[m] += gq[m] * (d2[m] * xr[m] + d3[m] * xa[m] * xb[m]);
        da[m] += gq[m] * d2[m] * xb[m];
        db[m] += gq[m] * d2[m] * xa[m];
        dr[m] = gq[m] * d1[m];
      }
    }
    if (L.nc > 0) {                                               // collapsed second order
      const T inv = T(1) / static_cast<T>(L.nc);
      const T *gz = gy + coll * M + o, *xz = x + coll * M + o;
      T* dz = dx + coll * M + o;
      for (int64_t m = 0; m < n; ++m) {
        g0[m] += gz[m] * d2[m] * xz[m];
        dz[m] = gz[m] * d1[m];
      }
      for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) {
        const T* xk = x + k * M + o;
        T* dk = dx + k * M + o;
        for (int64_t m = 0; m < n; ++m) {
          g0[m] += gz[m] * d3[m] * xk[m] * xk[m] * inv;
          dk[m] += T(2) * gz[m] * d2[m] * xk[m] * inv;
        }
      }
    }
    T* d0r = dx + o;
    for (int64_t m = 0; m < n; ++m) d0r[m] = g0[m];
  }
}

template void jet_act_forward<float>(const float*, const float*, Act, const JetLayout&, int64_t,
                                     float*);
template void jet_act_forward<double>(const double*, const double*, Act, const JetLayout&,
                                      int64_t, double*);
template void jet_act_backward<float>(const float*, const float*, const float*, Act,
                                      const JetLayout&, int64_t, float*);
template void jet_act_backward<double>(const double*, const double*, const double*, Act,
                                       const JetLayout&, int64_t, double*);

}  // namespace fpkern

#include "group_norm_jet.h"

#include <cmath>
#include <vector>

namespace fpkern {
namespace {

// rsqrt(s) and its first three derivatives at s = v0 + eps.
struct Rsqrt {
  double u0, u1, u2, u3;
  Rsqrt(double v0, double eps) {
    const double s = v0 + eps;
    u0 = 1.0 / std::sqrt(s);
    u1 = -0.5 * u0 / s;
    u2 = 0.75 * u0 / (s * s);
    u3 = -1.875 * u0 / (s * s * s);
  }
};

// Taylor rows of u = rsqrt(v0 + eps) from the variance rows v.
void rsqrt_rows(const GroupNormJetShape& L, const double* v, const Rsqrt& d, double* u) {
  u[0] = d.u0;
  for (int64_t r = 1; r < L.rows; ++r) u[r] = d.u1 * v[r];
  for (int64_t j = 0; j < L.npairs; ++j) u[1 + L.n1 + j] += d.u2 * v[L.pair_a[j]] * v[L.pair_b[j]];
  if (L.nc > 0) {
    double sq = 0.0;
    for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) sq += v[k] * v[k];
    u[L.rows - 1] += d.u2 * sq / static_cast<double>(L.nc);
  }
}

// yhat rows of one element from its centred rows c.
void yhat_rows(const GroupNormJetShape& L, const double* c, const double* u, double* out) {
  out[0] = c[0] * u[0];
  for (int64_t r = 1; r < L.rows; ++r) out[r] = c[r] * u[0] + c[0] * u[r];
  for (int64_t j = 0; j < L.npairs; ++j) {
    const int64_t a = L.pair_a[j], b = L.pair_b[j];
    out[1 + L.n1 + j] += c[a] * u[b] + c[b] * u[a];
  }
  if (L.nc > 0) {
    double t = 0.0;
    for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) t += c[k] * u[k];
    out[L.rows - 1] += 2.0 * t / static_cast<double>(L.nc);
  }
}

// Gradient with respect to the centred rows c of one element, given the gradient g of its
// yhat rows and the per-group gradients gv of the variance rows (k2 = 2 / N). Linear in
// (g, c), so applied to the group means of g and c it gives the mean of its result.
void centred_grad(const GroupNormJetShape& L, const double* g, const double* c, const double* u,
                  const double* gv, double k2, double* out) {
  out[0] = u[0] * g[0] + k2 * gv[0] * c[0];
  for (int64_t r = 1; r < L.rows; ++r) {
    out[0] += u[r] * g[r] + k2 * gv[r] * c[r];
    out[r] = u[0] * g[r] + k2 * gv[r] * c[0];
  }
  for (int64_t j = 0; j < L.npairs; ++j) {
    const int64_t q = 1 + L.n1 + j, a = L.pair_a[j], b = L.pair_b[j];
    out[a] += u[b] * g[q] + k2 * gv[q] * c[b];
    out[b] += u[a] * g[q] + k2 * gv[q] * c[a];
  }
  if (L.nc > 0) {
    const int64_t z = L.rows - 1;
    const double w = 2.0 / static_cast<double>(L.nc);
    for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) out[k] += w * (u[k] * g[z] + k2 * gv[z] * c[k]);
  }
}

}  // namespace

template <typename T>
void group_norm_jet_forward(const T* x, const T* weight, const T* bias,
                            const GroupNormJetShape& L, double eps, T* y, T* mean, T* var) {
  const int64_t R = L.rows, C = L.channels, S = L.spatial, G = L.groups, CG = C / G;
  const int64_t N = CG * S, plane = L.batch * C * S, count = L.batch * G;
  const double inv_n = 1.0 / static_cast<double>(N);
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel if (count * R * N > 32768)
#endif
  {
    std::vector<double> buf(6 * R + L.npairs);
    double *m = buf.data(), *v = m + R, *u = v + R, *c = u + R, *yh = c + R, *acc = yh + R;
    double* accp = acc + R;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t bg = 0; bg < count; ++bg) {
      const int64_t g = bg % G, base = ((bg / G) * C + g * CG) * S;
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + r * plane + base;
        double s = 0.0;
        for (int64_t e = 0; e < N; ++e) s += static_cast<double>(xr[e]);
        m[r] = s * inv_n;
        acc[r] = 0.0;
      }
      for (int64_t j = 0; j < L.npairs; ++j) accp[j] = 0.0;
      double acc_sq = 0.0;
      for (int64_t e = 0; e < N; ++e) {
        for (int64_t r = 0; r < R; ++r) c[r] = static_cast<double>(x[r * plane + base + e]) - m[r];
        for (int64_t r = 0; r < R; ++r) acc[r] += c[0] * c[r];
        for (int64_t j = 0; j < L.npairs; ++j) accp[j] += c[L.pair_a[j]] * c[L.pair_b[j]];
        for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) acc_sq += c[k] * c[k];
      }
      v[0] = acc[0] * inv_n;
      for (int64_t r = 1; r < R; ++r) v[r] = 2.0 * acc[r] * inv_n;
      for (int64_t j = 0; j < L.npairs; ++j) v[1 + L.n1 + j] += 2.0 * accp[j] * inv_n;
      if (L.nc > 0) v[R - 1] += 2.0 * acc_sq * inv_n / static_cast<double>(L.nc);
      const Rsqrt d(v[0], eps);
      rsqrt_rows(L, v, d, u);
      for (int64_t r = 0; r < R; ++r) {
        mean[bg * R + r] = static_cast<T>(m[r]);
        var[bg * R + r] = static_cast<T>(v[r]);
      }
      for (int64_t ch = 0; ch < CG; ++ch) {
        const int64_t cc = g * CG + ch;
        const double w = weight ? static_cast<double>(weight[cc]) : 1.0;
        const double b0 = bias ? static_cast<double>(bias[cc]) : 0.0;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t e = ch * S + s;
          for (int64_t r = 0; r < R; ++r) {
            c[r] = static_cast<double>(x[r * plane + base + e]) - m[r];
          }
          yhat_rows(L, c, u, yh);
          y[base + e] = static_cast<T>(yh[0] * w + b0);
          for (int64_t r = 1; r < R; ++r) y[r * plane + base + e] = static_cast<T>(yh[r] * w);
        }
      }
    }
  }
}

template <typename T>
void group_norm_jet_backward(const T* gy, const T* x, const T* weight, const T* mean,
                             const T* var, const GroupNormJetShape& L, double eps, T* dx,
                             T* dweight, T* dbias) {
  const int64_t R = L.rows, C = L.channels, S = L.spatial, G = L.groups, CG = C / G;
  const int64_t N = CG * S, plane = L.batch * C * S, count = L.batch * G;
  const double inv_n = 1.0 / static_cast<double>(N), k2 = 2.0 * inv_n;
  const double inv_nc = L.nc > 0 ? 1.0 / static_cast<double>(L.nc) : 0.0;
  // Per-(sample, channel) partial sums of dweight and dbias: each (b, g) writes its own
  // channels, so the threads never share an entry; reduced over b below.
  const bool want_w = dweight != nullptr, want_b = dbias != nullptr;
  std::vector<double> part_w(want_w ? L.batch * C : 0), part_b(want_b ? L.batch * C : 0);
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel if (count * R * N > 32768)
#endif
  {
    std::vector<double> buf(13 * R + 2 * L.npairs + L.nc);
    double *m = buf.data(), *v = m + R, *u = v + R, *c = u + R, *g = c + R, *yh = g + R;
    double *s_gc = yh + R, *s_g0 = s_gc + R, *s_g = s_g0 + R, *s_c = s_g + R, *gu = s_c + R;
    double *gv = gu + R, *mean_gc = gv + R, *s_a = mean_gc + R, *s_b = s_a + L.npairs;
    double* s_k = s_b + L.npairs;
#if defined(FPKERN_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t bg = 0; bg < count; ++bg) {
      const int64_t b = bg / G, g0 = bg % G, base = (b * C + g0 * CG) * S;
      for (int64_t r = 0; r < R; ++r) {
        m[r] = static_cast<double>(mean[bg * R + r]);
        v[r] = static_cast<double>(var[bg * R + r]);
        s_gc[r] = s_g0[r] = s_g[r] = s_c[r] = 0.0;
      }
      for (int64_t j = 0; j < L.npairs; ++j) s_a[j] = s_b[j] = 0.0;
      for (int64_t k = 0; k < L.nc; ++k) s_k[k] = 0.0;
      const Rsqrt d(v[0], eps);
      rsqrt_rows(L, v, d, u);

      // pass 1: the reductions of the upstream gradient against the centred rows
      for (int64_t ch = 0; ch < CG; ++ch) {
        const int64_t cc = g0 * CG + ch;
        const double w = weight ? static_cast<double>(weight[cc]) : 1.0;
        double pw = 0.0, pb = 0.0;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t e = base + ch * S + s;
          for (int64_t r = 0; r < R; ++r) {
            c[r] = static_cast<double>(x[r * plane + e]) - m[r];
            g[r] = static_cast<double>(gy[r * plane + e]);
          }
          if (want_w) {
            yhat_rows(L, c, u, yh);
            for (int64_t r = 0; r < R; ++r) pw += g[r] * yh[r];
          }
          pb += g[0];
          for (int64_t r = 0; r < R; ++r) {
            g[r] *= w;
            s_gc[r] += g[r] * c[r];
            s_g0[r] += g[r] * c[0];
            s_g[r] += g[r];
            s_c[r] += c[r];
          }
          for (int64_t j = 0; j < L.npairs; ++j) {
            const double gq = g[1 + L.n1 + j];
            s_a[j] += gq * c[L.pair_a[j]];
            s_b[j] += gq * c[L.pair_b[j]];
          }
          for (int64_t k = 0; k < L.nc; ++k) s_k[k] += g[R - 1] * c[L.c0 + k];
        }
        if (want_w) part_w[b * C + cc] = pw;
        if (want_b) part_b[b * C + cc] = pb;
      }

      // reverse through the per-group scalars: yhat -> u -> v
      gu[0] = 0.0;
      for (int64_t r = 0; r < R; ++r) gu[0] += s_gc[r];
      for (int64_t r = 1; r < R; ++r) gu[r] = s_g0[r];
      for (int64_t j = 0; j < L.npairs; ++j) {
        gu[L.pair_b[j]] += s_a[j];
        gu[L.pair_a[j]] += s_b[j];
      }
      for (int64_t k = 0; k < L.nc; ++k) gu[L.c0 + k] += 2.0 * inv_nc * s_k[k];
      double gu1 = 0.0, gu2 = 0.0;
      for (int64_t r = 1; r < R; ++r) {
        gv[r] = d.u1 * gu[r];
        gu1 += gu[r] * v[r];
      }
      for (int64_t j = 0; j < L.npairs; ++j) {
        const int64_t q = 1 + L.n1 + j, a = L.pair_a[j], bb = L.pair_b[j];
        gv[a] += gu[q] * d.u2 * v[bb];
        gv[bb] += gu[q] * d.u2 * v[a];
        gu2 += gu[q] * v[a] * v[bb];
      }
      if (L.nc > 0) {
        const double gz = gu[R - 1];
        double sq = 0.0;
        for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) {
          gv[k] += gz * d.u2 * 2.0 * inv_nc * v[k];
          sq += v[k] * v[k];
        }
        gu2 += gz * sq * inv_nc;
      }
      gv[0] = gu[0] * d.u1 + gu1 * d.u2 + gu2 * d.u3;

      // pass 2: dx_r = dc_r - m(dc_r), the mean from the group means of g and c
      for (int64_t r = 0; r < R; ++r) {
        s_g[r] *= inv_n;
        s_c[r] *= inv_n;
      }
      centred_grad(L, s_g, s_c, u, gv, k2, mean_gc);
      for (int64_t ch = 0; ch < CG; ++ch) {
        const double w = weight ? static_cast<double>(weight[g0 * CG + ch]) : 1.0;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t e = base + ch * S + s;
          for (int64_t r = 0; r < R; ++r) {
            c[r] = static_cast<double>(x[r * plane + e]) - m[r];
            g[r] = static_cast<double>(gy[r * plane + e]) * w;
          }
          centred_grad(L, g, c, u, gv, k2, yh);
          for (int64_t r = 0; r < R; ++r) dx[r * plane + e] = static_cast<T>(yh[r] - mean_gc[r]);
        }
      }
    }
  }
  for (int64_t cc = 0; cc < C; ++cc) {
    double sw = 0.0, sb = 0.0;
    for (int64_t b = 0; b < L.batch; ++b) {
      if (want_w) sw += part_w[b * C + cc];
      if (want_b) sb += part_b[b * C + cc];
    }
    if (want_w) dweight[cc] = static_cast<T>(sw);
    if (want_b) dbias[cc] = static_cast<T>(sb);
  }
}

template void group_norm_jet_forward<float>(const float*, const float*, const float*,
                                            const GroupNormJetShape&, double, float*, float*,
                                            float*);
template void group_norm_jet_forward<double>(const double*, const double*, const double*,
                                             const GroupNormJetShape&, double, double*, double*,
                                             double*);
template void group_norm_jet_backward<float>(const float*, const float*, const float*,
                                             const float*, const float*, const GroupNormJetShape&,
                                             double, float*, float*, float*);
template void group_norm_jet_backward<double>(const double*, const double*, const double*,
                                              const double*, const double*,
                                              const GroupNormJetShape&, double, double*, double*,
                                              double*);

}  // namespace fpkern

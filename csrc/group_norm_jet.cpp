#include "group_norm_jet.h"

#include <algorithm>
#include <cmath>
#include <vector>

// Row-major: per (sample, group) every Taylor row is N = C/G * S contiguous elements, so
// each reduction and each output row is a loop over one or two contiguous streams that the
// compiler vectorises (`omp simd`). The rule is written as two sparse bilinear forms,
//   yhat_r = sum over terms (r, j, k, f) of f u_k c_j      (the normalised rows)
//   v_r    = sum over terms (r, i, j, h) of h m(c_i c_j)   (the variance rows),
// listed once from the layout and shared by the forward and the backward.
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

struct YTerm {  // yhat_r += f u_k c_j
  int64_t r, j, k;
  double f;
};
struct VTerm {  // v_r += h m(c_i c_j)
  int64_t r, i, j;
  double h;
};

struct Terms {
  std::vector<YTerm> y;
  std::vector<VTerm> v;
  explicit Terms(const GroupNormJetShape& L) {
    const int64_t R = L.rows;
    y.push_back({0, 0, 0, 1.0});
    v.push_back({0, 0, 0, 1.0});
    for (int64_t r = 1; r < R; ++r) {
      y.push_back({r, r, 0, 1.0});
      y.push_back({r, 0, r, 1.0});
      v.push_back({r, 0, r, 2.0});
    }
    for (int64_t p = 0; p < L.npairs; ++p) {
      const int64_t q = 1 + L.n1 + p, a = L.pair_a[p], b = L.pair_b[p];
      y.push_back({q, a, b, 1.0});
      y.push_back({q, b, a, 1.0});
      v.push_back({q, a, b, 2.0});
    }
    const double inv_nc = L.nc > 0 ? 1.0 / static_cast<double>(L.nc) : 0.0;
    for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) {
      y.push_back({R - 1, k, k, 2.0 * inv_nc});
      v.push_back({R - 1, k, k, 2.0 * inv_nc});
    }
    // the forward writes each output row from its terms, adjacent after this
    std::stable_sort(y.begin(), y.end(), [](const YTerm& a, const YTerm& b) { return a.r < b.r; });
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

// The reverse of rsqrt_rows: gradients gv of the variance rows from those gu of u.
void rsqrt_rows_grad(const GroupNormJetShape& L, const double* v, const Rsqrt& d,
                     const double* gu, double* gv) {
  const int64_t R = L.rows;
  double gu1 = 0.0, gu2 = 0.0;
  for (int64_t r = 1; r < R; ++r) {
    gv[r] = d.u1 * gu[r];
    gu1 += gu[r] * v[r];
  }
  for (int64_t j = 0; j < L.npairs; ++j) {
    const int64_t q = 1 + L.n1 + j, a = L.pair_a[j], b = L.pair_b[j];
    gv[a] += gu[q] * d.u2 * v[b];
    gv[b] += gu[q] * d.u2 * v[a];
    gu2 += gu[q] * v[a] * v[b];
  }
  if (L.nc > 0) {
    const double gz = gu[R - 1], inv_nc = 1.0 / static_cast<double>(L.nc);
    double sq = 0.0;
    for (int64_t k = L.c0; k < L.c0 + L.nc; ++k) {
      gv[k] += gz * d.u2 * 2.0 * inv_nc * v[k];
      sq += v[k] * v[k];
    }
    gu2 += gz * sq * inv_nc;
  }
  gv[0] = gu[0] * d.u1 + gu1 * d.u2 + gu2 * d.u3;
}

template <typename T>
double sum(const T* x, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < n; ++e) s += static_cast<double>(x[e]);
  return s;
}

// sum over e of (a[e] - ma)(b[e] - mb)
template <typename T>
double centred_dot(const T* a, T ma, const T* b, T mb, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < n; ++e) s += static_cast<double>((a[e] - ma) * (b[e] - mb));
  return s;
}

// sum over e of g[e] (x[e] - mx)
template <typename T>
double dot_centred(const T* g, const T* x, T mx, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < n; ++e) s += static_cast<double>(g[e] * (x[e] - mx));
  return s;
}

}  // namespace

template <typename T>
void group_norm_jet_forward(const T* x, const T* weight, const T* bias,
                            const GroupNormJetShape& L, double eps, T* y, T* mean, T* var) {
  const int64_t R = L.rows, C = L.channels, S = L.spatial, G = L.groups, CG = C / G;
  const int64_t N = CG * S, plane = L.batch * C * S, count = L.batch * G;
  const double inv_n = 1.0 / static_cast<double>(N);
  const Terms terms(L);
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel if (count * R * N > 32768)
#endif
  {
    std::vector<double> buf(3 * R);
    double *m = buf.data(), *v = m + R, *u = v + R;
    std::vector<T> mt(R);
#if defined(FPKERN_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t bg = 0; bg < count; ++bg) {
      const int64_t g = bg % G, base = ((bg / G) * C + g * CG) * S;
      for (int64_t r = 0; r < R; ++r) {
        m[r] = sum(x + r * plane + base, N) * inv_n;
        mt[r] = static_cast<T>(m[r]);
        v[r] = 0.0;
      }
      for (const VTerm& t : terms.v) {
        v[t.r] += t.h * inv_n *
                  centred_dot(x + t.i * plane + base, mt[t.i], x + t.j * plane + base, mt[t.j], N);
      }
      const Rsqrt d(v[0], eps);
      rsqrt_rows(L, v, d, u);
      for (int64_t r = 0; r < R; ++r) {
        mean[bg * R + r] = mt[r];
        var[bg * R + r] = static_cast<T>(v[r]);
      }
      // y_r = weight * sum over the row's terms of f u_k c_j (+ bias on the value row)
      size_t first = 0;
      for (int64_t r = 0; r < R; ++r) {
        size_t last = first;
        while (last < terms.y.size() && terms.y[last].r == r) ++last;
        T* yr = y + r * plane + base;
        for (int64_t ch = 0; ch < CG; ++ch) {
          const int64_t cc = g * CG + ch;
          const T w = weight ? weight[cc] : T(1);
          const T b0 = (bias && r == 0) ? bias[cc] : T(0);
          T* out = yr + ch * S;
          for (size_t i = first; i < last; ++i) {
            const YTerm& t = terms.y[i];
            const T coef = static_cast<T>(t.f * u[t.k]) * w, mj = mt[t.j];
            const T* xj = x + t.j * plane + base + ch * S;
            if (i == first) {
#pragma omp simd
              for (int64_t s = 0; s < S; ++s) out[s] = coef * (xj[s] - mj) + b0;
            } else {
#pragma omp simd
              for (int64_t s = 0; s < S; ++s) out[s] += coef * (xj[s] - mj);
            }
          }
        }
        first = last;
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
  const double inv_n = 1.0 / static_cast<double>(N);
  const Terms terms(L);
  const int64_t ny = static_cast<int64_t>(terms.y.size());
  // Per-(sample, channel) partial sums of dweight and dbias: each (b, g) writes its own
  // channels, so the threads never share an entry; reduced over b below.
  const bool want_w = dweight != nullptr, want_b = dbias != nullptr;
  std::vector<double> part_w(want_w ? L.batch * C : 0), part_b(want_b ? L.batch * C : 0);
#if defined(FPKERN_WITH_OPENMP)
#pragma omp parallel if (count * R * N > 32768)
#endif
  {
    std::vector<double> buf(5 * R + ny);
    double *v = buf.data(), *u = v + R, *gbar = u + R, *gu = gbar + R, *gv = gu + R;
    double* gA = gv + R;  // per y-term: sum of weight * gy_r * c_j over the group
    std::vector<T> mt(R);
#if defined(FPKERN_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t bg = 0; bg < count; ++bg) {
      const int64_t b = bg / G, g0 = bg % G, base = (b * C + g0 * CG) * S;
      for (int64_t r = 0; r < R; ++r) {
        mt[r] = mean[bg * R + r];
        v[r] = static_cast<double>(var[bg * R + r]);
        gbar[r] = gu[r] = 0.0;
      }
      for (int64_t i = 0; i < ny; ++i) gA[i] = 0.0;
      const Rsqrt d(v[0], eps);
      rsqrt_rows(L, v, d, u);

      // pass 1, per channel: the reductions of the upstream gradient against the centred
      // rows (one per y-term) and of the gradient itself
      for (int64_t ch = 0; ch < CG; ++ch) {
        const int64_t cc = g0 * CG + ch, off = base + ch * S;
        const double w = weight ? static_cast<double>(weight[cc]) : 1.0;
        double pw = 0.0;
        for (int64_t i = 0; i < ny; ++i) {
          const YTerm& t = terms.y[i];
          const double p = dot_centred(gy + t.r * plane + off, x + t.j * plane + off, mt[t.j], S);
          gA[i] += w * p;
          pw += t.f * u[t.k] * p;
        }
        const double pb = sum(gy + off, S);
        gbar[0] += w * pb;
        for (int64_t r = 1; r < R; ++r) gbar[r] += w * sum(gy + r * plane + off, S);
        if (want_w) part_w[b * C + cc] = pw;
        if (want_b) part_b[b * C + cc] = pb;
      }
      for (int64_t r = 0; r < R; ++r) gbar[r] *= inv_n;

      // reverse through the per-group scalars: yhat -> u -> v
      for (int64_t i = 0; i < ny; ++i) gu[terms.y[i].k] += terms.y[i].f * gA[i];
      rsqrt_rows_grad(L, v, d, gu, gv);

      // pass 2: dx_j = sum over y-terms with c_j of f u_k (weight gy_r - mean), plus over
      // v-terms of h gv_r / N times the other centred row (the centred rows have mean 0).
      // Every row j has the term (j, j, 0), so `first` always writes the row.
      for (int64_t j = 0; j < R; ++j) {
        T* dj = dx + j * plane + base;
        for (int64_t ch = 0; ch < CG; ++ch) {
          const T w = weight ? weight[g0 * CG + ch] : T(1);
          T* out = dj + ch * S;
          bool first = true;
          auto add = [&](const T* src, T a, T off) {
            if (first) {
#pragma omp simd
              for (int64_t s = 0; s < S; ++s) out[s] = a * src[s] - off;
            } else {
#pragma omp simd
              for (int64_t s = 0; s < S; ++s) out[s] += a * src[s] - off;
            }
            first = false;
          };
          for (const YTerm& t : terms.y) {
            if (t.j != j) continue;
            const double a = t.f * u[t.k];
            add(gy + t.r * plane + base + ch * S, static_cast<T>(a) * w,
                static_cast<T>(a * gbar[t.r]));
          }
          for (const VTerm& t : terms.v) {
            const double a = t.h * gv[t.r] * inv_n;
            if (t.i == j) add(x + t.j * plane + base + ch * S, static_cast<T>(a),
                              static_cast<T>(a) * mt[t.j]);
            if (t.j == j) add(x + t.i * plane + base + ch * S, static_cast<T>(a),
                              static_cast<T>(a) * mt[t.i]);
          }
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

// fpkern::laplacian_terms: the laplacian-form FPE terms in one pass over the jet outputs
// (MATH.md sections 2-4).
//
// Per sample b (rows of contiguous (B, N) matrices; probe stacks (K, B, N)):
//   r      = w - 1/2 g2 lap + f s            (w = d_t s - J c, the transport row)
//   div    = 1/K sum_k <v_k, jv_k>           (Hutchinson divergence)
//   sumsq  = |r|^2, ss = |s|^2, xs = <x, s>
//   h      = 1/2 g2 (div + ss) - f xs        (the scalar FPE right-hand side)
//   loss   = weight |r|^m
// Sums accumulate in double.
#pragma once

#include <cstdint>

namespace fpkern {

template <typename T>
void laplacian_terms_forward(const T* v, const T* jv, const T* w, const T* lap, const T* s,
                             const T* x, const T* g2, const T* f, const T* weight, double m,
                             int64_t K, int64_t B, int64_t N, T* r, T* div, T* loss, T* h,
                             T* sumsq);

// Vector-Jacobian product for upstream gradients gr (B, N) and gdiv, gloss, gh (B):
//   a = gloss weight m |r|^(m-2) (0 where r = 0), dr = gr + a r,
//   dw = dr, dlap = -1/2 g2 dr, ds = f dr + gh (g2 s - f x),
//   djv_k = (gdiv + 1/2 g2 gh) / K v_k,
//   dg2 = -1/2 <lap, dr> + 1/2 gh (div + |s|^2), df = <s, dr> - gh <x, s>,
//   dweight = gloss |r|^m.
template <typename T>
void laplacian_terms_backward(const T* gr, const T* gdiv, const T* gloss, const T* gh,
                              const T* v, const T* lap, const T* s, const T* x, const T* r,
                              const T* div, const T* sumsq, const T* g2, const T* f,
                              const T* weight, double m, int64_t K, int64_t B, int64_t N, T* dw,
                              T* dlap, T* ds, T* djv, T* dg2, T* df, T* dweight);

}  // namespace fpkern

"""Triton kernels of fpkern::laplacian_terms: the laplacian-form FPE terms in one pass.

One program per sample b reads its transport row w = d_t s - J c, Laplacian estimate lap,
score s, point x and the probe pairs (v_k, J v_k), and writes the residual
r = w - 1/2 g2 lap + f s, the Hutchinson divergence, |r|^2, the weighted loss weight |r|^m
and the scalar FPE term h = 1/2 g2 (div + |s|^2) - f <x, s> (csrc/laplacian_terms.h has the
formulas and the backward). Float32 arithmetic (float64 for float64), per-lane sums.
The autograd op lives in fpkern/ops/laplacian_terms.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fpkern.kernels._common import block, load as _ld, upcast as _upcast

_BLOCK = 1024


@triton.jit
def _norm_pow(sumsq, m):
    """|r|^m from |r|^2 (0 at r = 0). The log reads 1 where sumsq is 0: a literal floor
    such as 1e-300 is 0 in float32, and Triton 3.6 mis-evaluated it for bfloat16 inputs."""
    pos = sumsq > 0
    return tl.where(pos, tl.exp(0.5 * m * tl.log(tl.where(pos, sumsq, 1.0))), 0.0)


@triton.jit
def _fwd_kernel(v_ptr, jv_ptr, w_ptr, lap_ptr, s_ptr, x_ptr, g2_ptr, f_ptr, wt_ptr,
                r_ptr, div_ptr, loss_ptr, h_ptr, sq_ptr, m, K, B, N,
                M_IS_2: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    hg = 0.5 * _ld(g2_ptr, b, True, UPCAST)
    fb = _ld(f_ptr, b, True, UPCAST)
    zero = hg * tl.zeros([BLOCK], dtype=tl.float32)       # float64 when g2 is float64
    rr, ss, xs, dv = zero, zero, zero, zero
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        s = _ld(s_ptr, base + cols, mask, UPCAST)
        lap = _ld(lap_ptr, base + cols, mask, UPCAST)
        r = _ld(w_ptr, base + cols, mask, UPCAST) - hg * lap + fb * s
        tl.store(r_ptr + base + cols, r.to(r_ptr.dtype.element_ty), mask=mask)
        rr += r * r
        ss += s * s
        xs += _ld(x_ptr, base + cols, mask, UPCAST) * s
    for k in range(0, K):
        kb = (k * B + b) * N
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            dv += _ld(v_ptr, kb + cols, mask, UPCAST) * _ld(jv_ptr, kb + cols, mask, UPCAST)
    div = tl.sum(dv, axis=0) / K
    sumsq = tl.sum(rr, axis=0)
    if M_IS_2:
        nm = sumsq
    else:
        nm = _norm_pow(sumsq, m)
    ty = div_ptr.dtype.element_ty
    tl.store(div_ptr + b, div.to(ty))
    tl.store(sq_ptr + b, sumsq.to(ty))
    tl.store(loss_ptr + b, (_ld(wt_ptr, b, True, UPCAST) * nm).to(ty))
    tl.store(h_ptr + b, (hg * (div + tl.sum(ss, axis=0)) - fb * tl.sum(xs, axis=0)).to(ty))


@triton.jit
def _bwd_kernel(gr_ptr, gdiv_ptr, gloss_ptr, gh_ptr, v_ptr, lap_ptr, s_ptr, x_ptr, r_ptr,
                div_ptr, sq_ptr, g2_ptr, f_ptr, wt_ptr, dw_ptr, dlap_ptr, ds_ptr, djv_ptr,
                dg2_ptr, df_ptr, dwt_ptr, m, K, B, N,
                M_IS_2: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    g2 = _ld(g2_ptr, b, True, UPCAST)
    hg = 0.5 * g2
    fb = _ld(f_ptr, b, True, UPCAST)
    gh = _ld(gh_ptr, b, True, UPCAST)
    gloss = _ld(gloss_ptr, b, True, UPCAST)
    wt = _ld(wt_ptr, b, True, UPCAST)
    sumsq = _ld(sq_ptr, b, True, UPCAST)
    if M_IS_2:
        slope = 2.0 + 0.0 * sumsq
        nm = sumsq
    else:
        nm = _norm_pow(sumsq, m)
        pos = sumsq > 0
        slope = m * tl.where(pos, nm / tl.where(pos, sumsq, 1.0), 0.0)
    a = gloss * wt * slope
    zero = hg * tl.zeros([BLOCK], dtype=tl.float32)
    lap_dr, s_dr, ss, xs = zero, zero, zero, zero
    ty = dw_ptr.dtype.element_ty
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        offs = base + cols
        s = _ld(s_ptr, offs, mask, UPCAST)
        x = _ld(x_ptr, offs, mask, UPCAST)
        lap = _ld(lap_ptr, offs, mask, UPCAST)
        dr = _ld(gr_ptr, offs, mask, UPCAST) + a * _ld(r_ptr, offs, mask, UPCAST)
        tl.store(dw_ptr + offs, dr.to(ty), mask=mask)
        tl.store(dlap_ptr + offs, (-hg * dr).to(ty), mask=mask)
        tl.store(ds_ptr + offs, (fb * dr + gh * (g2 * s - fb * x)).to(ty), mask=mask)
        lap_dr += lap * dr
        s_dr += s * dr
        ss += s * s
        xs += x * s
    cdiv = (_ld(gdiv_ptr, b, True, UPCAST) + hg * gh) / K
    for k in range(0, K):
        kb = (k * B + b) * N
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            tl.store(djv_ptr + kb + cols, (cdiv * _ld(v_ptr, kb + cols, mask, UPCAST)).to(ty),
                     mask=mask)
    div = _ld(div_ptr, b, True, UPCAST)
    dg2 = -0.5 * tl.sum(lap_dr, axis=0) + 0.5 * gh * (div + tl.sum(ss, axis=0))
    tl.store(dg2_ptr + b, dg2.to(ty))
    tl.store(df_ptr + b, (tl.sum(s_dr, axis=0) - gh * tl.sum(xs, axis=0)).to(ty))
    tl.store(dwt_ptr + b, (gloss * nm).to(ty))


def _block(N: int) -> int:
    return block(N, _BLOCK)


def laplacian_terms_forward(v, jv, w, lap, s, x, g2, f, weight, m: float):
    """(K, B, N) probe stacks and (B, N) terms -> r (B, N), div, loss, h, sumsq (B)."""
    K, B, N = v.shape
    r = torch.empty_like(w)
    div, loss, h, sumsq = (torch.empty_like(g2) for _ in range(4))
    _fwd_kernel[(B,)](v, jv, w, lap, s, x, g2, f, weight, r, div, loss, h, sumsq, float(m),
                      K, B, N, M_IS_2=float(m) == 2.0, UPCAST=_upcast(w), BLOCK=_block(N))
    return r, div, loss, h, sumsq


def laplacian_terms_backward(gr, gdiv, gloss, gh, v, lap, s, x, r, div, sumsq, g2, f, weight,
                             m: float):
    K, B, N = v.shape
    dw, dlap, ds = (torch.empty_like(r) for _ in range(3))
    djv = torch.empty_like(v)
    dg2, df, dwt = (torch.empty_like(g2) for _ in range(3))
    _bwd_kernel[(B,)](gr, gdiv, gloss, gh, v, lap, s, x, r, div, sumsq, g2, f, weight, dw, dlap,
                      ds, djv, dg2, df, dwt, float(m), K, B, N, M_IS_2=float(m) == 2.0,
                      UPCAST=_upcast(r), BLOCK=_block(N))
    return dw, dlap, ds, djv, dg2, df, dwt

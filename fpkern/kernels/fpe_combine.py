"""Triton kernels of fpkern::fpe_combine: the score-FPE residual assembled from its terms,
r = d_t s - 1/2 g2 * second - J c + f s, per (rows, cols) row, and its backward.

Launchers take contiguous (rows, cols) views and allocate their outputs; the autograd op that
calls them is fpkern/ops/fpe_combine.py. Arithmetic runs in float32 (float64 for float64
inputs); the backward's row sums for g2 and f accumulate per lane, then reduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fpkern.kernels._common import acc_zeros as _acc_zeros, block as _block, load as _ld, \
    upcast as _upcast


@triton.jit
def _combine_fwd_kernel(dts_ptr, second_ptr, jc_ptr, s_ptr, g2_ptr, f_ptr, out_ptr, cols,
                        UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols_ = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols_ < cols
    offs = row * cols + cols_
    half_g2 = 0.5 * _ld(g2_ptr, row, True, UPCAST)
    f = _ld(f_ptr, row, True, UPCAST)
    r = (_ld(dts_ptr, offs, mask, UPCAST) - half_g2 * _ld(second_ptr, offs, mask, UPCAST)
         - _ld(jc_ptr, offs, mask, UPCAST) + f * _ld(s_ptr, offs, mask, UPCAST))
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(go_ptr, second_ptr, s_ptr, g2_ptr, f_ptr, d_dts_ptr, d_second_ptr,
                        d_jc_ptr, d_s_ptr, d_g2_ptr, d_f_ptr, cols,
                        UPCAST: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half_g2 = 0.5 * _ld(g2_ptr, row, True, UPCAST)
    f = _ld(f_ptr, row, True, UPCAST)
    acc_g2 = _acc_zeros(BLOCK, FP64)
    acc_f = _acc_zeros(BLOCK, FP64)
    for start in range(0, cols, BLOCK):
        cols_ = start + tl.arange(0, BLOCK)
        mask = cols_ < cols
        offs = row * cols + cols_
        g = _ld(go_ptr, offs, mask, UPCAST)
        ty = d_dts_ptr.dtype.element_ty
        tl.store(d_dts_ptr + offs, g.to(ty), mask=mask)
        tl.store(d_second_ptr + offs, (-half_g2 * g).to(ty), mask=mask)
        tl.store(d_jc_ptr + offs, (-g).to(ty), mask=mask)
        tl.store(d_s_ptr + offs, (f * g).to(ty), mask=mask)
        acc_g2 += _ld(second_ptr, offs, mask, UPCAST) * g
        acc_f += _ld(s_ptr, offs, mask, UPCAST) * g
    tl.store(d_g2_ptr + row, (-0.5 * tl.sum(acc_g2, axis=0)).to(d_g2_ptr.dtype.element_ty))
    tl.store(d_f_ptr + row, tl.sum(acc_f, axis=0).to(d_f_ptr.dtype.element_ty))


def fpe_combine_forward(dts, second, jc, s, g2, f) -> torch.Tensor:
    rows, cols = dts.shape
    out = torch.empty_like(dts)
    block = _block(cols)
    _combine_fwd_kernel[(rows, triton.cdiv(cols, block))](
        dts, second, jc, s, g2, f, out, cols, UPCAST=_upcast(dts), BLOCK=block)
    return out


def fpe_combine_backward(go, second, s, g2, f):
    rows, cols = go.shape
    d_dts, d_second, d_jc, d_s = (torch.empty_like(go) for _ in range(4))
    d_g2, d_f = torch.empty_like(g2), torch.empty_like(f)
    block = min(_block(cols), 1024)
    _combine_bwd_kernel[(rows,)](go, second, s, g2, f, d_dts, d_second, d_jc, d_s, d_g2, d_f,
                                 cols, UPCAST=_upcast(go), FP64=go.dtype == torch.float64,
                                 BLOCK=block)
    return d_dts, d_second, d_jc, d_s, d_g2, d_f

"""Triton kernels of fpkern::hutchinson_reduce: the Hutchinson divergence estimate
div = 1/K sum_k <v_k, J v_k> per row of (K, rows, cols) probe stacks, and its backward.

Launchers take contiguous (K, rows, cols) views and allocate their outputs; the autograd op
that calls them is fpkern/ops/hutchinson_reduce.py. Arithmetic runs in float32 (float64 for
float64 inputs); row sums accumulate per lane, then reduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fpkern.kernels._common import acc_zeros as _acc_zeros, block as _block, load as _ld, \
    upcast as _upcast


@triton.jit
def _hutchinson_fwd_kernel(v_ptr, jv_ptr, out_ptr, K, rows, cols,
                           UPCAST: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = _acc_zeros(BLOCK, FP64)
    for k in range(0, K):
        base = (k * rows + row) * cols
        for start in range(0, cols, BLOCK):
            cols_ = start + tl.arange(0, BLOCK)
            mask = cols_ < cols
            v = _ld(v_ptr, base + cols_, mask, UPCAST)
            jv = _ld(jv_ptr, base + cols_, mask, UPCAST)
            acc += v * jv
    tl.store(out_ptr + row, (tl.sum(acc, axis=0) / K).to(out_ptr.dtype.element_ty))


@triton.jit
def _hutchinson_bwd_kernel(go_ptr, v_ptr, jv_ptr, d_v_ptr, d_jv_ptr, K, rows, cols,
                           UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # k * rows + row
    row = plane % rows
    cols_ = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols_ < cols
    offs = plane * cols + cols_
    w = _ld(go_ptr, row, True, UPCAST) / K
    ty = d_v_ptr.dtype.element_ty
    tl.store(d_v_ptr + offs, (w * _ld(jv_ptr, offs, mask, UPCAST)).to(ty), mask=mask)
    tl.store(d_jv_ptr + offs, (w * _ld(v_ptr, offs, mask, UPCAST)).to(ty), mask=mask)



def hutchinson_reduce_forward(v, jv) -> torch.Tensor:
    K, rows, cols = v.shape
    out = torch.empty(rows, dtype=v.dtype, device=v.device)
    block = min(_block(cols), 1024)
    _hutchinson_fwd_kernel[(rows,)](v, jv, out, K, rows, cols, UPCAST=_upcast(v),
                                    FP64=v.dtype == torch.float64, BLOCK=block)
    return out


def hutchinson_reduce_backward(go, v, jv):
    K, rows, cols = v.shape
    d_v, d_jv = torch.empty_like(v), torch.empty_like(jv)
    block = _block(cols)
    _hutchinson_bwd_kernel[(K * rows, triton.cdiv(cols, block))](
        go, v, jv, d_v, d_jv, K, rows, cols, UPCAST=_upcast(v), BLOCK=block)
    return d_v, d_jv

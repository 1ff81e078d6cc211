"""Triton kernels: the activation jet rule (fpkern/jet/rules.py) fused into one pass.

Rows are a contiguous (R, M) matrix; the layout (n1 first-order rows, mixed pairs, collapsed
rows c0 .. c0+nc-1) is compile-time, the pair indices a small int64 tensor. With
d_j = phi^(j)(x0): y0 = phi(x0), y_i = d1 x_i, y_pair = d1 x_pair + d2 x_a x_b,
y_coll = d1 x_coll + d2 mean_k x_k^2. The backward kernel is its vector-Jacobian product.
Arithmetic in float32 (float64 for float64 rows); tanh is computed from exp(-2|x|), which
every Triton version has. The autograd op that calls these lives in
fpkern/jet/fused/jet_act.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fpkern.kernels._common import load as _ld, upcast as _upcast

SILU, TANH, SIGMOID = 0, 1, 2
_BLOCK = 1024


@triton.jit
def _derivs(x, ACT: tl.constexpr):
    """phi, phi', phi'', phi''' at x."""
    if ACT == 0:      # silu
        s = 1.0 / (1.0 + tl.exp(-x))
        p = s * (1.0 - s)
        q = 1.0 - 2.0 * s
        d3 = p * (q * (3.0 + x * q) - 2.0 * x * p)
        return x * s, s * (1.0 + x * (1.0 - s)), p * (2.0 + x * q), d3
    elif ACT == 1:    # tanh
        e2 = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e2) / (1.0 + e2)
        y = tl.where(x < 0, -y, y)
        e = 1.0 - y * y
        return y, e, -2.0 * y * e, e * (6.0 * y * y - 2.0)
    else:             # sigmoid
        s = 1.0 / (1.0 + tl.exp(-x))
        p = s * (1.0 - s)
        return s, p, p * (1.0 - 2.0 * s), p - 6.0 * p * p


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, pa_ptr, pb_ptr, M, ACT: tl.constexpr, N1: tl.constexpr,
                NPAIRS: tl.constexpr, C0: tl.constexpr, NC: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ty = y_ptr.dtype.element_ty
    x0 = _ld(x_ptr, offs, mask, UPCAST)
    d0, d1, d2, d3 = _derivs(x0, ACT)
    tl.store(y_ptr + offs, d0.to(ty), mask=mask)
    for i in tl.static_range(1, N1 + 1):
        tl.store(y_ptr + i * M + offs, (d1 * _ld(x_ptr, i * M + offs, mask, UPCAST)).to(ty),
                 mask=mask)
    for j in tl.static_range(NPAIRS):
        r = 1 + N1 + j
        a = tl.load(pa_ptr + j)
        b = tl.load(pb_ptr + j)
        xab = _ld(x_ptr, a * M + offs, mask, UPCAST) * _ld(x_ptr, b * M + offs, mask, UPCAST)
        yr = d1 * _ld(x_ptr, r * M + offs, mask, UPCAST) + d2 * xab
        tl.store(y_ptr + r * M + offs, yr.to(ty), mask=mask)
    if NC > 0:
        z = 1 + N1 + NPAIRS
        sq = d0 * 0.0
        for k in tl.static_range(C0, C0 + NC):
            xk = _ld(x_ptr, k * M + offs, mask, UPCAST)
            sq += xk * xk
        yz = d1 * _ld(x_ptr, z * M + offs, mask, UPCAST) + d2 * sq / NC
        tl.store(y_ptr + z * M + offs, yz.to(ty), mask=mask)


@triton.jit
def _bwd_kernel(gy_ptr, x_ptr, dx_ptr, pa_ptr, pb_ptr, M, ACT: tl.constexpr, N1: tl.constexpr,
                NPAIRS: tl.constexpr, C0: tl.constexpr, NC: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ty = dx_ptr.dtype.element_ty
    x0 = _ld(x_ptr, offs, mask, UPCAST)
    d0, d1, d2, d3 = _derivs(x0, ACT)
    g0 = _ld(gy_ptr, offs, mask, UPCAST) * d1                      # the value row
    z = 1 + N1 + NPAIRS
    gz = d0 * 0.0
    if NC > 0:
        gz = _ld(gy_ptr, z * M + offs, mask, UPCAST)
    for i in tl.static_range(1, N1 + 1):                              # first-order rows
        gi = _ld(gy_ptr, i * M + offs, mask, UPCAST)
        xi = _ld(x_ptr, i * M + offs, mask, UPCAST)
        g0 += gi * d2 * xi
        acc = gi * d1
        for j in tl.static_range(NPAIRS):
            r = 1 + N1 + j
            a = tl.load(pa_ptr + j)
            b = tl.load(pb_ptr + j)
            gq = _ld(gy_ptr, r * M + offs, mask, UPCAST)
            acc += tl.where(a == i, gq * d2 * _ld(x_ptr, b * M + offs, mask, UPCAST), 0.0)
            acc += tl.where(b == i, gq * d2 * _ld(x_ptr, a * M + offs, mask, UPCAST), 0.0)
        if i >= C0 and i < C0 + NC:
            acc += 2.0 * gz * d2 * xi / NC
            g0 += gz * d3 * xi * xi / NC
        tl.store(dx_ptr + i * M + offs, acc.to(ty), mask=mask)
    for j in tl.static_range(NPAIRS):                                 # mixed second order
        r = 1 + N1 + j
        a = tl.load(pa_ptr + j)
        b = tl.load(pb_ptr + j)
        gq = _ld(gy_ptr, r * M + offs, mask, UPCAST)
        xab = _ld(x_ptr, a * M + offs, mask, UPCAST) * _ld(x_ptr, b * M + offs, mask, UPCAST)
        g0 += gq * (d2 * _ld(x_ptr, r * M + offs, mask, UPCAST) + d3 * xab)
        tl.store(dx_ptr + r * M + offs, (gq * d1).to(ty), mask=mask)
    if NC > 0:                                                        # collapsed row
        g0 += gz * d2 * _ld(x_ptr, z * M + offs, mask, UPCAST)
        tl.store(dx_ptr + z * M + offs, (gz * d1).to(ty), mask=mask)
    tl.store(dx_ptr + offs, g0.to(ty), mask=mask)


def _pairs(pair_a, pair_b, device):
    a = torch.tensor(list(pair_a) or [0], dtype=torch.int64, device=device)
    b = torch.tensor(list(pair_b) or [0], dtype=torch.int64, device=device)
    return a, b


def jet_act_forward(rows: torch.Tensor, act: int, n1: int, pair_a, pair_b, c0: int,
                    nc: int) -> torch.Tensor:
    """rows: contiguous (R, M) -> the activation's jet rows (R, M)."""
    M = rows.shape[1]
    out = torch.empty_like(rows)
    a, b = _pairs(pair_a, pair_b, rows.device)
    _fwd_kernel[(triton.cdiv(M, _BLOCK),)](rows, out, a, b, M, ACT=act, N1=n1,
                                           NPAIRS=len(pair_a), C0=c0, NC=nc,
                                           UPCAST=_upcast(rows), BLOCK=_BLOCK)
    return out


def jet_act_backward(grad: torch.Tensor, rows: torch.Tensor, act: int, n1: int, pair_a, pair_b,
                     c0: int, nc: int) -> torch.Tensor:
    """The gradient of the input rows (R, M) for the upstream gradient `grad` (R, M)."""
    M = rows.shape[1]
    dx = torch.empty_like(rows)
    a, b = _pairs(pair_a, pair_b, rows.device)
    _bwd_kernel[(triton.cdiv(M, _BLOCK),)](grad, rows, dx, a, b, M, ACT=act, N1=n1,
                                           NPAIRS=len(pair_a), C0=c0, NC=nc,
                                           UPCAST=_upcast(rows), BLOCK=_BLOCK)
    return dx

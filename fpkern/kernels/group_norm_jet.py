"""Triton kernels: the GroupNorm jet rule (formulas in fpkern/jet/fused/group_norm_jet.py).

One program per (sample, group). It holds all R rows of a block of the group's N elements
as an [RB, BLOCK] tile (RB = R padded to a power of 2). Per-row scalars (means, variance
rows v, rsqrt rows u and their gradients) are [RB] vectors; a row is picked from a vector
or a tile by a masked sum, so a layout needs no scratch memory and no scatter stores:

  - pair rows read their two first-order partners (pair_a, pair_b, aligned to the pair's
    row and 0 elsewhere) as two more tiles;
  - the collapsed row reads rows c0 .. c0+nc-1 as a [KB, BLOCK] tile.

Launchers take contiguous rows (R, B, C, S) and allocate the outputs; arithmetic runs in
float32 (float64 for float64 inputs) with int64 offsets.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_FWD_TILE = 2048      # RB * BLOCK elements per tile (several tiles live at once)
_BWD_TILE = 1024


@triton.jit
def _acc(x, FP64: tl.constexpr):
    if FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _pick(vec, idx, i):
    """vec[i] for a vector vec indexed by idx (a masked sum: a scalar)."""
    return tl.sum(tl.where(idx == i, vec, 0.0), axis=0)


@triton.jit
def _gather(vec, ridx, at):
    """vec[at[j]] for each j: vec is indexed by ridx, at is a vector of row numbers."""
    return tl.sum(tl.where(at[:, None] == ridx[None, :], vec[None, :], 0.0), axis=1)


@triton.jit
def _scatter(vals, at, valid, ridx):
    """out[r] = sum over j with valid[j] and at[j] == r of vals[j]."""
    hit = (at[None, :] == ridx[:, None]) & valid[None, :]
    return tl.sum(tl.where(hit, vals[None, :], 0.0), axis=1)


@triton.jit
def _row(tile, ridx, i):
    """Row i of an [RB, BLOCK] tile."""
    return tl.sum(tl.where(ridx[:, None] == i, tile, 0.0), axis=0)


@triton.jit
def _centred(x_ptr, rows, valid, mean_rows, base, cols, cmask, plane, FP64: tl.constexpr):
    """The centred rows `rows` (a vector of row numbers) of the block `cols`, 0 where masked."""
    m = valid[:, None] & cmask[None, :]
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * plane + base + cols[None, :]
    x = _acc(tl.load(ptrs, mask=m, other=0.0), FP64)
    return tl.where(m, x - mean_rows[:, None], 0.0)


@triton.jit
def _rsqrt_rows(v, ridx, rmask, pa, pb, is_pair, krow, kmask, R, ncf, eps,
                HAS_PAIRS: tl.constexpr, HAS_COLL: tl.constexpr):
    """Taylor rows u of rsqrt(v0 + eps) and the derivatives rsqrt', '', ''' at v0 + eps."""
    s = _pick(v, ridx, 0) + eps
    u0 = 1.0 / tl.sqrt(s)
    u1 = -0.5 * u0 / s
    u2 = 0.75 * u0 / (s * s)
    u3 = -1.875 * u0 / (s * s * s)
    u = tl.where(ridx == 0, u0, tl.where(rmask, u1 * v, 0.0))
    if HAS_PAIRS:
        u += tl.where(is_pair, u2 * _gather(v, ridx, pa) * _gather(v, ridx, pb), 0.0)
    if HAS_COLL:
        vk = tl.where(kmask, _gather(v, ridx, krow), 0.0)
        u += tl.where(ridx == R - 1, u2 * tl.sum(vk * vk, axis=0) / ncf, 0.0)
    return u, u0, u1, u2, u3


@triton.jit
def _yhat(c, c0, u, u0, ridx, R, ncf, ca, cb, ua, ub, is_pair, ck, uk,
          HAS_PAIRS: tl.constexpr, HAS_COLL: tl.constexpr):
    """yhat rows of a block from its centred rows c (and partner tiles)."""
    yh = c * u0 + tl.where(ridx[:, None] >= 1, c0[None, :] * u[:, None], 0.0)
    if HAS_PAIRS:
        yh += tl.where(is_pair[:, None], ca * ub[:, None] + cb * ua[:, None], 0.0)
    if HAS_COLL:
        t = tl.sum(ck * uk[:, None], axis=0)
        yh += tl.where(ridx[:, None] == R - 1, (2.0 / ncf) * t[None, :], 0.0)
    return yh


@triton.jit
def _gn_jet_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, var_ptr, pa_ptr, pb_ptr, scal_ptr,
                       plane, N, S, C, R, n1, P, c0, nc,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_PAIRS: tl.constexpr,
                       HAS_COLL: tl.constexpr, FP64: tl.constexpr, RB: tl.constexpr,
                       KB: tl.constexpr, BLOCK: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    base = bg * N                              # (b C + g C/G) S with C = G C/G
    ridx = tl.arange(0, RB)
    rmask = ridx < R
    kidx = tl.arange(0, KB)
    kmask = kidx < nc
    krow = c0 + kidx
    is_pair = (ridx >= 1 + n1) & (ridx < 1 + n1 + P)
    pa = tl.load(pa_ptr + ridx, mask=rmask, other=0)
    pb = tl.load(pb_ptr + ridx, mask=rmask, other=0)
    zero = _acc(tl.zeros([RB], dtype=tl.float32), FP64)
    eps = tl.load(scal_ptr)                    # float scalars in the accumulation dtype
    nf = tl.load(scal_ptr + 1)
    ncf = tl.load(scal_ptr + 2)

    # pass 1: row means
    s1 = zero
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < N
        s1 += tl.sum(_centred(x_ptr, ridx, rmask, zero, base, cols, cmask, plane, FP64), axis=1)
    mean = s1 / nf

    # pass 2: variance rows
    s0 = zero
    sp = zero
    sk = tl.sum(zero, axis=0)
    mean_a = _gather(mean, ridx, pa)
    mean_b = _gather(mean, ridx, pb)
    mean_k = _gather(mean, ridx, krow)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < N
        c = _centred(x_ptr, ridx, rmask, mean, base, cols, cmask, plane, FP64)
        c0v = _row(c, ridx, 0)
        s0 += tl.sum(c * c0v[None, :], axis=1)
        if HAS_PAIRS:
            ca = _centred(x_ptr, pa, is_pair, mean_a, base, cols, cmask, plane, FP64)
            cb = _centred(x_ptr, pb, is_pair, mean_b, base, cols, cmask, plane, FP64)
            sp += tl.sum(ca * cb, axis=1)
        if HAS_COLL:
            ck = _centred(x_ptr, krow, kmask, mean_k, base, cols, cmask, plane, FP64)
            sk += tl.sum(tl.sum(ck * ck, axis=1), axis=0)
    v = tl.where(ridx == 0, s0 / nf, 2.0 * s0 / nf)
    if HAS_PAIRS:
        v += tl.where(is_pair, 2.0 * sp / nf, 0.0)
    if HAS_COLL:
        v += tl.where(ridx == R - 1, 2.0 * sk / (nf * ncf), 0.0)
    v = tl.where(rmask, v, 0.0)
    u, u0, u1, u2, u3 = _rsqrt_rows(v, ridx, rmask, pa, pb, is_pair, krow, kmask, R, ncf, eps,
                                    HAS_PAIRS, HAS_COLL)
    tl.store(mean_ptr + bg * R + ridx, mean.to(mean_ptr.dtype.element_ty), mask=rmask)
    tl.store(var_ptr + bg * R + ridx, v.to(var_ptr.dtype.element_ty), mask=rmask)

    # pass 3: the output rows
    ua = _gather(u, ridx, pa)
    ub = _gather(u, ridx, pb)
    uk = tl.where(kmask, _gather(u, ridx, krow), 0.0)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < N
        c = _centred(x_ptr, ridx, rmask, mean, base, cols, cmask, plane, FP64)
        c0v = _row(c, ridx, 0)
        ca = c
        cb = c
        ck = c
        if HAS_PAIRS:
            ca = _centred(x_ptr, pa, is_pair, mean_a, base, cols, cmask, plane, FP64)
            cb = _centred(x_ptr, pb, is_pair, mean_b, base, cols, cmask, plane, FP64)
        if HAS_COLL:
            ck = _centred(x_ptr, krow, kmask, mean_k, base, cols, cmask, plane, FP64)
        yh = _yhat(c, c0v, u, u0, ridx, R, ncf, ca, cb, ua, ub, is_pair, ck, uk,
                   HAS_PAIRS, HAS_COLL)
        out = yh
        ch = ((base + cols) // S) % C              # the channel of each element
        if HAS_W:
            out = out * _acc(tl.load(w_ptr + ch, mask=cmask, other=0.0), FP64)[None, :]
        if HAS_B:
            bias = _acc(tl.load(b_ptr + ch, mask=cmask, other=0.0), FP64)
            out += tl.where(ridx[:, None] == 0, bias[None, :], 0.0)
        m = rmask[:, None] & cmask[None, :]
        ptrs = y_ptr + ridx.to(tl.int64)[:, None] * plane + base + cols[None, :]
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gn_jet_bwd_kernel(gy_ptr, x_ptr, w_ptr, mean_ptr, var_ptr, pa_ptr, pb_ptr, scal_ptr,
                       dx_ptr, dw_ptr, plane, N, S, C, R, n1, P, c0, nc,
                       HAS_W: tl.constexpr, HAS_PAIRS: tl.constexpr, HAS_COLL: tl.constexpr,
                       FP64: tl.constexpr, RB: tl.constexpr, KB: tl.constexpr,
                       BLOCK: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    base = bg * N
    ridx = tl.arange(0, RB)
    rmask = ridx < R
    first = (ridx >= 1) & rmask
    kidx = tl.arange(0, KB)
    kmask = kidx < nc
    krow = c0 + kidx
    is_pair = (ridx >= 1 + n1) & (ridx < 1 + n1 + P)
    is_coll = (ridx >= c0) & (ridx < c0 + nc)
    pa = tl.load(pa_ptr + ridx, mask=rmask, other=0)
    pb = tl.load(pb_ptr + ridx, mask=rmask, other=0)
    zero = _acc(tl.zeros([RB], dtype=tl.float32), FP64)
    eps = tl.load(scal_ptr)
    nf = tl.load(scal_ptr + 1)
    ncf = tl.load(scal_ptr + 2)
    k2 = 2.0 / nf

    mean = _acc(tl.load(mean_ptr + bg * R + ridx, mask=rmask, other=0.0), FP64)
    v = _acc(tl.load(var_ptr + bg * R + ridx, mask=rmask, other=0.0), FP64)
    u, u0, u1, u2, u3 = _rsqrt_rows(v, ridx, rmask, pa, pb, is_pair, krow, kmask, R, ncf, eps,
                                    HAS_PAIRS, HAS_COLL)
    mean_a = _gather(mean, ridx, pa)
    mean_b = _gather(mean, ridx, pb)
    mean_k = _gather(mean, ridx, krow)
    ua = _gather(u, ridx, pa)
    ub = _gather(u, ridx, pb)
    uk = tl.where(kmask, _gather(u, ridx, krow), 0.0)

    # pass 1: reductions of the upstream gradient g (times weight) against the centred rows
    s_gc = zero                                # sum g_r c_r
    s_g0 = zero                                # sum g_r c_0
    s_g = zero                                 # sum g_r
    s_c = zero                                 # sum c_r
    s_a = zero                                 # pair rows q: sum g_q c_a, sum g_q c_b
    s_b = zero
    s_k = _acc(tl.zeros([KB], dtype=tl.float32), FP64)     # collapsed: sum g_z c_k
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < N
        m = rmask[:, None] & cmask[None, :]
        offs = ridx.to(tl.int64)[:, None] * plane + base + cols[None, :]
        c = _centred(x_ptr, ridx, rmask, mean, base, cols, cmask, plane, FP64)
        c0v = _row(c, ridx, 0)
        graw = _acc(tl.load(gy_ptr + offs, mask=m, other=0.0), FP64)
        g = graw
        ch = ((base + cols) // S) % C
        if HAS_W:
            g = graw * _acc(tl.load(w_ptr + ch, mask=cmask, other=0.0), FP64)[None, :]
        ca = c
        cb = c
        ck = c
        if HAS_PAIRS:
            ca = _centred(x_ptr, pa, is_pair, mean_a, base, cols, cmask, plane, FP64)
            cb = _centred(x_ptr, pb, is_pair, mean_b, base, cols, cmask, plane, FP64)
            s_a += tl.sum(g * ca, axis=1)
            s_b += tl.sum(g * cb, axis=1)
        if HAS_COLL:
            ck = _centred(x_ptr, krow, kmask, mean_k, base, cols, cmask, plane, FP64)
            s_k += tl.sum(ck * _row(g, ridx, R - 1)[None, :], axis=1)
        s_gc += tl.sum(g * c, axis=1)
        s_g0 += tl.sum(g * c0v[None, :], axis=1)
        s_g += tl.sum(g, axis=1)
        s_c += tl.sum(c, axis=1)
        if HAS_W:                              # dweight, per element: sum_r gy_r yhat_r
            yh = _yhat(c, c0v, u, u0, ridx, R, ncf, ca, cb, ua, ub, is_pair, ck, uk,
                       HAS_PAIRS, HAS_COLL)
            t = tl.sum(graw * yh, axis=0)
            tl.store(dw_ptr + base + cols, t.to(dw_ptr.dtype.element_ty), mask=cmask)

    # reverse through the per-group scalars: yhat -> u -> v
    gu0 = tl.sum(s_gc, axis=0)
    gu = tl.where(ridx == 0, gu0, tl.where(rmask, s_g0, 0.0))
    if HAS_PAIRS:
        gu += _scatter(s_a, pb, is_pair, ridx) + _scatter(s_b, pa, is_pair, ridx)
    if HAS_COLL:
        gu += _scatter((2.0 / ncf) * s_k, krow, kmask, ridx)
    gv = tl.where(first, u1 * gu, 0.0)
    gu1 = tl.sum(tl.where(first, gu * v, 0.0), axis=0)
    gu2 = tl.sum(zero, axis=0)
    if HAS_PAIRS:
        va = _gather(v, ridx, pa)
        vb = _gather(v, ridx, pb)
        gv += _scatter(gu * u2 * vb, pa, is_pair, ridx) + _scatter(gu * u2 * va, pb, is_pair, ridx)
        gu2 += tl.sum(tl.where(is_pair, gu * va * vb, 0.0), axis=0)
    if HAS_COLL:
        gu_z = _pick(gu, ridx, R - 1)          # a name of its own: the compiler types a
        # variable that pass 2's loop assigns (its `gz`) as loop-carried
        vk = tl.where(kmask, _gather(v, ridx, krow), 0.0)
        gv += _scatter(gu_z * u2 * (2.0 / ncf) * vk, krow, kmask, ridx)
        gu2 += gu_z * tl.sum(vk * vk, axis=0) / ncf
    gv = tl.where(ridx == 0, gu0 * u1 + gu1 * u2 + gu2 * u3, gv)

    # the mean of the centred gradient: its (linear) formula at the means of g and c
    mg = s_g / nf
    mc = s_c / nf
    t0 = tl.sum(tl.where(first, u * mg, 0.0), axis=0) + k2 * tl.sum(gv * mc, axis=0)
    mgc = tl.where(ridx == 0, u0 * _pick(mg, ridx, 0) + t0, u0 * mg + k2 * gv * _pick(mc, ridx, 0))
    if HAS_PAIRS:
        mca = _gather(mc, ridx, pa)
        mcb = _gather(mc, ridx, pb)
        mgc += _scatter(ub * mg + k2 * gv * mcb, pa, is_pair, ridx)
        mgc += _scatter(ua * mg + k2 * gv * mca, pb, is_pair, ridx)
    if HAS_COLL:
        mgc += tl.where(is_coll, (2.0 / ncf) * (u * _pick(mg, ridx, R - 1)
                                                + k2 * _pick(gv, ridx, R - 1) * mc), 0.0)

    # pass 2: dx_r = dc_r - m(dc_r)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < N
        m = rmask[:, None] & cmask[None, :]
        offs = ridx.to(tl.int64)[:, None] * plane + base + cols[None, :]
        c = _centred(x_ptr, ridx, rmask, mean, base, cols, cmask, plane, FP64)
        c0v = _row(c, ridx, 0)
        g = _acc(tl.load(gy_ptr + offs, mask=m, other=0.0), FP64)
        if HAS_W:
            ch = ((base + cols) // S) % C
            g = g * _acc(tl.load(w_ptr + ch, mask=cmask, other=0.0), FP64)[None, :]
        gc = u0 * g + tl.where(ridx[:, None] >= 1, k2 * gv[:, None] * c0v[None, :], 0.0)
        t = tl.sum(tl.where(first[:, None], u[:, None] * g, 0.0), axis=0)
        t += k2 * tl.sum(gv[:, None] * c, axis=0)
        gc += tl.where(ridx[:, None] == 0, t[None, :], 0.0)
        if HAS_PAIRS:
            for j in range(0, P):
                q = 1 + n1 + j
                a = tl.load(pa_ptr + q)
                b = tl.load(pb_ptr + q)
                gq = _row(g, ridx, q)
                gvq = _pick(gv, ridx, q)
                ta = _pick(u, ridx, b) * gq + k2 * gvq * _row(c, ridx, b)
                tb = _pick(u, ridx, a) * gq + k2 * gvq * _row(c, ridx, a)
                gc += tl.where(ridx[:, None] == a, ta[None, :], 0.0)
                gc += tl.where(ridx[:, None] == b, tb[None, :], 0.0)
        if HAS_COLL:
            gz = _row(g, ridx, R - 1)
            gvz = _pick(gv, ridx, R - 1)
            gc += tl.where(is_coll[:, None],
                           (2.0 / ncf) * (u[:, None] * gz[None, :] + k2 * gvz * c), 0.0)
        tl.store(dx_ptr + offs, (gc - mgc[:, None]).to(dx_ptr.dtype.element_ty), mask=m)


# ---- launchers -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _partners(n1: int, pair_a: tuple, pair_b: tuple, rows: int, device: torch.device):
    """pair_a / pair_b aligned to the rows (the pair's row holds its partners, others 0)."""
    a, b = [0] * rows, [0] * rows
    for j, (p, q) in enumerate(zip(pair_a, pair_b)):
        a[1 + n1 + j], b[1 + n1 + j] = p, q
    return (torch.tensor(a, dtype=torch.int32, device=device),
            torch.tensor(b, dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=64)
def _scalars(eps: float, n: int, nc: int, dtype: torch.dtype, device: torch.device):
    """eps, N and nc as a tensor of the accumulation dtype (a float argument would be fp32)."""
    return torch.tensor([eps, n, nc], dtype=dtype, device=device)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _config(x, groups, eps, spec, tile):
    R, B, C, S = x.shape
    n1, pa, pb, c0, nc = spec
    N = C // groups * S
    rb = triton.next_power_of_2(R)
    kb = triton.next_power_of_2(max(nc, 1))
    block = max(16, min(triton.next_power_of_2(N), tile // max(rb, kb)))
    scal = _scalars(float(eps), N, max(nc, 1), _acc_dtype(x), x.device)
    pa_t, pb_t = _partners(n1, tuple(pa), tuple(pb), R, x.device)
    args = dict(plane=B * C * S, N=N, S=S, C=C, R=R, n1=n1, P=len(pa), c0=c0, nc=nc)
    meta = dict(HAS_PAIRS=len(pa) > 0, HAS_COLL=nc > 0, FP64=x.dtype == torch.float64,
                RB=rb, KB=kb, BLOCK=block)
    return pa_t, pb_t, scal, args, meta


def group_norm_jet_forward(x, weight, bias, groups: int, eps: float, spec):
    """x: contiguous rows (R, B, C, S). Returns y (R, B, C, S), mean and var (B, G, R)."""
    R, B, C, S = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(B, groups, R, dtype=_acc_dtype(x), device=x.device)
    var = torch.empty_like(mean)
    pa_t, pb_t, scal, args, meta = _config(x, groups, eps, spec, _FWD_TILE)
    _gn_jet_fwd_kernel[(B * groups,)](
        x, x if weight is None else weight, x if bias is None else bias, y, mean, var, pa_t,
        pb_t, scal, **args, HAS_W=weight is not None, HAS_B=bias is not None, **meta)
    return y, mean, var


def group_norm_jet_backward(gy, x, weight, mean, var, groups: int, eps: float, spec):
    """Gradients of the rows (R, B, C, S), of weight [C] and of bias [C]."""
    R, B, C, S = x.shape
    acc = _acc_dtype(x)
    dx = torch.empty_like(x)
    part = torch.empty(B * C * S, dtype=acc, device=x.device) if weight is not None else mean
    pa_t, pb_t, scal, args, meta = _config(x, groups, eps, spec, _BWD_TILE)
    _gn_jet_bwd_kernel[(B * groups,)](
        gy, x, x if weight is None else weight, mean, var, pa_t, pb_t, scal, dx, part, **args,
        HAS_W=weight is not None, **meta)
    if weight is not None:
        dweight = part.view(B, C, S).sum((0, 2)).to(x.dtype)
    else:
        dweight = x.new_zeros(C)
    dbias = gy[0].to(acc).sum((0, 2)).to(x.dtype)
    return dx, dweight, dbias

"""Triton kernels: the MLP score network (fpkern.models.mlp) on jets, the whole network per launch.

Rows (fpkern.jet.tensor): 0 the value, 1 .. N1 first order, then NP mixed pair rows
d^2/(de_a de_b) (pair q: a = PA_q, b = PB_q, two compile-time ints of 4-bit indices, see
pack_rows; the projected div-form pass has these), then (NC > 0) one collapsed row averaging
d^2 over rows C0 .. C0 + NC - 1.

Each program owns BB samples and keeps all R rows of them together: a [RP * BB, n] tile
(m = row * BB + sample, RP = R rounded up to a power of two) is the M side of every GEMM, so
one weight tile feeds all rows at once. Layers run in phases separated by barriers:

    elementwise  activation jets of one layer (scratch -> scratch, [BB, BW] tiles per row)
    GEMM         next pre-activation rows = A @ W^T (+ T @ Wp^T) + bias on the value row

Intermediates live in global scratch [R, Bp, C] (C padded to a power of two >= 16, Bp to a
multiple of BB; each program touches only its own samples, so it stays in L1/L2). The
forward saves the Fourier features F, the time-embedding pre-activation Pt and activation T
and every pre-activation H_l; the backward recomputes activations from H_l and walks the jet
rules in reverse (silu''' needed for the second-order rows). Weight gradients: each program
forms its [BN, BK] partial dW tile with one tl.dot over its RP * BB rows and atomically adds
it to a float32 buffer (so results vary in the last bits from run to run).

Everything is float32. Dots use input_precision="tf32x3" on NVIDIA GPUs (three TF32 tensor
core products, float32-level accuracy; plain TF32 would cost the collapsed second-order row
its accuracy, and "ieee" compiles to CUDA-core FMA code that spills heavily: checked with
triton.compile for sm_90, 8 warps, 32-wide tiles: R = 8, width 256 compiles in ~10 s / ~25 s
with a few KB of spills in the backward) and "ieee" under the interpreter and on ROCm. Only
Triton APIs that Triton 3.0 already has are used. Launchers take contiguous float32 tensors;
fpkern/jet/fused/mlp_jet.py checks them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_B = 16        # samples per program (8 for more than 8 rows: RP * BB = 128 either way)
_BLOCK_N = 32       # GEMM tile along N and K
_NUM_WARPS = 8


# ---- elementwise jet rules -------------------------------------------------------------
@triton.jit
def _silu_d(h):
    """silu(h) and its first three derivatives."""
    s = tl.sigmoid(h)
    sp = s * (1 - s)
    d1 = s * (1 + h * (1 - s))
    d2 = sp * (2 + h * (1 - 2 * s))
    d3 = sp * (3 * (1 - 2 * s) + h * (1 - 6 * s + 6 * s * s))
    return h * s, d1, d2, d3


@triton.jit
def _tile(row0, Bp, r, b0, c0, C: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """Offsets of the [BB, BC] tile of row r (scratch rows start at row0 * Bp), columns c0..."""
    i = b0 + tl.arange(0, BB)
    c = c0 + tl.arange(0, BC)
    return ((row0 + r) * Bp + i)[:, None] * C + c[None, :]


@triton.jit
def _act_fwd(src, dst, row0, b0, Bp, C: tl.constexpr, N1: tl.constexpr, NP: tl.constexpr,
             PA: tl.constexpr, PB: tl.constexpr, C0: tl.constexpr, NC: tl.constexpr,
             BB: tl.constexpr, BC: tl.constexpr):
    """dst rows = silu applied to the jet in src rows (layer base row0 of src; dst base 0)."""
    for c0 in range(0, C, BC):
        h0 = tl.load(src + _tile(row0, Bp, 0, b0, c0, C, BB, BC))
        a0, d1, d2, _ = _silu_d(h0)
        tl.store(dst + _tile(0, Bp, 0, b0, c0, C, BB, BC), a0)
        msq = tl.zeros([BB, BC], dtype=tl.float32)
        for r in tl.static_range(1, 1 + N1):
            hr = tl.load(src + _tile(row0, Bp, r, b0, c0, C, BB, BC))
            tl.store(dst + _tile(0, Bp, r, b0, c0, C, BB, BC), d1 * hr)
            if r >= C0:
                if r < C0 + NC:
                    msq += hr * hr
        for j in tl.static_range(NP):
            hq = tl.load(src + _tile(row0, Bp, 1 + N1 + j, b0, c0, C, BB, BC))
            ha = tl.load(src + _tile(row0, Bp, (PA >> (4 * j)) & 15, b0, c0, C, BB, BC))
            hb = tl.load(src + _tile(row0, Bp, (PB >> (4 * j)) & 15, b0, c0, C, BB, BC))
            tl.store(dst + _tile(0, Bp, 1 + N1 + j, b0, c0, C, BB, BC), d1 * hq + d2 * ha * hb)
        if NC > 0:
            hz = tl.load(src + _tile(row0, Bp, 1 + N1 + NP, b0, c0, C, BB, BC))
            tl.store(dst + _tile(0, Bp, 1 + N1 + NP, b0, c0, C, BB, BC),
                     d1 * hz + d2 * (msq / NC))


@triton.jit
def _gload(g, g2, o, HAS_G2: tl.constexpr):
    """The output gradient at offsets o: g, plus g2 when HAS_G2."""
    x = tl.load(g + o)
    if HAS_G2:
        x += tl.load(g2 + o)
    return x


@triton.jit
def _act_bwd(g, g2, h, dh, row0, b0, Bp, C: tl.constexpr, N1: tl.constexpr, NP: tl.constexpr,
             PA: tl.constexpr, PB: tl.constexpr, C0: tl.constexpr, NC: tl.constexpr,
             BB: tl.constexpr, BC: tl.constexpr, HAS_G2: tl.constexpr):
    """dh rows = reverse of _act_fwd at the jet in h rows (base row0) for output grads g (+ g2).

    a_i = d1 h_i, a_q = d1 h_q + d2 h_a h_b (pair q = (a, b)), a_z = d1 h_z + d2 m
    (m = mean_k h_k^2) give
    dh_i = d1 g_i + d2 (sum_{q: a = i} g_q h_b + sum_{q: b = i} g_q h_a)
           (+ 2/NC d2 g_z h_i for collapsed i),  dh_q = d1 g_q,  dh_z = d1 g_z,
    dh_0 = d1 g_0 + d2 sum_i g_i h_i + sum_q g_q (d2 h_q + d3 h_a h_b) + d2 g_z h_z + d3 g_z m.
    The pair indices are compile-time, so each first-order row only reads its own pairs.
    """
    for c0 in range(0, C, BC):
        h0 = tl.load(h + _tile(row0, Bp, 0, b0, c0, C, BB, BC))
        _, d1, d2, d3 = _silu_d(h0)
        dh0 = d1 * _gload(g, g2, _tile(0, Bp, 0, b0, c0, C, BB, BC), HAS_G2)
        gz = tl.zeros([BB, BC], dtype=tl.float32)
        if NC > 0:
            oz = _tile(0, Bp, 1 + N1 + NP, b0, c0, C, BB, BC)
            gz = _gload(g, g2, oz, HAS_G2)
            hz = tl.load(h + _tile(row0, Bp, 1 + N1 + NP, b0, c0, C, BB, BC))
            dh0 += d2 * gz * hz
            tl.store(dh + oz, d1 * gz)
        msq = tl.zeros([BB, BC], dtype=tl.float32)
        for r in tl.static_range(1, 1 + N1):
            o = _tile(0, Bp, r, b0, c0, C, BB, BC)
            hr = tl.load(h + _tile(row0, Bp, r, b0, c0, C, BB, BC))
            gr = _gload(g, g2, o, HAS_G2)
            dh0 += d2 * gr * hr
            dhr = d1 * gr
            for j in tl.static_range(NP):
                if ((PA >> (4 * j)) & 15) == r:
                    dhr += d2 * _gload(g, g2, _tile(0, Bp, 1 + N1 + j, b0, c0, C, BB, BC),
                                       HAS_G2) * tl.load(
                        h + _tile(row0, Bp, (PB >> (4 * j)) & 15, b0, c0, C, BB, BC))
                if ((PB >> (4 * j)) & 15) == r:
                    dhr += d2 * _gload(g, g2, _tile(0, Bp, 1 + N1 + j, b0, c0, C, BB, BC),
                                       HAS_G2) * tl.load(
                        h + _tile(row0, Bp, (PA >> (4 * j)) & 15, b0, c0, C, BB, BC))
            if r >= C0:
                if r < C0 + NC:
                    dhr += (2.0 / NC) * d2 * gz * hr
                    msq += hr * hr
            tl.store(dh + o, dhr)
        for j in tl.static_range(NP):
            oq = _tile(0, Bp, 1 + N1 + j, b0, c0, C, BB, BC)
            gq = _gload(g, g2, oq, HAS_G2)
            hq = tl.load(h + _tile(row0, Bp, 1 + N1 + j, b0, c0, C, BB, BC))
            ha = tl.load(h + _tile(row0, Bp, (PA >> (4 * j)) & 15, b0, c0, C, BB, BC))
            hb = tl.load(h + _tile(row0, Bp, (PB >> (4 * j)) & 15, b0, c0, C, BB, BC))
            dh0 += gq * (d2 * hq + d3 * ha * hb)
            tl.store(dh + oq, d1 * gq)
        if NC > 0:
            dh0 += d3 * gz * (msq / NC)
        tl.store(dh + _tile(0, Bp, 0, b0, c0, C, BB, BC), dh0)


@triton.jit
def _fourier_setup(t_ptr, wf_ptr, b0, B, E, BB: tl.constexpr, EP: tl.constexpr):
    """Columns j < E are sin(2 pi t w_j), E <= j < 2E cos(2 pi t w_{j-E}); derivatives."""
    i = b0 + tl.arange(0, BB)
    i_ok = i < B
    j = tl.arange(0, EP)
    j_ok = j < 2 * E
    is_sin = j < E
    w = tl.load(wf_ptr + tl.where(is_sin, j, j - E), mask=j_ok, other=0.0)
    t0 = tl.load(t_ptr + i, mask=i_ok, other=0.0)
    p0 = t0[:, None] * w[None, :] * 6.283185307179586
    sn = tl.sin(p0)
    cs = tl.cos(p0)
    v = tl.where(is_sin[None, :] & j_ok[None, :], sn, tl.where(j_ok[None, :], cs, 0.0))
    d1 = tl.where(is_sin[None, :], cs, -sn)
    return i, i_ok, j, j_ok, is_sin, w, t0, v, d1


@triton.jit
def _trow(t_ptr, r, B, i, i_ok, w):
    """Row r of the t rows for samples i and its Fourier argument rows 2 pi t_r w."""
    tr = tl.load(t_ptr + r * B + i, mask=i_ok, other=0.0)
    return tr, tr[:, None] * w[None, :] * 6.283185307179586


@triton.jit
def _fourier_fwd(t_ptr, wf_ptr, f_ptr, b0, B, Bp, E, N1: tl.constexpr, NP: tl.constexpr,
                 PA: tl.constexpr, PB: tl.constexpr, C0: tl.constexpr, NC: tl.constexpr,
                 BB: tl.constexpr, EP: tl.constexpr):
    i, i_ok, j, j_ok, is_sin, w, t0, v, d1 = _fourier_setup(t_ptr, wf_ptr, b0, B, E, BB, EP)
    d2 = -v
    tl.store(f_ptr + _tile(0, Bp, 0, b0, 0, EP, BB, EP), v)
    msq = tl.zeros([BB, EP], dtype=tl.float32)
    for r in tl.static_range(1, 1 + N1):
        _, pr = _trow(t_ptr, r, B, i, i_ok, w)
        tl.store(f_ptr + _tile(0, Bp, r, b0, 0, EP, BB, EP), d1 * pr)
        if r >= C0:
            if r < C0 + NC:
                msq += pr * pr
    for q in tl.static_range(NP):
        _, pq = _trow(t_ptr, 1 + N1 + q, B, i, i_ok, w)
        _, pa = _trow(t_ptr, (PA >> (4 * q)) & 15, B, i, i_ok, w)
        _, pb = _trow(t_ptr, (PB >> (4 * q)) & 15, B, i, i_ok, w)
        tl.store(f_ptr + _tile(0, Bp, 1 + N1 + q, b0, 0, EP, BB, EP), d1 * pq + d2 * pa * pb)
    if NC > 0:
        _, pz = _trow(t_ptr, 1 + N1 + NP, B, i, i_ok, w)
        tl.store(f_ptr + _tile(0, Bp, 1 + N1 + NP, b0, 0, EP, BB, EP),
                 d1 * pz + d2 * (msq / NC))


@triton.jit
def _fourier_bwd(t_ptr, wf_ptr, gf_ptr, dt_ptr, dwf_ptr, b0, B, Bp, E, N1: tl.constexpr,
                 NP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, C0: tl.constexpr,
                 NC: tl.constexpr, BB: tl.constexpr, EP: tl.constexpr, WEIGHTS: tl.constexpr):
    """Reverse of _fourier_fwd: dt rows and this program's share of dW_fourier
    (the argument rows p_r = 2 pi t_r w are linear in t_r: dt_r = 2 pi sum_j dp_r w,
    dw = 2 pi sum_r dp_r t_r)."""
    i, i_ok, j, j_ok, is_sin, w, t0, v, d1 = _fourier_setup(t_ptr, wf_ptr, b0, B, E, BB, EP)
    d2 = -v
    d3 = -d1
    dp0 = d1 * tl.load(gf_ptr + _tile(0, Bp, 0, b0, 0, EP, BB, EP))
    gz = tl.zeros([BB, EP], dtype=tl.float32)
    tz = tl.zeros([BB], dtype=tl.float32)
    pz = tl.zeros([BB, EP], dtype=tl.float32)
    if NC > 0:
        gz = tl.load(gf_ptr + _tile(0, Bp, 1 + N1 + NP, b0, 0, EP, BB, EP))
        tz, pz = _trow(t_ptr, 1 + N1 + NP, B, i, i_ok, w)
        dp0 += d2 * gz * pz
    acc_w = tl.zeros([BB, EP], dtype=tl.float32)      # sum_r dp_r t_r
    msq = tl.zeros([BB, EP], dtype=tl.float32)
    for r in tl.static_range(1, 1 + N1):
        tr, pr = _trow(t_ptr, r, B, i, i_ok, w)
        gr = tl.load(gf_ptr + _tile(0, Bp, r, b0, 0, EP, BB, EP))
        dp0 += d2 * gr * pr
        dpr = d1 * gr
        for q in tl.static_range(NP):
            if ((PA >> (4 * q)) & 15) == r:
                _, pb = _trow(t_ptr, (PB >> (4 * q)) & 15, B, i, i_ok, w)
                dpr += d2 * pb * tl.load(gf_ptr + _tile(0, Bp, 1 + N1 + q, b0, 0, EP, BB, EP))
            if ((PB >> (4 * q)) & 15) == r:
                _, pa = _trow(t_ptr, (PA >> (4 * q)) & 15, B, i, i_ok, w)
                dpr += d2 * pa * tl.load(gf_ptr + _tile(0, Bp, 1 + N1 + q, b0, 0, EP, BB, EP))
        if r >= C0:
            if r < C0 + NC:
                dpr += (2.0 / NC) * d2 * gz * pr
                msq += pr * pr
        tl.store(dt_ptr + r * B + i, tl.sum(dpr * w[None, :], axis=1) * 6.283185307179586,
                 mask=i_ok)
        acc_w += dpr * tr[:, None]
    for q in tl.static_range(NP):
        tq, pq = _trow(t_ptr, 1 + N1 + q, B, i, i_ok, w)
        _, pa = _trow(t_ptr, (PA >> (4 * q)) & 15, B, i, i_ok, w)
        _, pb = _trow(t_ptr, (PB >> (4 * q)) & 15, B, i, i_ok, w)
        gq = tl.load(gf_ptr + _tile(0, Bp, 1 + N1 + q, b0, 0, EP, BB, EP))
        dp0 += gq * (d2 * pq + d3 * pa * pb)
        dpq = d1 * gq
        tl.store(dt_ptr + (1 + N1 + q) * B + i,
                 tl.sum(dpq * w[None, :], axis=1) * 6.283185307179586, mask=i_ok)
        acc_w += dpq * tq[:, None]
    if NC > 0:
        dp0 += d3 * gz * (msq / NC)
        dpz = d1 * gz
        tl.store(dt_ptr + (1 + N1 + NP) * B + i,
                 tl.sum(dpz * w[None, :], axis=1) * 6.283185307179586, mask=i_ok)
        acc_w += dpz * tz[:, None]
    tl.store(dt_ptr + i, tl.sum(dp0 * w[None, :], axis=1) * 6.283185307179586, mask=i_ok)
    acc_w += dp0 * t0[:, None]
    if WEIGHTS:
        col = tl.sum(acc_w, axis=0) * 6.283185307179586
        tl.atomic_add(dwf_ptr + j, col, mask=is_sin, sem="relaxed")
        tl.atomic_add(dwf_ptr + tl.where(is_sin, 0, j - E), col, mask=(j >= E) & j_ok,
                      sem="relaxed")


# ---- GEMM pieces over the [RP * BB, n] row tile ----------------------------------------
@triton.jit
def _mm(acc, a_ptr, a_row, a_ok, a_ld, KN, KP: tl.constexpr, BK: tl.constexpr,
        b_ptr, b_sk, b_sn, n, n_ok, PREC: tl.constexpr):
    """acc[m, n] += sum_k A[a_row[m], k] * Bm[k, n]; A row-major with leading dim a_ld,
    Bm[k, n] at b_ptr + k * b_sk + n * b_sn; k < KN (KP = KN padded)."""
    for k0 in range(0, KP, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < KN
        a = tl.load(a_ptr + a_row[:, None] * a_ld + k[None, :],
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * b_sk + n[None, :] * b_sn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _bias(acc, b_ptr, n, n_ok, v0):
    b = tl.load(b_ptr + n, mask=n_ok, other=0.0)
    return acc + tl.where(v0[:, None], b[None, :], 0.0)


@triton.jit
def _wgrad(dw_ptr, db_ptr, d_ptr, d_row, d_ok, d_ld, NN, NPAD: tl.constexpr, BN: tl.constexpr,
           a_ptr, a_row, a_ok, a_ld, KN, KP: tl.constexpr, BK: tl.constexpr, v0,
           HAS_BIAS: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr = False):
    """dW[n, k] += sum_m D[m, n] A[m, k] (dW row-major [NN, KN]) and db[n] += sum over the
    value-row m of D[m, n]: this program's partial sums, added atomically.

    TRANS forms the [BK, BN] tile of dW^T = A^T D instead of the [BN, BK] tile of D^T A: for
    a narrow A (the input layer's x, K = D padded to 16) the [BN, M] operand D^T would be
    held whole by every warp, ~1 KB a thread of spills for sm_90 at 8 warps; as the B operand
    the warps split D along N (fpkern.kernels.offline measures both)."""
    for n0 in range(0, NPAD, BN):
        n = n0 + tl.arange(0, BN)
        n_ok = n < NN
        if TRANS:
            dm = tl.load(d_ptr + d_row[:, None] * d_ld + n[None, :],
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)      # [M, BN]
            if HAS_BIAS:
                tl.atomic_add(db_ptr + n, tl.sum(tl.where(v0[:, None], dm, 0.0), axis=0),
                              mask=n_ok, sem="relaxed")
            for k0 in range(0, KP, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < KN
                at = tl.load(a_ptr + a_row[None, :] * a_ld + k[:, None],
                             mask=a_ok[None, :] & k_ok[:, None], other=0.0)   # [BK, M]
                tl.atomic_add(dw_ptr + n[None, :] * KN + k[:, None],
                              tl.dot(at, dm, input_precision=PREC),
                              mask=k_ok[:, None] & n_ok[None, :], sem="relaxed")
        else:
            dt = tl.load(d_ptr + d_row[None, :] * d_ld + n[:, None],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)      # [BN, M]
            if HAS_BIAS:
                tl.atomic_add(db_ptr + n, tl.sum(tl.where(v0[None, :], dt, 0.0), axis=1),
                              mask=n_ok, sem="relaxed")
            for k0 in range(0, KP, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < KN
                a = tl.load(a_ptr + a_row[:, None] * a_ld + k[None, :],
                            mask=a_ok[:, None] & k_ok[None, :], other=0.0)    # [M, BK]
                tl.atomic_add(dw_ptr + n[:, None] * KN + k[None, :],
                              tl.dot(dt, a, input_precision=PREC),
                              mask=n_ok[:, None] & k_ok[None, :], sem="relaxed")


# ---- kernels ---------------------------------------------------------------------------
@triton.jit
def _mlp_jet_fwd_kernel(
        x_ptr, t_ptr, wf_ptr, wt_ptr, bt_ptr, win_ptr, bin_ptr, wh_ptr, bh_ptr, wp_ptr, bp_ptr,
        wo_ptr, bo_ptr, out_ptr, f_ptr, pt_ptr, temb_ptr, h_ptr, a_ptr,
        B, Bp, D, E,
        WIDTH: tl.constexpr, NL: tl.constexpr, R: tl.constexpr, N1: tl.constexpr,
        NP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, C0: tl.constexpr,
        NC: tl.constexpr, BB: tl.constexpr, RP: tl.constexpr,
        WP: tl.constexpr, EP: tl.constexpr, DP: tl.constexpr, BW: tl.constexpr,
        BE: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    b0 = tl.program_id(0).to(tl.int64) * BB
    M: tl.constexpr = RP * BB
    m = tl.arange(0, M)
    mr = m // BB
    ms = b0 + m % BB
    ok = mr < R
    v0 = mr == 0
    sc = mr * Bp + ms                   # scratch row of (row, sample)
    ex = mr * B + ms                    # row of the caller's [R, B, ...] tensors
    ex_ok = ok & (ms < B)
    E2 = 2 * E

    # time embedding: T = silu(Wt fourier(t) + bt) on jets
    _fourier_fwd(t_ptr, wf_ptr, f_ptr, b0, B, Bp, E, N1, NP, PA, PB, C0, NC, BB, EP)
    tl.debug_barrier()
    for n0 in range(0, WP, BW):
        n = n0 + tl.arange(0, BW)
        n_ok = n < WIDTH
        acc = tl.zeros([M, BW], dtype=tl.float32)
        acc = _mm(acc, f_ptr, sc, ok, EP, E2, EP, BE, wt_ptr, 1, E2, n, n_ok, PREC)
        acc = _bias(acc, bt_ptr, n, n_ok, v0)
        tl.store(pt_ptr + sc[:, None] * WP + n[None, :], acc, mask=ok[:, None])
    tl.debug_barrier()
    _act_fwd(pt_ptr, temb_ptr, 0, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW)
    tl.debug_barrier()

    # H_0 = Win x + bin + T
    for n0 in range(0, WP, BW):
        n = n0 + tl.arange(0, BW)
        n_ok = n < WIDTH
        acc = tl.load(temb_ptr + sc[:, None] * WP + n[None, :], mask=ok[:, None], other=0.0)
        acc = _mm(acc, x_ptr, ex, ex_ok, D, D, DP, BD, win_ptr, 1, D, n, n_ok, PREC)
        acc = _bias(acc, bin_ptr, n, n_ok, v0)
        tl.store(h_ptr + sc[:, None] * WP + n[None, :], acc, mask=ok[:, None])
    tl.debug_barrier()

    # H_{l+1} = Wh_l silu(H_l) + bh_l + Wp_l T + bp_l
    for l in range(NL):
        _act_fwd(h_ptr, a_ptr, l * R, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW)
        tl.debug_barrier()
        for n0 in range(0, WP, BW):
            n = n0 + tl.arange(0, BW)
            n_ok = n < WIDTH
            acc = tl.zeros([M, BW], dtype=tl.float32)
            acc = _mm(acc, a_ptr, sc, ok, WP, WIDTH, WP, BW, wh_ptr + l * WIDTH * WIDTH, 1,
                      WIDTH, n, n_ok, PREC)
            acc = _mm(acc, temb_ptr, sc, ok, WP, WIDTH, WP, BW, wp_ptr + l * WIDTH * WIDTH, 1,
                      WIDTH, n, n_ok, PREC)
            acc = _bias(acc, bh_ptr + l * WIDTH, n, n_ok, v0)
            acc = _bias(acc, bp_ptr + l * WIDTH, n, n_ok, v0)
            tl.store(h_ptr + ((l + 1) * R * Bp + sc)[:, None] * WP + n[None, :], acc,
                     mask=ok[:, None])
        tl.debug_barrier()

    # out = Wo silu(H_NL) + bo
    _act_fwd(h_ptr, a_ptr, NL * R, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW)
    tl.debug_barrier()
    for n0 in range(0, DP, BD):
        n = n0 + tl.arange(0, BD)
        n_ok = n < D
        acc = tl.zeros([M, BD], dtype=tl.float32)
        acc = _mm(acc, a_ptr, sc, ok, WP, WIDTH, WP, BW, wo_ptr, 1, WIDTH, n, n_ok, PREC)
        acc = _bias(acc, bo_ptr, n, n_ok, v0)
        tl.store(out_ptr + ex[:, None] * D + n[None, :], acc, mask=ex_ok[:, None] & n_ok[None, :])


@triton.jit
def _mlp_jet_bwd_kernel(
        gout_ptr, x_ptr, t_ptr, wf_ptr, wt_ptr, win_ptr, wh_ptr, wp_ptr, wo_ptr,
        f_ptr, pt_ptr, temb_ptr, h_ptr,
        a_ptr, g_ptr, dh_ptr, tt_ptr, gf_ptr,
        dx_ptr, dt_ptr, dwf_ptr, dwt_ptr, dbt_ptr, dwin_ptr, dbin_ptr, dwh_ptr, dbh_ptr,
        dwp_ptr, dwo_ptr, dbo_ptr,
        B, Bp, D, E,
        WIDTH: tl.constexpr, NL: tl.constexpr, R: tl.constexpr, N1: tl.constexpr,
        NP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, C0: tl.constexpr,
        NC: tl.constexpr, BB: tl.constexpr, RP: tl.constexpr,
        WP: tl.constexpr, EP: tl.constexpr, DP: tl.constexpr, BW: tl.constexpr,
        BE: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, WEIGHTS: tl.constexpr):
    b0 = tl.program_id(0).to(tl.int64) * BB
    M: tl.constexpr = RP * BB
    m = tl.arange(0, M)
    mr = m // BB
    ms = b0 + m % BB
    ok = mr < R
    v0 = mr == 0
    sc = mr * Bp + ms
    ex = mr * B + ms
    ex_ok = ok & (ms < B)
    E2 = 2 * E

    # output layer: dWo += dOut^T A_NL, dbo, G = dOut Wo (WEIGHTS: the parameter gradients)
    if WEIGHTS:
        _act_fwd(h_ptr, a_ptr, NL * R, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW)
        tl.debug_barrier()
        _wgrad(dwo_ptr, dbo_ptr, gout_ptr, ex, ex_ok, D, D, DP, BD,
               a_ptr, sc, ok, WP, WIDTH, WP, BW, v0, True, PREC)
    for n0 in range(0, WP, BW):
        n = n0 + tl.arange(0, BW)
        n_ok = n < WIDTH
        acc = tl.zeros([M, BW], dtype=tl.float32)
        acc = _mm(acc, gout_ptr, ex, ex_ok, D, D, DP, BD, wo_ptr, WIDTH, 1, n, n_ok, PREC)
        tl.store(g_ptr + sc[:, None] * WP + n[None, :], acc, mask=ok[:, None])
    tl.debug_barrier()
    _act_bwd(g_ptr, tt_ptr, h_ptr, dh_ptr, NL * R, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW,
             False)
    tl.debug_barrier()

    # hidden blocks, last to first: DH holds dH_{l+1}
    for i in range(NL):
        l = NL - 1 - i
        if WEIGHTS:
            _act_fwd(h_ptr, a_ptr, l * R, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW)
            tl.debug_barrier()
            _wgrad(dwh_ptr + l * WIDTH * WIDTH, dbh_ptr + l * WIDTH, dh_ptr, sc, ok, WP, WIDTH,
                   WP, BW, a_ptr, sc, ok, WP, WIDTH, WP, BW, v0, True, PREC)
            _wgrad(dwp_ptr + l * WIDTH * WIDTH, dwp_ptr, dh_ptr, sc, ok, WP, WIDTH, WP,
                   BW, temb_ptr, sc, ok, WP, WIDTH, WP, BW, v0, False, PREC)
        for n0 in range(0, WP, BW):
            n = n0 + tl.arange(0, BW)
            n_ok = n < WIDTH
            acc = tl.zeros([M, BW], dtype=tl.float32)
            acc = _mm(acc, dh_ptr, sc, ok, WP, WIDTH, WP, BW, wh_ptr + l * WIDTH * WIDTH,
                      WIDTH, 1, n, n_ok, PREC)
            tl.store(g_ptr + sc[:, None] * WP + n[None, :], acc, mask=ok[:, None])
            tt = tl.load(tt_ptr + sc[:, None] * WP + n[None, :], mask=ok[:, None], other=0.0)
            tt = _mm(tt, dh_ptr, sc, ok, WP, WIDTH, WP, BW, wp_ptr + l * WIDTH * WIDTH,
                     WIDTH, 1, n, n_ok, PREC)
            tl.store(tt_ptr + sc[:, None] * WP + n[None, :], tt, mask=ok[:, None])
        tl.debug_barrier()
        _act_bwd(g_ptr, tt_ptr, h_ptr, dh_ptr, l * R, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB,
                 BW, False)
        tl.debug_barrier()

    # input layer H_0 = Win x + bin + T: dWin, dbin, dx; dT = TT + DH
    if WEIGHTS:
        _wgrad(dwin_ptr, dbin_ptr, dh_ptr, sc, ok, WP, WIDTH, WP, BW,
               x_ptr, ex, ex_ok, D, D, DP, BD, v0, True, PREC, True)
    for n0 in range(0, DP, BD):
        n = n0 + tl.arange(0, BD)
        n_ok = n < D
        acc = tl.zeros([M, BD], dtype=tl.float32)
        acc = _mm(acc, dh_ptr, sc, ok, WP, WIDTH, WP, BW, win_ptr, D, 1, n, n_ok, PREC)
        tl.store(dx_ptr + ex[:, None] * D + n[None, :], acc, mask=ex_ok[:, None] & n_ok[None, :])
    _act_bwd(dh_ptr, tt_ptr, pt_ptr, g_ptr, 0, b0, Bp, WP, N1, NP, PA, PB, C0, NC, BB, BW,
             True)
    tl.debug_barrier()

    # time embedding: dWt, dbt from dPt (in G), then dF = dPt Wt and the Fourier rule
    if WEIGHTS:
        _wgrad(dwt_ptr, dbt_ptr, g_ptr, sc, ok, WP, WIDTH, WP, BW,
               f_ptr, sc, ok, EP, E2, EP, BE, v0, True, PREC)
    for n0 in range(0, EP, BE):
        n = n0 + tl.arange(0, BE)
        n_ok = n < E2
        acc = tl.zeros([M, BE], dtype=tl.float32)
        acc = _mm(acc, g_ptr, sc, ok, WP, WIDTH, WP, BW, wt_ptr, E2, 1, n, n_ok, PREC)
        tl.store(gf_ptr + sc[:, None] * EP + n[None, :], acc, mask=ok[:, None])
    tl.debug_barrier()
    _fourier_bwd(t_ptr, wf_ptr, gf_ptr, dt_ptr, dwf_ptr, b0, B, Bp, E, N1, NP, PA, PB, C0, NC,
                 BB, EP, WEIGHTS)


# ---- launchers -------------------------------------------------------------------------
def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def config(R: int, B: int, width: int, E: int, D: int) -> dict:
    """Block sizes and padded extents for R rows of B samples."""
    WP, EP, DP = _pad(width), _pad(2 * E), _pad(D)
    RP = triton.next_power_of_2(R)
    BB = BLOCK_B if RP <= 8 else BLOCK_B * 8 // RP
    return dict(BB=BB, RP=RP, WP=WP, EP=EP, DP=DP,
                BW=min(_BLOCK_N, WP), BE=min(_BLOCK_N, EP), BD=min(_BLOCK_N, DP),
                Bp=triton.cdiv(B, BB) * BB)


def saved_shapes(R: int, B: int, width: int, E: int, D: int, layers: int):
    """Shapes of the tensors the forward saves: F, Pt, T, H."""
    c = config(R, B, width, E, D)
    Bp, WP = c["Bp"], c["WP"]
    return (R, Bp, c["EP"]), (R, Bp, WP), (R, Bp, WP), (layers + 1, R, Bp, WP)


def pack_rows(rows) -> int:
    """Row indices (each < 16) as one compile-time int, 4 bits each: the kernels read index j
    as (P >> 4 j) & 15."""
    packed = 0
    for j, r in enumerate(rows):
        if not 0 <= int(r) < 16:
            raise ValueError(f"row index {r} does not fit the kernels' 4-bit packing")
        packed |= int(r) << (4 * j)
    return packed


def _meta(x_rows, t_rows, in_w, hidden_w, fourier, n1, pair_a, pair_b, c0, nc):
    R, B, D = x_rows.shape
    width, E, L = in_w.shape[0], fourier.shape[0], hidden_w.shape[0]
    c = config(R, B, width, E, D)
    Bp = c.pop("Bp")
    consts = dict(WIDTH=width, NL=L, R=R, N1=n1, NP=len(pair_a), PA=pack_rows(pair_a),
                  PB=pack_rows(pair_b), C0=c0 if nc else 1, NC=nc, **c,
                  PREC=_precision(x_rows.device), num_warps=_NUM_WARPS)
    return R, B, D, E, Bp, consts


def _precision(device: torch.device) -> str:
    if device.type != "cuda" or torch.version.hip is not None \
            or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "ieee"
    return "tf32x3"


def mlp_jet_forward(x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b,
                    proj_w, proj_b, out_w, out_b, n1: int, pair_a, pair_b, c0: int, nc: int):
    """Output rows [R, B, D] and the saved intermediates (F, Pt, T, H)."""
    R, B, D, E, Bp, k = _meta(x_rows, t_rows, in_w, hidden_w, fourier, n1, pair_a, pair_b,
                              c0, nc)
    shapes = saved_shapes(R, B, in_w.shape[0], E, D, hidden_w.shape[0])
    feats, pre_t, temb, pre = (x_rows.new_empty(s) for s in shapes)
    work = x_rows.new_empty(shapes[1])
    out = torch.empty_like(x_rows)
    _mlp_jet_fwd_kernel[(Bp // k["BB"],)](
        x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b, proj_w,
        proj_b, out_w, out_b, out, feats, pre_t, temb, pre, work, B, Bp, D, E, **k)
    return out, feats, pre_t, temb, pre


def mlp_jet_backward(g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w,
                     feats, pre_t, temb, pre, n1: int, pair_a, pair_b, c0: int, nc: int,
                     weights: bool = True, time: bool = True):
    """Gradients (x rows, t rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b,
    proj_w, proj_b, out_w, out_b) for output-row gradients g_out. weights=False skips the
    parameter gradients (left zero: a reverse pass for the x gradient alone); `time` (whether
    the t rows' gradient is used) is accepted for the CPU implementation's signature."""
    R, B, D, E, Bp, k = _meta(x_rows, t_rows, in_w, hidden_w, fourier, n1, pair_a, pair_b,
                              c0, nc)
    work = [torch.empty_like(pre_t) for _ in range(3)] + [torch.zeros_like(pre_t),
                                                           torch.empty_like(feats)]
    zeros = [torch.zeros(p.shape, dtype=torch.float32, device=p.device)
             for p in (fourier, temb_w, temb_w[:, 0], in_w, in_w[:, 0], hidden_w,
                       hidden_w[:, :, 0], proj_w, out_w, out_w[:, 0])]
    d_f, d_wt, d_bt, d_win, d_bin, d_wh, d_bh, d_wp, d_wo, d_bo = zeros
    d_x, d_t = torch.empty_like(x_rows), torch.empty_like(t_rows)
    _mlp_jet_bwd_kernel[(Bp // k["BB"],)](
        g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w,
        feats, pre_t, temb, pre, *work,
        d_x, d_t, d_f, d_wt, d_bt, d_win, d_bin, d_wh, d_bh, d_wp, d_wo, d_bo,
        B, Bp, D, E, num_stages=1, WEIGHTS=bool(weights), **k)
    return d_x, d_t, d_f, d_wt, d_bt, d_win, d_bin, d_wh, d_bh, d_wp, d_bh.clone(), d_wo, d_bo

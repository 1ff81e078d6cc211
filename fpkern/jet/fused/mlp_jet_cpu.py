"""The CPU implementation of the fused MLP-on-jets op (fpkern.jet.fused.mlp_jet).

The algorithm of the Triton kernels (fpkern/kernels/mlp_jet.py) with the GEMMs as torch
matrix products over all rows at once ([R * B, n] operands) and the activation jets in the
C++ kernels of csrc/jet_act.cpp (fpkern.jet.fused.jet_act.native_forward). Forward, biases
on the value row only:

    F = Fourier rows of t,  Pt = Wt F + bt,  T = silu(Pt),  H_0 = Win x + bin + T,
    H_{l+1} = Wh_l silu(H_l) + bh_l + Wp_l T + bp_l,  out = Wo silu(H_L) + bo.

It keeps F, Pt, T and the H_l, not each layer's activation as the per-op jet rules do; the
backward walks the layers in reverse, recomputing each silu(H_l) from H_l, and skips the
parameter gradients when the running backward does not use them
(fpkern.jet.fused.mlp_jet._executed). T's rows that are zero by structure (those of the
probe directions, _live_rows) stay out of the time projections' GEMMs. The GEMMs, the same
as the per-op rules', dominate the time on CPU (measurements: benchmarks/results/README.md,
"Design notes"). float32 and float64, any width and row count.
"""

from __future__ import annotations

import torch

from fpkern.jet.fused.jet_act import native_backward, native_forward
from fpkern.jet.fused.mlp_rows import fourier_rows, fourier_rows_vjp

__all__ = ["mlp_jet_forward", "mlp_jet_backward", "saved_shapes"]


def saved_shapes(R: int, B: int, width: int, E: int, D: int, layers: int):
    """Shapes of the tensors the forward keeps: F, Pt, T, H (the Triton module's signature)."""
    return (R, B, 2 * E), (R, B, width), (R, B, width), (layers + 1, R, B, width)


def _act(h: torch.Tensor, spec) -> torch.Tensor:
    return native_forward(h, "silu", spec)


def _act_back(g: torch.Tensor, h: torch.Tensor, spec) -> torch.Tensor:
    return native_backward(g, h, "silu", spec)


def _flat(a: torch.Tensor) -> torch.Tensor:
    """[R, B, n] rows as one [R * B, n] matrix (a view)."""
    return a.reshape(-1, a.shape[-1])


def _live_rows(t_rows: torch.Tensor, spec) -> list[int] | None:
    """The rows of the time embedding T that are not zero by structure; None when all are.

    T is a function of t alone. Its first-order row i is zero where t's row i is; a pair
    row (a, b) where t's is and t's row a or b is; the collapsed row where t's is and all
    the collapsed rows' are. The jet rules of fourier_rows, the linear layer and silu keep
    these rows exactly zero. The probe rows of every fused pass are such rows: the projected
    pass has 2 live rows of 5, the laplacian one 2 of 4."""
    n1, pair_a, pair_b, c0, nc = spec
    zero = (t_rows.reshape(t_rows.shape[0], -1) == 0).all(1).tolist()
    live = [True] + [not zero[i] for i in range(1, 1 + n1)]
    for j, (a, b) in enumerate(zip(pair_a, pair_b)):
        live.append(not (zero[1 + n1 + j] and not (live[a] and live[b])))
    if nc:
        live.append(not (zero[-1] and not any(live[c0:c0 + nc])))
    return None if all(live) else [r for r, keep in enumerate(live) if keep]


def mlp_jet_forward(x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b,
                    proj_w, proj_b, out_w, out_b, n1: int, pair_a, pair_b, c0: int, nc: int):
    """Output rows [R, B, D] and the kept tensors (F, Pt, T, H); hidden_* and proj_* are
    stacked [L, ...] tensors. Computes in the inputs' dtype: autocast is off inside, as in
    the Triton kernels."""
    with torch.autocast("cpu", enabled=False):
        return _forward(x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w,
                        hidden_b, proj_w, proj_b, out_w, out_b,
                        (n1, tuple(pair_a), tuple(pair_b), c0, nc))


def _forward(x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b, proj_w,
             proj_b, out_w, out_b, spec):
    L = hidden_w.shape[0]
    feats = fourier_rows(t_rows, fourier, spec)
    pre_t = torch.matmul(feats, temb_w.T)
    pre_t[0] += temb_b
    temb = _act(pre_t, spec)
    live = _live_rows(t_rows, spec)           # T's other rows are 0: no projection GEMM
    T = _flat(temb)
    H = x_rows.new_empty((L + 1,) + tuple(pre_t.shape))
    torch.matmul(x_rows, in_w.T, out=H[0])
    H[0] += temb
    H[0, 0] += in_b
    for l in range(L):
        h = _flat(H[l + 1])
        torch.mm(_flat(_act(H[l], spec)), hidden_w[l].T, out=h)
        if live is None:
            h.addmm_(T, proj_w[l].T)
        else:
            for r in live:                    # in place on the row's view: no gather
                H[l + 1, r].addmm_(temb[r], proj_w[l].T)
        H[l + 1, 0] += hidden_b[l] + proj_b[l]
    out = torch.matmul(_act(H[L], spec), out_w.T)
    out[0] += out_b
    return out, feats, pre_t, temb, H


def mlp_jet_backward(g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w,
                     feats, pre_t, temb, H, n1: int, pair_a, pair_b, c0: int, nc: int,
                     weights: bool = True, time: bool = True):
    """Gradients (x rows, t rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b,
    proj_w, proj_b, out_w, out_b) for output-row gradients g_out, as the Triton backward.

    weights=False skips the parameter gradients (zeros are returned), time=False the t rows'
    (and, with weights=False, the whole time-embedding branch): a reverse pass for the
    x gradient alone, as the div form's value takes, runs the input-gradient GEMMs only."""
    with torch.autocast("cpu", enabled=False):
        return _backward(g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w,
                         feats, pre_t, temb, H, (n1, tuple(pair_a), tuple(pair_b), c0, nc),
                         weights, time)


def _backward(g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w, feats,
              pre_t, temb, H, spec, weights: bool, time: bool):
    R, B, D = x_rows.shape
    L = hidden_w.shape[0]
    width = in_w.shape[0]
    zeros = [torch.zeros_like(p) for p in (fourier, temb_w, temb_w[:, 0], in_w, in_w[:, 0],
                                           hidden_w, hidden_w[..., 0], proj_w, out_w,
                                           out_w[:, 0])]
    d_f, d_wt, d_bt, d_win, d_bin, d_wh, d_bh, d_wp, d_wo, d_bo = zeros
    branch = weights or time                  # gradients through the time embedding T
    g = _flat(g_out)
    if weights:
        torch.mm(g.T, _flat(_act(H[L], spec)), out=d_wo)
        d_bo = g_out[0].sum(0)
    dH = _act_back((g @ out_w).view(R, B, width), H[L], spec)
    # T's structurally zero rows (_live_rows) add nothing to the projections' weight
    # gradients, and their own gradient reaches only the t rows' (time): without time it
    # is left out, with it computed in full
    live = _live_rows(t_rows, spec)
    T = _flat(temb)
    d_T = torch.zeros_like(temb) if branch else None
    for l in reversed(range(L)):
        dh = _flat(dH)
        if weights:
            torch.mm(dh.T, _flat(_act(H[l], spec)), out=d_wh[l])
            if live is None:
                torch.mm(dh.T, T, out=d_wp[l])
            else:
                d_wp[l].zero_()
                for r in live:
                    d_wp[l].addmm_(dH[r].T, temb[r])
            d_bh[l] = dH[0].sum(0)
        if branch:
            if live is None or time:
                _flat(d_T).addmm_(dh, proj_w[l])
            else:
                for r in live:
                    d_T[r].addmm_(dH[r], proj_w[l])
        dH = _act_back((dh @ hidden_w[l]).view(R, B, width), H[l], spec)
    dh = _flat(dH)
    d_x = (dh @ in_w).view(R, B, D)
    if weights:
        torch.mm(dh.T, _flat(x_rows), out=d_win)
        d_bin = dH[0].sum(0)
    d_t = torch.zeros_like(t_rows)
    if branch:
        d_T += dH
        d_pt = _act_back(d_T, pre_t, spec)
        dp = _flat(d_pt)
        if weights:
            torch.mm(dp.T, _flat(feats), out=d_wt)
            d_bt = d_pt[0].sum(0)
        d_t, d_fw = fourier_rows_vjp((dp @ temb_w).view(feats.shape), t_rows, fourier, spec)
        if weights:
            d_f = d_fw
    return d_x, d_t, d_f, d_wt, d_bt, d_win, d_bin, d_wh, d_bh, d_wp, d_bh.clone(), d_wo, d_bo

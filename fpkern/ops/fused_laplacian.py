"""The laplacian-form residual of method="fused": r_c = d_t s - 1/2 g^2 Lap_V s - J c + f s.

    terms(score_fn, x, t, sde, V, score, weight, m) -> (r, div, loss, h, s)
    residual(score_fn, x, t, sde, V, score=None) -> r_c

d_t s - J c is one directional derivative of s(x, t), along the (x, t)-tangent (-c, 1),
c = g^2 s - f x (docs/MATH.md 2-3). With the score known beforehand (the DSM forward's), one jet
pass with rows x, v_1..v_K, (-c, 1), collapsed gives every term, and
fpkern.ops.laplacian_terms turns the rows into the residual, the Hutchinson divergence, the
weighted loss and the scalar FPE term in one kernel. Without it, J c is a second,
two-row pass, c depending on s. Forward mode only.
"""

from __future__ import annotations

import torch

from fpkern.ops._common import bcast, sde_coefficients
from fpkern.ops.fpe_combine import fpe_combine
from fpkern.ops.jet_pass import jvp_row, laplacian_rows, transport_rows
from fpkern.ops.laplacian_terms import laplacian_terms

__all__ = ["terms", "residual"]


def terms(score_fn, x, t, sde, V, score, weight, m: float):
    """(r, div, loss, h, s) of the laplacian form (fpkern.ops.laplacian_terms) from one jet
    pass, s being its value row; `score` = score_fn(x, t), which fixes the direction
    c = g^2 s - f x."""
    f, g2 = sde_coefficients(sde, t, x)
    c = bcast(g2, x) * score - bcast(f, x) * x
    s, jv, w, lap = transport_rows(score_fn, x, t, V, c)
    return (*laplacian_terms(V, jv, w, lap, s, x, g2, f, weight, m), s)


def residual(score_fn, x, t, sde, V: torch.Tensor,
             score: torch.Tensor | None = None) -> torch.Tensor:
    """r_c for probes V [K, *x.shape]; `score` = score_fn(x, t) when the caller has it
    already: one jet pass (the transport row) instead of two."""
    if score is not None:
        return terms(score_fn, x, t, sde, V, score, x.new_ones(x.shape[0]), 2.0)[0]
    f, g2 = sde_coefficients(sde, t, x)
    s, dts, lap = laplacian_rows(score_fn, x, t, V)
    c = bcast(g2, x) * s - bcast(f, x) * x
    return fpe_combine(dts, lap, jvp_row(score_fn, x, t, c), s, g2, f)

"""method="exact": full Jacobians and exact derivatives, the ground truth for small D.

Every derivative is taken with torch.func forward mode over the D coordinate directions
(and reverse mode over that for grad(div s)), so the cost grows like D network passes and
the memory like D copies of the activations: fine for toy data, refused above `MAX_DIM`.
The results stay differentiable with respect to the parameters of score_fn.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from fpkern.ops._common import bcast, flat_dim, sde_coefficients
from fpkern.ops.fpe_combine import fpe_combine

__all__ = ["MAX_DIM", "score_and_time_derivative", "jacobian", "divergence", "laplacian",
           "grad_divergence", "residual"]

MAX_DIM = 1024
_CHUNK = 64


def _check_dim(x: torch.Tensor) -> None:
    d = flat_dim(x)
    if d > MAX_DIM:
        raise ValueError(f"method='exact' builds full Jacobians and is limited to D <= {MAX_DIM} "
                         f"features per sample, got D={d}; use method='fused' or 'naive'")


def _basis(x: torch.Tensor) -> torch.Tensor:
    """The D coordinate directions, each broadcast over the batch: [D, *x.shape]."""
    d = flat_dim(x)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return eye[:, None, :].expand(d, x.shape[0], d).reshape((d,) + tuple(x.shape))


def score_and_time_derivative(score_fn, x, t):
    """(s, d_t s) with d_t s exact (forward mode in t)."""
    return jvp(lambda tt: score_fn(x, tt), (t,), (torch.ones_like(t),))


def _columns(score_fn, x, t):
    """J e_j for every coordinate j: [D, *x.shape]."""
    fn = lambda e: jvp(lambda y: score_fn(y, t), (x,), (e,))[1]  # noqa: E731
    return vmap(fn, chunk_size=_CHUNK)(_basis(x))


def jacobian(score_fn, x, t) -> torch.Tensor:
    """Per-sample Jacobian J[b, i, j] = d s_i / d x_j, shape [B, D, D]."""
    _check_dim(x)
    cols = _columns(score_fn, x, t)
    return cols.reshape(cols.shape[0], x.shape[0], -1).permute(1, 2, 0)


def divergence(score_fn, x, t) -> torch.Tensor:
    """Exact div_x s per sample, shape [B]."""
    _check_dim(x)
    return torch.diagonal(jacobian(score_fn, x, t), dim1=1, dim2=2).sum(-1)


def laplacian(score_fn, x, t) -> torch.Tensor:
    """Exact Laplacian of each score component, sum_j d^2 s / d x_j^2, shape of x."""
    _check_dim(x)

    def second(e):
        first = lambda y: jvp(lambda z: score_fn(z, t), (y,), (e,))[1]  # noqa: E731
        return jvp(first, (x,), (e,))[1]

    return vmap(second, chunk_size=_CHUNK)(_basis(x)).sum(0)


def grad_divergence(score_fn, x, t) -> torch.Tensor:
    """Exact grad_x (div_x s), shape of x (samples are independent: one reverse pass)."""
    _check_dim(x)
    div, pullback = vjp(lambda y: divergence(score_fn, y, t), x)
    return pullback(torch.ones_like(div))[0]


def residual(score_fn, x, t, sde, form: str) -> torch.Tensor:
    """The exact score-FPE residual r (form "div") or r_c (form "laplacian"), docs/MATH.md 2."""
    _check_dim(x)
    s, dts = score_and_time_derivative(score_fn, x, t)
    f, g2 = sde_coefficients(sde, t, x)
    c = (bcast(g2, x) * s - bcast(f, x) * x).reshape(x.shape[0], -1)
    J = jacobian(score_fn, x, t)
    if form == "div":
        second = grad_divergence(score_fn, x, t)
        jc = torch.einsum("bij,bi->bj", J, c)          # J^T c
    else:
        second = laplacian(score_fn, x, t)
        jc = torch.einsum("bij,bj->bi", J, c)          # J c
    return fpe_combine(dts, second, jc.reshape(x.shape), s, g2, f)

"""Directional derivatives of any score_fn by forward-mode AD (torch.func), probes batched.

This is the generic path of method="fused": exact to rounding for given probes (no time
stencil: d_t s is a JVP in t), and it accepts any callable score_fn. It evaluates the
network once per tangent batch through torch.func.vmap, which is slower than propagating
all tangents through the network in stacked rows with fused jet kernels.

    directional(f, x, t, V)        -> (s, J v_k for each probe)           [K, *x.shape]
    second_directional(f, x, t, V) -> (J v_k, D^2_{v_k} s for each probe)

Each runs inside `autodiff_backends()` (fpkern._autodiff), which changes no value, only
how torch computes the three ops whose derivative formulas fail these networks (attention,
group_norm, layer_norm).
"""

from __future__ import annotations

import functools

import torch
from torch.func import jvp, vmap

from fpkern._autodiff import autodiff_backends
from fpkern.ops._common import bcast, div_form_residual, sde_coefficients
from fpkern.ops.fpe_combine import fpe_combine

__all__ = ["autodiff_backends", "time_derivative", "directional", "second_directional",
           "residual"]


def _autodiff(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with autodiff_backends():
            return fn(*args, **kwargs)
    return run


@_autodiff
def time_derivative(score_fn, x, t):
    """(s, d_t s), exact."""
    return jvp(lambda tt: score_fn(x, tt), (t,), (torch.ones_like(t),))


@_autodiff
def directional(score_fn, x, t, V):
    """(s, [J v_k]_k): the score and its JVP along each probe."""
    def one(v):
        return jvp(lambda y: score_fn(y, t), (x,), (v,))

    s_rep, jv = vmap(one)(V)
    s = s_rep[0]
    return s, jv


@_autodiff
def second_directional(score_fn, x, t, V):
    """([J v_k]_k, [D^2_{v_k} s]_k) by nested JVPs (a jet of order 2 along each probe)."""

    def one(v):
        first = lambda y: jvp(lambda z: score_fn(z, t), (y,), (v,))[1]  # noqa: E731
        return jvp(first, (x,), (v,))

    return vmap(one)(V)


@_autodiff
def residual(score_fn, x, t, sde, form: str, V: torch.Tensor) -> torch.Tensor:
    f, g2 = sde_coefficients(sde, t, x)
    if form == "laplacian":
        s, dts = time_derivative(score_fn, x, t)
        _, d2 = second_directional(score_fn, x, t, V)
        c = bcast(g2, x) * s - bcast(f, x) * x
        _, jc = jvp(lambda y: score_fn(y, t), (x,), (c,))
        return fpe_combine(dts, d2.mean(0), jc, s, g2, f)
    # div form: grad_x of the scalar FPE right-hand side, Hutchinson divergence in forward
    # mode and one reverse pass over it. The reduction is plain torch here because the
    # parameter gradient differentiates through this reverse pass a second time.
    xg = x.detach().requires_grad_(True)
    _, dts = time_derivative(score_fn, x.detach(), t)
    s, jv = directional(score_fn, xg, t, V)
    div = (V * jv).flatten(2).sum(2).mean(0)
    return div_form_residual(xg, s, div, dts, f, g2)

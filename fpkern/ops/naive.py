"""method="naive": the paper's own algorithm (docs/MATH.md section 5), the benchmarks' baseline.

Reverse-mode autograd nested the way FP-Diffusion's reference code nests it:
  - Hutchinson divergence through a VJP with create_graph (one pass per probe),
  - grad_x of the scalar 1/2 g^2 (div s + |s|^2) - f <x, s> by a double backward,
  - d_t s by the 3-point stencil with hs = 1e-3, hd = 5e-4 (three more forwards).
The laplacian form, which the paper does not have, is built from the same tools: J c and
the second directional derivatives by the double-VJP trick (a JVP out of two VJPs).

One change from the reference code: the stencil's nodes lie where the score is defined, and
d_t s at t is read off the quadratic through them (Lagrange weights from the offsets
actually used), so the estimate stays second-order accurate and finite on all of [0, T]:
  - near T, and near t = 0 under an SDE with sigma(0) > 0 (VE), the nodes (t - hs, t, t + hd)
    shift together until they lie inside [0, T];
  - under an SDE with sigma(0) = 0 (VP, sub-VP) the score is undefined at t = 0 (score
    networks divide by sigma(t)) and changes on the time scale t itself near it. For
    0 < t < hs / RHO the stencil is the paper's scaled by RHO t / hs: its lowest node is
    t (1 - RHO) > 0 and its relative step stays RHO. At t = 0 itself the nodes are
    (0, hs, hs + hd): the residual needs s(x, 0) anyway.
Where s(x, 0) is not finite, every method raises (fpkern.ops._common.CheckedScore).

The finite difference needs float32 or float64: bfloat16 cannot resolve a step of 1e-3
(fpkern.ops._common.check_precision).
"""

from __future__ import annotations

import torch

from fpkern.ops._common import bcast, div_form_residual, sde_coefficients
from fpkern.ops.fpe_combine import fpe_combine

__all__ = ["HS", "HD", "RHO", "sigma_vanishes_at_zero", "stencil_nodes",
           "time_derivative_stencil", "residual", "divergence", "laplacian"]

HS = 1e-3
HD = 5e-4
#: the stencil's relative step near a singular t = 0: its lowest node is t (1 - RHO)
RHO = 0.1


def sigma_vanishes_at_zero(sde) -> bool:
    """Whether the SDE's marginal std sigma(0) is 0 (VP, sub-VP): the perturbation kernel is a
    point mass there and the score of a network, which divides by sigma(t), is undefined."""
    return float(sde.sigma(torch.zeros(1, dtype=torch.float64))[0]) == 0.0


def stencil_nodes(t: torch.Tensor, T: float, *, singular_at_zero: bool = False) -> torch.Tensor:
    """The three stencil times per sample, shape [3, B], all inside [0, T]; with
    `singular_at_zero`, all > 0 for t > 0 (the module docstring)."""
    base = torch.tensor([-HS, 0.0, HD], dtype=t.dtype, device=t.device)
    if singular_at_zero:
        scale = torch.where(t > 0, (t * (RHO / HS)).clamp(max=1), 1)
    else:
        scale = torch.ones_like(t)
    shift = (scale * HS - t).clamp(min=0) - (t + scale * HD - T).clamp(min=0)
    return (t + shift)[None, :] + scale[None, :] * base[:, None]


def _lagrange_derivative_weights(d: torch.Tensor) -> torch.Tensor:
    """Weights w_i with p'(0) = sum_i w_i p(d_i) for the quadratic through offsets d [3, B]."""
    d0, d1, d2 = d
    return torch.stack([-(d1 + d2) / ((d0 - d1) * (d0 - d2)),
                        -(d0 + d2) / ((d1 - d0) * (d1 - d2)),
                        -(d0 + d1) / ((d2 - d0) * (d2 - d1))])


def time_derivative_stencil(score_fn, x: torch.Tensor, t: torch.Tensor, T: float, *,
                            singular_at_zero: bool = False) -> torch.Tensor:
    """d_t s by the paper's 3-point stencil on stencil_nodes; shape of x."""
    nodes = stencil_nodes(t, T, singular_at_zero=singular_at_zero)
    # weights from the offsets as evaluated (after rounding to t's dtype), in float64
    w = _lagrange_derivative_weights(nodes.double() - t.double()[None, :]).to(x.dtype)
    out = 0
    for i in range(3):
        out = out + bcast(w[i], x) * score_fn(x, nodes[i])
    return out


def _jvp_by_double_vjp(out: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(d out / d x) v with reverse mode only: the gradient of <J^T w, v> in w; zero where
    out does not depend on x (J of a score affine in x, differentiated again)."""
    if not out.requires_grad:
        return torch.zeros_like(out)
    w = torch.zeros_like(out, requires_grad=True)
    (jtw,) = torch.autograd.grad(out, x, w, create_graph=True, allow_unused=True)
    if jtw is None:
        return torch.zeros_like(out)
    (jv,) = torch.autograd.grad(jtw, w, v, create_graph=True)
    return jv


def divergence(s: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson divergence 1/K sum_k v_k . (v_k^T J) through VJPs, shape [B]."""
    total = 0
    for v in probes:
        (vjp,) = torch.autograd.grad(s, x, v, create_graph=True)
        total = total + (vjp * v).flatten(1).sum(1)
    return total / probes.shape[0]


def laplacian(s: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson Laplacian 1/K sum_k D^2_{v_k} s by nested double-VJPs, shape of x."""
    total = 0
    for v in probes:
        jv = _jvp_by_double_vjp(s, x, v)
        total = total + _jvp_by_double_vjp(jv, x, v)
    return total / probes.shape[0]


def residual(score_fn, x, t, sde, form: str, probes: torch.Tensor) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)   # a new leaf: the caller's x is left alone
    s = score_fn(xg, t)
    f, g2 = sde_coefficients(sde, t, x)
    dts = time_derivative_stencil(score_fn, x.detach(), t, sde.T,
                                  singular_at_zero=sigma_vanishes_at_zero(sde))
    if form == "div":
        return div_form_residual(xg, s, divergence(s, xg, probes), dts, f, g2)
    c = bcast(g2, x) * s - bcast(f, x) * xg
    jc = _jvp_by_double_vjp(s, xg, c)
    lap = laplacian(s, xg, probes)
    return fpe_combine(dts, lap, jc, s, g2, f)

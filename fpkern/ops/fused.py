"""method="fused": the FPE residual from one collapsed Taylor-mode pass of the network.

The network runs on Jets (fpkern.jet): its input x carries the rows

    x, v_1 .. v_K (probes), 0 (time tangent), 0 (collapsed second order)

and t carries t, 0 .. 0, 1, 0, so one pass returns s, J v_k, d_t s and 1/K sum_k D^2_{v_k} s,
every linear layer running once over all rows (MATH.md sections 2-3, no time stencil).

- form "laplacian": r_c = d_t s - 1/2 g^2 Lap_V s - J c + f s. d_t s - J c is one
  directional derivative of s(x, t), along (x, t)-tangent (-c, 1): with the score known
  beforehand (the DSM forward's), one pass with rows x, v_1..v_K, (-c, 1), collapsed gives
  everything, and fpkern.ops.terms.combine_terms turns the rows into the residual, the
  Hutchinson divergence, the weighted loss and the scalar FPE term in one kernel (terms()).
  Without it, J c is a second, two-row pass (c depends on s). Forward mode only.
- form "div": r = d_t s - grad_x[1/2 g^2 (div_V s + |s|^2) - f <x, s>]: the jet pass gives
  div_V s, then one reverse pass over the jet graph gives the gradient; r's own gradient
  comes from the projected pass below with u = the upstream gradient (fpkern.ops.fused_div).
- div_pass with directions U (fpkern.ops.projected_residual): u . r for a direction u per
  sample, forward mode only. Every term is a directional derivative: u . J^T c = c . J u
  and u . grad(div_V s) = 1/K sum_k v_k . d^2 s[v_k, u] (mixed second-order rows).
  E_u (u . r)^2 = |r|^2 for Rademacher or Gaussian u, so w (u . r)^2 is an unbiased
  estimate of the paper's loss w |r|^2.

A score_fn that uses a torch function without a jet rule raises JetUnsupported; callers
then use the generic torch.func path (fpkern.ops.forward_mode).
"""

from __future__ import annotations

import torch

from fpkern.jet import Jet, Layout
from fpkern.ops import fused_div
from fpkern.ops._common import bcast, sde_coefficients
from fpkern.ops.combine import fpe_combine, hutchinson_reduce
from fpkern.ops.terms import combine_terms

__all__ = ["Layout", "jet_pass", "residual", "terms", "div_pass"]


def jet_pass(score_fn, x: torch.Tensor, t: torch.Tensor, tangents: torch.Tensor, *,
             time: bool, layout: Layout, t_tangents: torch.Tensor | None = None) -> torch.Tensor:
    """Run score_fn on Jets: first-order x rows = tangents (then a time row if `time`).

    `t_tangents` [n, B]: the t-components of those first-order rows (default 0).
    Returns the output rows [layout.rows, *x.shape].
    """
    n_x = tangents.shape[0]
    x_rows = torch.cat([x[None], tangents,
                        x.new_zeros((layout.rows - 1 - n_x,) + tuple(x.shape))])
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    t_first = list(t_tangents) if t_tangents is not None else [zero] * n_x
    t_rows = [t] + t_first + ([one] if time else [])
    t_rows = torch.stack(t_rows + [zero] * (layout.rows - len(t_rows)))
    out = score_fn(Jet(x_rows, layout), Jet(t_rows, layout))
    if not isinstance(out, Jet):
        raise TypeError("score_fn returned a plain tensor for Jet inputs: its output does not "
                        "depend on x and t through torch functions")
    return out.rows


def _laplacian_terms(score_fn, x, t, V):
    """s, d_t s and 1/K sum_k D^2_{v_k} s: one pass."""
    K = V.shape[0]
    layout = Layout(n1=K + 1, collapse=tuple(range(1, K + 1)))
    rows = jet_pass(score_fn, x, t, V, time=True, layout=layout)
    return rows[0], rows[K + 1], rows[-1]


def _transport_terms(score_fn, x, t, V, c):
    """s, [J v_k]_k, d_t s - J c and 1/K sum_k D^2_{v_k} s: one pass, the transport row
    being the derivative along the (x, t)-tangent (-c, 1)."""
    K = V.shape[0]
    layout = Layout(n1=K + 1, collapse=tuple(range(1, K + 1)))
    t_tan = torch.zeros((K + 1,) + tuple(t.shape), dtype=t.dtype, device=t.device)
    t_tan[K] = 1
    rows = jet_pass(score_fn, x, t, torch.cat([V, -c[None]]), time=False, layout=layout,
                    t_tangents=t_tan)
    return rows[0], rows[1:K + 1], rows[K + 1], rows[-1]


def terms(score_fn, x, t, sde, V, score, weight, m: float):
    """(r, div, loss, h, s) of the laplacian form (fpkern.ops.terms.combine_terms) from one
    jet pass, s being its value row; `score` = score_fn(x, t), which fixes the direction
    c = g^2 s - f x."""
    f, g2 = sde_coefficients(sde, t, x)
    c = bcast(g2, x) * score - bcast(f, x) * x
    s, jv, w, lap = _transport_terms(score_fn, x, t, V, c)
    return (*combine_terms(V, jv, w, lap, s, x, g2, f, weight, m), s)


def _jvp(score_fn, x, t, c):
    rows = jet_pass(score_fn, x, t, c[None], time=False, layout=Layout(n1=1))
    return rows[1]


def residual(score_fn, x, t, sde, form: str, V: torch.Tensor,
             score: torch.Tensor | None = None, *,
             differentiable: bool = True) -> torch.Tensor:
    """The residual of `form`; `score` = score_fn(x, t) when the caller has it already: the
    laplacian form then needs one jet pass (the transport row) instead of two.
    `differentiable`: whether the div form's r carries a gradient (fpkern.ops.fused_div)."""
    if form != "laplacian":
        return fused_div.residual(score_fn, x, t, sde, V, differentiable=differentiable)
    if score is not None:
        return terms(score_fn, x, t, sde, V, score, x.new_ones(x.shape[0]), 2.0)[0]
    f, g2 = sde_coefficients(sde, t, x)
    s, dts, lap = _laplacian_terms(score_fn, x, t, V)
    c = bcast(g2, x) * s - bcast(f, x) * x
    return fpe_combine(dts, lap, _jvp(score_fn, x, t, c), s, g2, f)


def div_pass(score_fn, x, t, sde, V: torch.Tensor, U: torch.Tensor | None = None):
    """(s, div_V s [B], u . r [B] or None) of the div form from one forward-mode pass.

    Without U the pass has the rows x, v_1..v_K (s and the divergence only); with U the
    projected rows (see the module docstring) give u . r as well."""
    K = V.shape[0]
    if U is None:
        rows = jet_pass(score_fn, x, t, V, time=False, layout=Layout(n1=K))
        return rows[0], hutchinson_reduce(V, rows[1:]), None
    u_row = K + 1
    layout = Layout(n1=K + 2, pairs=tuple((k, u_row) for k in range(1, K + 1)))
    rows = jet_pass(score_fn, x, t, torch.cat([V, U[None]]), time=True, layout=layout)
    s, jv, ju, dts, mixed = rows[0], rows[1:u_row], rows[u_row], rows[K + 2], rows[K + 3:]
    f, g2 = sde_coefficients(sde, t, x)
    c = bcast(g2, x) * s - bcast(f, x) * x

    def dot(a, b):
        return (a * b).flatten(1).sum(1)

    u_grad_div = (V * mixed).flatten(2).sum(2).mean(0)
    u_r = dot(U, dts) - 0.5 * g2 * u_grad_div - dot(c, ju) + f * dot(U, s)
    return s, hutchinson_reduce(V, jv), u_r


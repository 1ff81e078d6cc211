"""The jet passes of method="fused": the network run once on Jets (fpkern.jet).

The input x carries the rows x, v_1 .. v_K (probes), then as a pass needs them a time
tangent and the collapsed second order; t carries t, the t-components of the first-order
rows, and 0 elsewhere. One pass returns s, J v_k, d_t s and 1/K sum_k D^2_{v_k} s, every
linear layer running once over all rows (docs/MATH.md sections 2-3, no time stencil).

A score_fn that uses a torch function without a jet rule raises JetUnsupported, located
at the module that called it (fpkern.jet.locate); callers then use the generic torch.func
path (fpkern.ops.forward_mode), or raise it under strict=True.
"""

from __future__ import annotations

import torch

from fpkern.jet import Jet, JetUnsupported, Layout, locate

__all__ = ["Layout", "jet_pass", "laplacian_rows", "transport_rows", "jvp_row"]


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
    try:
        out = score_fn(Jet(x_rows, layout), Jet(t_rows, layout))
    except JetUnsupported as exc:
        raise locate(exc)
    if not isinstance(out, Jet):
        raise TypeError("score_fn returned a plain tensor for Jet inputs: its output does not "
                        "depend on x and t through torch functions")
    return out.rows


def laplacian_rows(score_fn, x, t, V):
    """s, d_t s and 1/K sum_k D^2_{v_k} s: one pass."""
    K = V.shape[0]
    layout = Layout(n1=K + 1, collapse=tuple(range(1, K + 1)))
    rows = jet_pass(score_fn, x, t, V, time=True, layout=layout)
    return rows[0], rows[K + 1], rows[-1]


def transport_rows(score_fn, x, t, V, c):
    """s, [J v_k]_k, d_t s - J c and 1/K sum_k D^2_{v_k} s: one pass, the transport row
    being the derivative along the (x, t)-tangent (-c, 1)."""
    K = V.shape[0]
    layout = Layout(n1=K + 1, collapse=tuple(range(1, K + 1)))
    t_tan = torch.zeros((K + 1,) + tuple(t.shape), dtype=t.dtype, device=t.device)
    t_tan[K] = 1
    rows = jet_pass(score_fn, x, t, torch.cat([V, -c[None]]), time=False, layout=layout,
                    t_tangents=t_tan)
    return rows[0], rows[1:K + 1], rows[K + 1], rows[-1]


def jvp_row(score_fn, x, t, c):
    """J c, the directional derivative of s along c in x: one two-row pass."""
    rows = jet_pass(score_fn, x, t, c[None], time=False, layout=Layout(n1=1))
    return rows[1]

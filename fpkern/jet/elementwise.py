"""The second-order jet rule of an elementwise function, on row stacks, and its VJP.

For y = phi(x) with d_j = phi^(j)(x0) at the value row (fpkern.jet.tensor for the rows):

    y0 = phi(x0), y_i = d1 x_i, y_(a,b) = d1 x_(a,b) + d2 x_a x_b,
    y_coll = d1 x_coll + d2 mean_k x_k^2

Written once here: the per-op rules (fpkern.jet.rules), the fused activation op's reference
(fpkern.jet.fused.jet_act) and the MLP op's row formulas (fpkern.jet.fused.mlp_rows) all
apply this one rule. Fused kernels describe a layout by its kernel spec
(Layout.kernel_spec); `spec_layout` turns one back into a Layout.
"""

from __future__ import annotations

import functools

import torch

from fpkern.jet.tensor import Layout

__all__ = ["cross_rows", "elementwise_rows", "elementwise_vjp", "spec_layout"]


def cross_rows(L: Layout, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The second-order products of two row stacks, one per second-order row:
    A_a B_b for each pair (a, b), then mean_k A_k B_k over the collapsed rows."""
    parts = []
    if L.pairs:
        a, b = zip(*L.pairs)
        parts.append(A[list(a)] * B[list(b)])
    if L.collapse:
        k = L.collapse_index
        parts.append((A[k] * B[k]).mean(0, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def elementwise_rows(rows: torch.Tensor, layout: Layout, phi: torch.Tensor, d1: torch.Tensor,
                     d2: torch.Tensor) -> torch.Tensor:
    """Rows of phi(x) from the rows of x [R, ...] and phi, phi', phi'' at the value row."""
    if not (layout.pairs or layout.collapse):
        return torch.cat([phi[None], d1 * rows[1:]])
    second = d1 * rows[layout.second] + d2 * cross_rows(layout, rows, rows)
    return torch.cat([phi[None], d1 * rows[layout.first], second])


@functools.lru_cache(maxsize=256)
def _layout(n1: int, pair_a: tuple, pair_b: tuple, c0: int, nc: int) -> Layout:
    return Layout(n1, tuple(zip(pair_a, pair_b)), tuple(range(c0, c0 + nc)))


def spec_layout(spec) -> Layout:
    """The Layout of a kernel spec (n1, pair_a, pair_b, c0, nc); cached, as fused ops'
    references call it on every use."""
    n1, pa, pb, c0, nc = spec
    return _layout(int(n1), tuple(int(a) for a in pa), tuple(int(b) for b in pb),
                   int(c0) if nc else 0, int(nc))


def elementwise_vjp(grad: torch.Tensor, rows: torch.Tensor, d1, d2, d3, spec) -> torch.Tensor:
    """The vector-Jacobian product of the rule for any phi, given phi', phi'', phi''' at the
    value row: the gradient of the input rows for output-row gradients `grad`."""
    n1, pa, pb, c0, nc = spec
    dx = torch.zeros_like(rows)
    first = slice(1, 1 + n1)
    g0 = grad[0] * d1 + (grad[first] * d2 * rows[first]).sum(0)
    dx[first] = grad[first] * d1
    for j, (a, b) in enumerate(zip(pa, pb)):
        r = 1 + n1 + j
        g0 = g0 + grad[r] * (d2 * rows[r] + d3 * rows[a] * rows[b])
        dx[a] += grad[r] * d2 * rows[b]
        dx[b] += grad[r] * d2 * rows[a]
        dx[r] = grad[r] * d1
    if nc:
        ks = slice(c0, c0 + nc)
        g0 = g0 + grad[-1] * (d2 * rows[-1] + d3 * rows[ks].pow(2).mean(0))
        dx[ks] += 2 * grad[-1] * d2 * rows[ks] / nc
        dx[-1] = grad[-1] * d1
    dx[0] = g0
    return dx

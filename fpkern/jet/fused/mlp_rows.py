"""The MLP of fpkern.models.mlp layer by layer on row stacks: its parameter type and the
row formulas that the fused op's reference (fpkern.jet.fused.mlp_jet) and its CPU
implementation (fpkern.jet.fused.mlp_jet_cpu) share.

Rows follow fpkern.jet.tensor and spec is Layout.kernel_spec, (n1, pair_a, pair_b, c0, nc).
Linear layers act on every row (bias on the value row only); silu, sin and cos apply the
elementwise jet rule (fpkern.jet.elementwise).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fpkern.jet.elementwise import elementwise_rows, elementwise_vjp, spec_layout

__all__ = ["MLPParams", "linear_rows", "silu_rows", "fourier_rows", "fourier_rows_vjp"]


class MLPParams(NamedTuple):
    """The tensors of an MLP, by role. hidden_* and proj_* hold one entry per block
    (a tuple, or a stacked [depth - 1, ...] tensor)."""

    fourier: torch.Tensor      # [E] Gaussian Fourier frequencies (fixed)
    temb_w: torch.Tensor       # [width, 2E]
    temb_b: torch.Tensor       # [width]
    in_w: torch.Tensor         # [width, dim]
    in_b: torch.Tensor         # [width]
    hidden_w: tuple            # depth - 1 x [width, width]
    hidden_b: tuple            # depth - 1 x [width]
    proj_w: tuple              # depth - 1 x [width, width]
    proj_b: tuple              # depth - 1 x [width]
    out_w: torch.Tensor        # [dim, width]
    out_b: torch.Tensor        # [dim]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        out = []
        for p in self:
            out.extend(p if isinstance(p, (tuple, list)) else (p,))
        return tuple(out)


def linear_rows(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of Linear(w, b): w on every row, b on the value row."""
    out = F.linear(rows, w)
    return torch.cat([(out[0] + b)[None], out[1:]])


def silu_rows(rows: torch.Tensor, spec) -> torch.Tensor:
    """Rows of silu(h) from the rows of h."""
    h = rows[0]
    s = torch.sigmoid(h)
    return elementwise_rows(rows, spec_layout(spec), h * s, s * (1 + h * (1 - s)),
                            s * (1 - s) * (2 + h * (1 - 2 * s)))


def _projection(t_rows: torch.Tensor, fourier: torch.Tensor):
    """Rows of P = 2 pi t w and sin, cos of its value row."""
    proj = t_rows[..., None] * fourier * (2 * math.pi)
    return proj, torch.sin(proj[0]), torch.cos(proj[0])


def fourier_rows(t_rows: torch.Tensor, fourier: torch.Tensor, spec) -> torch.Tensor:
    """Rows [R, B, 2E] of the Gaussian Fourier features [sin(2 pi t w), cos(2 pi t w)]."""
    proj, sin, cos = _projection(t_rows, fourier)
    layout = spec_layout(spec)
    return torch.cat([elementwise_rows(proj, layout, sin, cos, -sin),
                      elementwise_rows(proj, layout, cos, -sin, -cos)], dim=-1)


def fourier_rows_vjp(d_feats: torch.Tensor, t_rows: torch.Tensor, fourier: torch.Tensor, spec):
    """(d t_rows, d fourier) for gradients `d_feats` of fourier_rows: the jet rules of sin
    and cos at the argument rows P = 2 pi t w, reversed."""
    E = fourier.shape[0]
    proj, sin, cos = _projection(t_rows, fourier)
    d_p = (elementwise_vjp(d_feats[..., :E], proj, cos, -sin, -cos, spec)
           + elementwise_vjp(d_feats[..., E:], proj, -sin, -cos, sin, spec))
    d_t = (d_p @ fourier) * (2 * math.pi)
    d_w = torch.einsum("rbe,rb->e", d_p, t_rows) * (2 * math.pi)
    return d_t, d_w

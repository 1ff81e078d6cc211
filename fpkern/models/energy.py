"""An energy MLP for vector data: E(x, t), one value per sample, for fpkern.models.EnergyScore.

    E(x, t) = quadratic / 2 |x|^2 + head(h(x, t)),

h as in fpkern.models.mlp (Gaussian Fourier features of t, a dense time embedding added to
every block) and head a dense layer to one value. With the head at zero the density
exp(-E) is N(0, I / quadratic): the VP prior at t = T for quadratic = 1, so training starts
from the right density there. Wrapped as ``EnergyScore(EnergyMLP(D), sde)`` its score is
-grad_x E; ``fpkern.ops.log_density_fpe`` evaluates its log-density FPE in one jet pass
(every layer is a plain torch function with a jet rule).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fpkern.models import layers as L
from fpkern.models.mlp import fourier_features

__all__ = ["EnergyMLP"]


class EnergyMLP(nn.Module):
    """Energy network ``forward(x [B, dim], t [B]) -> [B]`` (module docstring)."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, *, act: str = "swish",
                 embed_dim: int = 64, fourier_scale: float = 16.0, quadratic: float = 1.0):
        super().__init__()
        if int(dim) < 1 or int(width) < 1 or int(depth) < 1:
            raise ValueError(f"EnergyMLP needs dim, width, depth >= 1, got {dim}, {width}, {depth}")
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even, got {embed_dim}")
        if quadratic < 0:
            raise ValueError(f"quadratic must be >= 0, got {quadratic}")
        self.dim, self.quadratic = int(dim), float(quadratic)
        self.input_shape = (self.dim,)
        self.act = L.get_act(act)
        self.embed = L.GaussianFourierProjection(embed_dim // 2, scale=fourier_scale)
        self.temb = L.dense(embed_dim, width)
        self.inp = L.dense(dim, width)
        self.hidden = nn.ModuleList(L.dense(width, width) for _ in range(depth - 1))
        self.temb_proj = nn.ModuleList(L.dense(width, width) for _ in range(depth - 1))
        self.head = L.dense(width, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.act(self.temb(fourier_features(t, self.embed.W)))
        h = self.inp(x) + temb
        for block, proj in zip(self.hidden, self.temb_proj):
            h = block(self.act(h)) + proj(temb)
        e = self.head(self.act(h)).squeeze(-1)
        return e + 0.5 * self.quadratic * x.square().sum(-1)

"""An energy MLP for vector data: E(x, t), one value per sample, for fpkern.models.EnergyScore.

    E(x, t) = quadratic / 2 |x|^2 + head(h(x, t)),

h as in fpkern.models.mlp (its TimeMLP layers: Gaussian Fourier features of t, a dense time embedding added to
every block) and head a dense layer to one value. With the head at zero the density
exp(-E) is N(0, I / quadratic): the VP prior at t = T for quadratic = 1, so training starts
from the right density there. Wrapped as ``EnergyScore(EnergyMLP(D), sde)`` its score is
-grad_x E; ``fpkern.ops.log_density_fpe`` evaluates its log-density FPE in one jet pass
(every layer is a plain torch function with a jet rule).
"""

from __future__ import annotations

import torch

from fpkern.models import layers as L
from fpkern.models.mlp import TimeMLP, fourier_features

__all__ = ["EnergyMLP"]


class EnergyMLP(TimeMLP):
    """Energy network ``forward(x [B, dim], t [B]) -> [B]`` (module docstring)."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, *, act: str = "swish",
                 embed_dim: int = 64, fourier_scale: float = 16.0, quadratic: float = 1.0):
        super().__init__(dim, width, depth, act=act, embed_dim=embed_dim,
                         fourier_scale=fourier_scale)
        if quadratic < 0:
            raise ValueError(f"quadratic must be >= 0, got {quadratic}")
        self.quadratic = float(quadratic)
        self.head = L.dense(width, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.act(self.temb(fourier_features(t, self.embed.W)))
        h = self.inp(x) + temb
        for block, proj in zip(self.hidden, self.temb_proj):
            h = block(self.act(h)) + proj(temb)
        e = self.head(self.act(h)).squeeze(-1)
        return e + 0.5 * self.quadratic * x.square().sum(-1)

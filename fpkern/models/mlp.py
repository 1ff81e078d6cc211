"""A small MLP noise-prediction network for vector data (toy problems, the oracle tests).

Convention (handled by ``ScoreFn``): ``net(x, t)`` takes the diffusion time t in [0, T]
itself and predicts the noise z of x_t = alpha(t) x_0 + sigma(t) z, so the score is
``-net(x, t) / sigma(t)`` for every SDE. Predicting a unit-scale quantity keeps the
output well conditioned from sigma = 0.01 to sigma = 50.

Architecture: Gaussian Fourier features of t -> dense -> act gives a time embedding of
width ``width``; h = Linear(x) + temb; then ``depth - 1`` blocks h = Linear(act(h)) (each
with its own projection of the embedding added); output Linear(act(h)) -> dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fpkern.models import layers as L

__all__ = ["MLP"]


class MLP(nn.Module):
    """Noise-prediction MLP: ``forward(x [B, dim], t [B]) -> [B, dim]``."""

    output_type = "noise"     # ScoreFn: score = -out / sigma(t), labels = t

    def __init__(self, dim: int, width: int = 256, depth: int = 3, *, act: str = "swish",
                 embed_dim: int = 64, fourier_scale: float = 16.0):
        super().__init__()
        if int(dim) < 1 or int(width) < 1 or int(depth) < 1:
            raise ValueError(f"MLP needs dim, width, depth >= 1, got {dim}, {width}, {depth}")
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even, got {embed_dim}")
        self.dim, self.width, self.depth = int(dim), int(width), int(depth)
        self.input_shape = (self.dim,)
        self.act = L.get_act(act)
        self.embed = L.GaussianFourierProjection(embed_dim // 2, scale=fourier_scale)
        self.temb = L.dense(embed_dim, width)
        self.inp = L.dense(dim, width)
        self.hidden = nn.ModuleList(L.dense(width, width) for _ in range(depth - 1))
        self.temb_proj = nn.ModuleList(L.dense(width, width) for _ in range(depth - 1))
        self.out = L.dense(width, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.act(self.temb(self.embed(t)))
        h = self.inp(x) + temb
        for layer, proj in zip(self.hidden, self.temb_proj):
            h = layer(self.act(h)) + proj(temb)
        return self.out(self.act(h))

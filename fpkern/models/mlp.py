"""A small MLP noise-prediction network for vector data (toy problems, the oracle tests).

Convention (handled by ``ScoreFn``): ``net(x, t)`` takes the diffusion time t in [0, T]
itself and predicts the noise z of x_t = alpha(t) x_0 + sigma(t) z, so the score is
``-net(x, t) / sigma(t)`` for every SDE. Predicting a unit-scale quantity keeps the
output well conditioned from sigma = 0.01 to sigma = 50.

Architecture: Gaussian Fourier features of t -> dense -> act gives a time embedding of
width ``width``; h = Linear(x) + temb; then ``depth - 1`` blocks h = Linear(act(h)) (each
with its own projection of the embedding added); output Linear(act(h)) -> dim.

The computation is the module-level function ``mlp_forward(x, t, params, act)``, which
tensor subclasses may override through ``__torch_function__``. This module registers its
jet rule (fpkern.jet.register_rule): on Jets the whole network runs as one fused op where a
kernel exists (fpkern.jet.fused.mlp_jet), else as the composite network.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from fpkern.jet import register_rule
from fpkern.jet.fused.mlp_jet import mlp_jet_rule
from fpkern.jet.fused.mlp_rows import MLPParams
from fpkern.models import layers as L

__all__ = ["MLP", "TimeMLP", "MLPParams", "mlp_forward", "mlp_composite"]


def fourier_features(t: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[sin(2 pi t W), cos(2 pi t W)]: layers.GaussianFourierProjection, op for op."""
    proj = t[:, None] * W[None, :] * (2 * math.pi)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def mlp_composite(x: torch.Tensor, t: torch.Tensor, p: MLPParams, act) -> torch.Tensor:
    """The network as a composition of torch functions (any tensor type, any dtype)."""
    temb = act(F.linear(fourier_features(t, p.fourier), p.temb_w, p.temb_b))
    h = F.linear(x, p.in_w, p.in_b) + temb
    for w, b, pw, pb in zip(p.hidden_w, p.hidden_b, p.proj_w, p.proj_b):
        h = F.linear(act(h), w, b) + F.linear(temb, pw, pb)
    return F.linear(act(h), p.out_w, p.out_b)


def mlp_forward(x: torch.Tensor, t: torch.Tensor, params: MLPParams, act) -> torch.Tensor:
    """MLP output for x [B, dim], t [B]; overridable with ``__torch_function__``
    (the jet rule registered below)."""
    relevant = (x, t) + params.tensors()
    if has_torch_function(relevant):
        return handle_torch_function(mlp_forward, relevant, x, t, params, act)
    return mlp_composite(x, t, params, act)


register_rule(mlp_forward, mlp_jet_rule(mlp_composite))


class TimeMLP(nn.Module):
    """The layers an MLP for vector data shares (module docstring): the Fourier time
    embedding, its dense layer, the input layer and ``depth - 1`` blocks, each with its own
    projection of the embedding. ``MLP`` adds the noise head, ``fpkern.models.energy``'s
    ``EnergyMLP`` an energy head."""

    def __init__(self, dim: int, width: int = 256, depth: int = 3, *, act: str = "swish",
                 embed_dim: int = 64, fourier_scale: float = 16.0):
        super().__init__()
        if int(dim) < 1 or int(width) < 1 or int(depth) < 1:
            raise ValueError(f"{type(self).__name__} needs dim, width, depth >= 1, got {dim}, "
                             f"{width}, {depth}")
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


class MLP(TimeMLP):
    """Noise-prediction MLP: ``forward(x [B, dim], t [B]) -> [B, dim]``."""

    output_type = "noise"     # ScoreFn: score = -out / sigma(t), labels = t

    def __init__(self, dim: int, width: int = 256, depth: int = 3, *, act: str = "swish",
                 embed_dim: int = 64, fourier_scale: float = 16.0):
        super().__init__(dim, width, depth, act=act, embed_dim=embed_dim,
                         fourier_scale=fourier_scale)
        self.out = L.dense(width, dim)

    def mlp_params(self) -> MLPParams:
        """The current parameter tensors by role (the modules' own tensors, not copies)."""
        return MLPParams(
            self.embed.W, self.temb.weight, self.temb.bias, self.inp.weight, self.inp.bias,
            tuple(m.weight for m in self.hidden), tuple(m.bias for m in self.hidden),
            tuple(m.weight for m in self.temb_proj), tuple(m.bias for m in self.temb_proj),
            self.out.weight, self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return mlp_forward(x, t, self.mlp_params(), self.act)

"""Isotropic Gaussian mixtures: the exact oracle of docs/MATH.md section 6.

Data sum_k w_k N(mu_k, s_k^2 I) stays a Gaussian mixture under a linear SDE,

    q_t = sum_k w_k N(alpha(t) mu_k, (alpha(t)^2 s_k^2 + sigma(t)^2) I),

so its score and log-density are closed-form at every t, and the score satisfies the
score FPE exactly. Inputs may be vectors [B, D] or any [B, ...] whose trailing size is D.
"""

from __future__ import annotations

import math

import torch

from fpkern._checks import check_batch, check_floating
from fpkern.sde import LinearSDE

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Mixture sum_k weights[k] N(means[k], stds[k]^2 I) in D dimensions."""

    def __init__(self, weights, means, stds):
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.to(torch.get_default_dtype())
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K = means.shape[0]
        weights = torch.as_tensor(weights, dtype=means.dtype).reshape(-1)
        stds = torch.as_tensor(stds, dtype=means.dtype).reshape(-1).expand(K).clone()
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape [K]=[{K}], got {tuple(weights.shape)}")
        if bool((weights <= 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be positive and finite")
        if bool((stds < 0).any()) or not bool(torch.isfinite(stds).all()):
            raise ValueError("stds must be non-negative and finite")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        return GaussianMixture(self.weights.to(device=device, dtype=dtype),
                               self.means.to(device=device, dtype=dtype),
                               self.stds.to(device=device, dtype=dtype))

    @classmethod
    def random(cls, num_components: int, dim: int, *, spread: float = 3.0,
               std_range: tuple[float, float] = (0.2, 0.6), generator=None,
               dtype=torch.float64) -> "GaussianMixture":
        """A random mixture: means ~ N(0, spread^2 I), stds ~ U[std_range], weights ~ U[0.5, 1]."""
        g = generator
        means = spread * torch.randn(num_components, dim, generator=g, dtype=dtype)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(num_components, generator=g, dtype=dtype)
        weights = 0.5 + 0.5 * torch.rand(num_components, generator=g, dtype=dtype)
        return cls(weights, means, stds)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of the clean data, shape [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * z

    # ---- the perturbed marginal q_t --------------------------------------------
    def _marginal(self, x: torch.Tensor, t: torch.Tensor | None, sde: LinearSDE | None):
        """Flattened x [B, D], component means [B, K, D] and variances [B, K] of q_t."""
        check_floating(x, "x")
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape [B, ...] with {self.dim} features per sample, "
                             f"got shape {tuple(x.shape)}")
        xf = x.reshape(x.shape[0], self.dim)
        means = self.means.to(x)
        var0 = self.stds.to(x) ** 2
        if sde is None:
            if t is not None:
                raise ValueError("a time t needs an sde to define the perturbed density")
            return xf, means.expand(x.shape[0], -1, -1), var0.expand(x.shape[0], -1)
        if t is None:
            raise ValueError("sde given without a time t")
        check_batch(x, t)
        alpha = sde.alpha(t).to(x)[:, None]
        sigma2 = sde.sigma2(t).to(x)[:, None]
        return xf, alpha[..., None] * means, alpha ** 2 * var0 + sigma2

    def _component_logp(self, xf, means, var):
        """log w_k + log N(x; mean_k, var_k I), shape [B, K]."""
        sq = (xf[:, None, :] - means).pow(2).sum(-1)
        return (torch.log(self.weights.to(xf)) - 0.5 * self.dim * torch.log(2 * math.pi * var)
                - 0.5 * sq / var)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | None = None,
                 sde: LinearSDE | None = None) -> torch.Tensor:
        """log q_t(x) per sample, shape [B]; the clean density when t and sde are None."""
        xf, means, var = self._marginal(x, t, sde)
        return torch.logsumexp(self._component_logp(xf, means, var), dim=1)

    def score(self, x: torch.Tensor, t: torch.Tensor | None = None,
              sde: LinearSDE | None = None) -> torch.Tensor:
        """grad_x log q_t(x), shape of x."""
        xf, means, var = self._marginal(x, t, sde)
        resp = torch.softmax(self._component_logp(xf, means, var), dim=1)  # [B, K]
        comp = -(xf[:, None, :] - means) / var[..., None]                  # [B, K, D]
        return (resp[..., None] * comp).sum(1).reshape(x.shape)

    def score_fn(self, sde: LinearSDE):
        """The exact score of q_t as a callable score_fn(x, t)."""
        return lambda x, t: self.score(x, t, sde)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"

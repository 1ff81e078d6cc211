"""Exact log-likelihoods through the probability-flow ODE (docs/MATH.md section 7).

    log_likelihood(score_fn, sde, x, *, probes=1, probe_dist="rademacher", rtol=1e-5,
                   atol=1e-5, eps=1e-5, generator=None)      -> LikelihoodResult
    bits_per_dim(score_fn, sde, images_uint8, *, data_range=(-1, 1), ...) -> BPDResult
    nll_to_bpd(logp, dim, data_range=(-1, 1))                 -> bits/dim for 8-bit data

The state (x, delta) is integrated from t = eps to T with the RK45 of fpkern.sampling:

    dx/dt     = f x - 1/2 g^2 s(x, t)                          (probability-flow ODE)
    ddelta/dt = div_x(f x - 1/2 g^2 s) = D f - 1/2 g^2 div_x s

and log p_eps(x) = prior_logp(x_T) + delta(T). div_x s is Hutchinson's estimator
(fpkern.ops.hutchinson_divergence) with the probes drawn once and held fixed along the solve
(probes: an int K, or a tensor [K, *x.shape]); probes=None or "exact" uses the exact
divergence (fpkern.ops.exact.divergence, D <= fpkern.ops.exact.MAX_DIM). The error
control acts on x and delta together; the score is evaluated in x's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fpkern._checks import bcast

from fpkern.ops import exact as _exact
from fpkern.ops import hutchinson_divergence
from fpkern.ops.probes import resolve_probes
from fpkern.sampling import odeint_rk45
from fpkern.sde import LinearSDE

__all__ = ["LikelihoodResult", "BPDResult", "log_likelihood", "bits_per_dim", "nll_to_bpd",
           "dequantize_to_range"]


class LikelihoodResult(NamedTuple):
    """logp = prior_logp + delta_logp, nats per sample [B]; z = x_T; nfe = ODE RHS calls."""

    logp: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    z: torch.Tensor
    nfe: int


class BPDResult(NamedTuple):
    """bpd per image [B] (Score SDE's convention), the underlying likelihood result."""

    bpd: torch.Tensor
    likelihood: LikelihoodResult



def log_likelihood(score_fn, sde: LinearSDE, x: torch.Tensor, *, probes=1,
                   probe_dist: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   eps: float = 1e-5, generator: torch.Generator | None = None) -> LikelihoodResult:
    """log p(x) in nats per sample by the instantaneous change of variables (docs/MATH.md 7).

    x: [B, ...] data in the model's range, treated as a sample at time eps.
    probes: int K (drawn from probe_dist with generator, once per solve), a tensor
    [K, *x.shape], or None / "exact" for the exact divergence.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor [B, ...], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps!r}")
    use_exact = probes is None or (isinstance(probes, str) and probes == "exact")
    if isinstance(probes, str) and not use_exact:
        raise ValueError(f"probes must be an int, a tensor, None or 'exact', got {probes!r}")
    V = None if use_exact else resolve_probes(probes, x, probe_dist, generator)
    B, D = x.shape[0], x[0].numel()
    shape = tuple(x.shape)

    def rhs(t: float, y: torch.Tensor) -> torch.Tensor:
        xt = y[:, :D].reshape(shape)
        tv = torch.full((B,), t, dtype=x.dtype, device=x.device)
        f, g2 = sde.f(tv).to(x.dtype), sde.g2(tv).to(x.dtype)
        s = score_fn(xt, tv)
        if use_exact:
            div_s = _exact.divergence(score_fn, xt, tv)
        else:
            div_s = hutchinson_divergence(score_fn, xt, tv, probes=V)
        dx = bcast(f, xt) * xt - 0.5 * bcast(g2, xt) * s
        ddelta = D * f - 0.5 * g2 * div_s
        return torch.cat([dx.reshape(B, D), ddelta[:, None]], dim=1)

    y0 = torch.cat([x.detach().reshape(B, D), x.new_zeros(B, 1)], dim=1)
    with torch.no_grad():
        res = odeint_rk45(rhs, y0, float(eps), float(sde.T), rtol=rtol, atol=atol)
        z = res.y[:, :D].reshape(shape)
        delta = res.y[:, D]
        prior = sde.prior_logp(z)
    return LikelihoodResult(prior + delta, prior, delta, z, res.nfe)


def nll_to_bpd(logp: torch.Tensor, dim: int, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Bits/dim of 8-bit data from log p of the dequantised data in the model's range.

    bpd = -logp / (D ln 2) + 8 - log2(hi - lo)   (docs/MATH.md 7; Score SDE's offset 7 for [-1, 1],
    8 for [0, 1]): the density of (k + u) / 256 scaled to [lo, hi] back to the 0..256 grid.
    """
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range!r}")
    return -logp / (dim * math.log(2)) + 8 - math.log2(hi - lo)


def dequantize_to_range(images: torch.Tensor, *, data_range=(-1.0, 1.0),
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 k -> (k + u) / 256 with u ~ U[0, 1), then affinely to [lo, hi]."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    lo, hi = data_range
    u = torch.rand(images.shape, generator=generator, dtype=dtype, device=images.device)
    return lo + (hi - lo) * (images.to(dtype) + u) / 256


def bits_per_dim(score_fn, sde: LinearSDE, images: torch.Tensor, *,
                 data_range: tuple[float, float] = (-1.0, 1.0), probes=1,
                 probe_dist: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                 eps: float = 1e-5, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> BPDResult:
    """Bits/dim of uint8 images [B, C, H, W]: uniform dequantisation (one draw from
    generator), scaling to data_range (Score SDE: (-1, 1) for centered data), the
    probability-flow likelihood, then nll_to_bpd."""
    x = dequantize_to_range(images, data_range=data_range, generator=generator, dtype=dtype)
    ll = log_likelihood(score_fn, sde, x, probes=probes, probe_dist=probe_dist, rtol=rtol,
                        atol=atol, eps=eps, generator=generator)
    return BPDResult(nll_to_bpd(ll.logp, x[0].numel(), data_range), ll)

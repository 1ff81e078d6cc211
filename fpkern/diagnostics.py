"""Diagnostics of a score model: FPE residual profile, conservativity, ODE-SDE gap.

    residual_profile(score_fn, sde, x0, ts, *, forms=("div", "laplacian"), method="exact", ...)
        -> ResidualProfile(t, abs, rel)             abs/rel: {form: Tensor[len(ts)]}
    conservativity(score_fn, x, t, *, probes=8, ...)            -> Tensor [B]
    conservativity_profile(score_fn, sde, x0, ts, *, ...)       -> Tensor [len(ts)]
    mmd(x, y, *, bandwidth=None)                                -> unbiased MMD^2 (RBF)
    sliced_wasserstein(x, y, *, projections=256, p=2, ...)      -> SW_p
    ode_sde_gap(score_fn, sde, n, *, ...)                       -> GapResult

The PNG writers for these (plot_residual_profile, plot_profiles) live in fpkern.plots.

Definitions (at perturbed points x_t = alpha(t) x0 + sigma(t) z, the 'pert' convention of
docs/MATH.md 4, one z per data point from the generator):

- residual profile, absolute: E_b |r(x_t, t)|^2 (sum over the D features, mean over the
  batch) for r of each form (docs/MATH.md 2, fpkern.ops.fpe_residual); relative:
  E_b |r|^2 / E_b |d_t s|^2, the residual against the size of the time derivative it should
  balance (0 for the true score, about 1 or more when the equation is not satisfied at all).
- conservativity: E_v |J v - J^T v|^2 / E_v |J v|^2 per sample (J = d s / d x; J v by
  torch.func.jvp, J^T v by torch.func.vjp; the same probes in numerator and denominator).
  0 iff J is symmetric along the probes; the profile is the ratio of batch means.
- ODE-SDE gap (Deveney et al. 2023): a distance between probability-flow ODE samples and
  reverse-SDE samples started from the same prior draws.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from fpkern._checks import bcast
from torch.func import jvp, vjp

from fpkern.ops import fpe_residual
from fpkern.ops.exact import score_and_time_derivative
from fpkern.ops.probes import resolve_probes
from fpkern.sampling import sample
from fpkern.sde import LinearSDE

__all__ = ["ResidualProfile", "GapResult", "residual_profile", "conservativity",
           "conservativity_profile", "mmd", "sliced_wasserstein", "ode_sde_gap",
           "perturb", "DISTANCES"]


class ResidualProfile(NamedTuple):
    """t [T] float64; abs and rel map a form name to a float64 tensor [T]."""

    t: torch.Tensor
    abs: dict
    rel: dict


class GapResult(NamedTuple):
    distance: float
    ode_samples: torch.Tensor
    sde_samples: torch.Tensor



def _times(ts, sde: LinearSDE) -> torch.Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    if ts.numel() == 0:
        raise ValueError("ts must hold at least one time")
    sde.check_time(ts, name="ts")
    return ts


def perturb(sde: LinearSDE, x0: torch.Tensor, t: float, *,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t_vec): x_t = alpha(t) x0 + sigma(t) z, with t_vec = t in x0's dtype, [B]."""
    tv = torch.full((x0.shape[0],), float(t), dtype=x0.dtype, device=x0.device)
    mean, std = sde.marginal_prob(x0, tv)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return mean + bcast(std, x0) * z, tv


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.detach().flatten(1).pow(2).sum(1).to(torch.float64)


def residual_profile(score_fn, sde: LinearSDE, x0: torch.Tensor, ts, *,
                     forms: Sequence[str] = ("div", "laplacian"), method: str = "exact",
                     probes=1, probe_dist: str = "rademacher",
                     generator: torch.Generator | None = None) -> ResidualProfile:
    """Mean squared FPE residual (both forms by default) and its relative form at each t.

    x0: clean data [B, ...]; ts: times in [0, T]; method: a key of fpkern.ops.METHODS.
    """
    ts = _times(ts, sde)
    out_abs = {f: torch.empty(len(ts), dtype=torch.float64) for f in forms}
    out_rel = {f: torch.empty(len(ts), dtype=torch.float64) for f in forms}
    for i, t in enumerate(ts.tolist()):
        x, tv = perturb(sde, x0, t, generator=generator)
        _, dts = score_and_time_derivative(score_fn, x, tv)
        ref = _sq(dts).mean()
        for form in forms:
            r = fpe_residual(score_fn, x, tv, sde, form=form, method=method, probes=probes,
                             probe_dist=probe_dist, generator=generator)
            out_abs[form][i] = _sq(r).mean()
            out_rel[form][i] = out_abs[form][i] / ref
    return ResidualProfile(ts, out_abs, out_rel)


def conservativity(score_fn, x: torch.Tensor, t: torch.Tensor, *, probes=8,
                   probe_dist: str = "rademacher",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """E_v |J v - J^T v|^2 / E_v |J v|^2 per sample, shape [B] (0 for a gradient field)."""
    V = resolve_probes(probes, x, probe_dist, generator)
    x = x.detach()
    fn = lambda y: score_fn(y, t)  # noqa: E731
    num = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    den = torch.zeros_like(num)
    _, pullback = vjp(fn, x)
    for v in V:
        _, jv = jvp(fn, (x,), (v,))
        (jtv,) = pullback(v)       # samples are independent: per-sample J^T v
        num += _sq(jv - jtv)
        den += _sq(jv)
    return num / den


def conservativity_profile(score_fn, sde: LinearSDE, x0: torch.Tensor, ts, *, probes=8,
                           probe_dist: str = "rademacher",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """At each t: sum_b E_v|Jv - J^T v|^2 / sum_b E_v|Jv|^2 at x_t (float64 [len(ts)])."""
    ts = _times(ts, sde)
    out = torch.empty(len(ts), dtype=torch.float64)
    for i, t in enumerate(ts.tolist()):
        x, tv = perturb(sde, x0, t, generator=generator)
        V = resolve_probes(probes, x, probe_dist, generator)
        fn = lambda y: score_fn(y, tv)  # noqa: E731
        _, pullback = vjp(fn, x)
        num = den = 0.0
        for v in V:
            _, jv = jvp(fn, (x,), (v,))
            num = num + _sq(jv - pullback(v)[0]).sum()
            den = den + _sq(jv).sum()
        out[i] = num / den
    return out


# ---- distances between sample sets -------------------------------------------------------
def _pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y).pow(2)


def mmd(x: torch.Tensor, y: torch.Tensor, *, bandwidth: float | None = None,
        unbiased: bool = True) -> float:
    """Squared MMD with the RBF kernel exp(-|a - b|^2 / (2 h^2)) between samples [N, D], [M, D].

    bandwidth h: default the median pairwise distance of the pooled sample (its first 500
    points of each set). unbiased=True:
    the U-statistic (diagonal terms dropped; 0 in expectation when x and y share a law, so
    it can be slightly negative); otherwise the V-statistic (>= 0).
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1] or x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"x and y must be [N, D] and [M, D] with N, M >= 2, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if bandwidth is None:        # median heuristic on at most 500 points of each set
        z = torch.cat([x[:500], y[:500]])
        d2 = _pairs(z, z)
        bandwidth = float(d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), 1)].median().sqrt())
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
    k = lambda a, b: torch.exp(-_pairs(a, b) / (2 * bandwidth ** 2))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        sxx, syy = kxx.mean(), kyy.mean()
    return float(sxx + syy - 2 * kxy.mean())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, p: int = 2,
                       generator: torch.Generator | None = None) -> float:
    """Sliced p-Wasserstein distance (mean over random unit directions of W_p^p, then the
    p-th root). Unequal sample sizes are compared through their quantiles on a common grid."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature size, got {tuple(x.shape)}, {tuple(y.shape)}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    dirs = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    if px.shape[0] != py.shape[0]:
        n = max(px.shape[0], py.shape[0])
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return float((px - py).abs().pow(p).mean().pow(1 / p))


DISTANCES = {"sliced_wasserstein": sliced_wasserstein, "mmd": mmd}


def ode_sde_gap(score_fn, sde: LinearSDE, n: int, *, dim: int = 2, distance: str = "sliced_wasserstein",
                sde_method: str = "euler_maruyama", steps: int = 500, eps: float = 1e-3,
                rtol: float = 1e-5, atol: float = 1e-5, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float64) -> GapResult:
    """Distance between n probability-flow ODE samples and n reverse-SDE samples (same x_T)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid names: {sorted(DISTANCES)}")
    x_T = sde.prior_sampling((n, dim), generator=generator, dtype=dtype)
    ode = sample(score_fn, sde, (n, dim), method="ode", x_T=x_T, eps=eps, rtol=rtol, atol=atol,
                 dtype=dtype).samples
    sde_s = sample(score_fn, sde, (n, dim), method=sde_method, x_T=x_T, steps=steps, eps=eps,
                   generator=generator, dtype=dtype).samples
    kw = {"generator": generator} if distance == "sliced_wasserstein" else {}
    return GapResult(DISTANCES[distance](ode, sde_s, **kw), ode, sde_s)

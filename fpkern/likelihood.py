"""Log-likelihoods: the probability-flow ODE (docs/MATH.md 7) and the density formula (11).

    log_likelihood(score_fn, sde, x, *, probes=1, probe_dist="rademacher", rtol=1e-5,
                   atol=1e-5, eps=1e-5, generator=None)      -> LikelihoodResult
    bits_per_dim(score_fn, sde, images_uint8, *, data_range=(-1, 1), ...) -> BPDResult
    nll_to_bpd(logp, dim, data_range=(-1, 1))                 -> bits/dim for 8-bit data
    density_log_likelihood(score_fn, sde, x, *, nodes=32, samples=8, rule="stratified",
                           variable="t", antithetic=True, ref_var=1.0, eps=1e-5,
                           generator=None)                    -> DensityResult
    density_bits_per_dim(score_fn, sde, images_uint8, *, data_range=(-1, 1), ...)
                                                              -> DensityBPDResult

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

from fpkern._checks import bcast, check_choice

from fpkern.ops import exact as _exact
from fpkern.ops import hutchinson_divergence
from fpkern.ops.probes import resolve_probes
from fpkern.sampling import _log_snr, _time_of_log_snr, odeint_rk45
from fpkern.sde import LinearSDE

__all__ = ["LikelihoodResult", "BPDResult", "log_likelihood", "bits_per_dim", "nll_to_bpd",
           "dequantize_to_range", "DensityResult", "DensityBPDResult", "density_log_likelihood",
           "density_bits_per_dim", "DENSITY_RULES", "DENSITY_VARIABLES"]


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


# ---- the density formula (docs/MATH.md 11) -------------------------------------------------
DENSITY_RULES = ("stratified", "gauss_legendre", "midpoint")
DENSITY_VARIABLES = ("t", "logsnr")


class DensityResult(NamedTuple):
    """logp = terminal - integral, nats per sample [B] (docs/MATH.md 11).

    stderr [B]: the standard error of logp's Monte-Carlo average (with rule "stratified" it
    covers the quadrature too; the prior mismatch is in neither); terminal [B]:
    E log prior(x_T) + D log a(T) given x_eps = x, in closed form; nfe: score evaluations per
    sample (nodes x samples, twice that when antithetic).
    """

    logp: torch.Tensor
    stderr: torch.Tensor
    terminal: torch.Tensor
    nfe: int


class DensityBPDResult(NamedTuple):
    """bpd per image [B], its standard error [B], the likelihood result."""

    bpd: torch.Tensor
    stderr: torch.Tensor
    likelihood: DensityResult


class _Path(NamedTuple):
    """The forward process from x_eps at given values of the integration variable, float64:
    times t, scales a = alpha(t) / alpha(eps), noise levels nu in the coordinates
    y = x_t / a (x_t = a (x + sqrt(nu) z)), and d nu / d variable (docs/MATH.md 11.3)."""

    t: torch.Tensor
    a: torch.Tensor
    nu: torch.Tensor
    dnu: torch.Tensor


def _span(sde: LinearSDE, eps: float, variable: str) -> tuple[float, float]:
    """The integration variable's range: (eps, T) in t, (lambda(T), lambda(eps)) in
    lambda = log(alpha / sigma)."""
    if variable == "t":
        return eps, sde.T
    lam = _log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64))
    return float(lam[0]), float(lam[1])


def _path(sde: LinearSDE, eps: float, v: torch.Tensor, variable: str) -> _Path:
    """_Path at values v (float64, any shape) of the variable: nu = alpha(eps)^2
    (e^{-2 lambda(t)} - e^{-2 lambda(eps)}), d nu / dt = g^2 / a^2, |d nu / d lambda| =
    2 alpha(eps)^2 e^{-2 lambda}."""
    e = torch.tensor([eps], dtype=torch.float64)
    log_a0, lam0 = sde.log_alpha(e), _log_snr(sde, e)
    t = v if variable == "t" else _time_of_log_snr(sde, v, eps, sde.T)
    lam = _log_snr(sde, t)
    a = torch.exp(sde.log_alpha(t) - log_a0)
    a02 = torch.exp(2 * log_a0)
    nu = a02 * torch.exp(-2 * lam) * -torch.expm1(2 * (lam - lam0))
    dnu = sde.g2(t) / a ** 2 if variable == "t" else 2 * a02 * torch.exp(-2 * lam)
    return _Path(t, a, nu, dnu)


def _unit_rule(nodes: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the fixed rules on (0, 1), float64. Both are open: no node at
    an end, where the integrand's Monte-Carlo form is 0/0 (nu = 0 at t = eps)."""
    if rule == "gauss_legendre":
        import numpy as np

        u, w = np.polynomial.legendre.leggauss(nodes)
        return torch.from_numpy((u + 1) / 2), torch.from_numpy(w / 2)
    u = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes
    return u, torch.full((nodes,), 1.0 / nodes, dtype=torch.float64)


def _node_points(sde, eps, variable, rule, nodes, i, shape,
                 generator) -> tuple[_Path, torch.Tensor]:
    """The path and the quadrature weight w (times d nu) of node i for draws of shape [M, B]:
    one point for a fixed rule, a uniform point of stratum i per draw for "stratified"."""
    lo, hi = _span(sde, eps, variable)
    if rule == "stratified":
        dev = generator.device if generator is not None else None
        u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64).cpu()
        v, wv = lo + (hi - lo) * (i + u) / nodes, (hi - lo) / nodes
    else:
        u, wu = _unit_rule(nodes, rule)
        v, wv = (lo + (hi - lo) * u[i]).reshape(1, 1), (hi - lo) * float(wu[i])
    p = _path(sde, eps, v, variable)
    return p, wv * p.dnu


def _values(score_fn, x: torch.Tensor, p: _Path, z: torch.Tensor,
            ref_var: float | None) -> torch.Tensor:
    """The integrand's Monte-Carlo values h [M, B], float64, at the points p ([M, B] or
    [1, 1]) for draws z [M, B, ...] (docs/MATH.md 11.2): y = x + sqrt(nu) z, s_y = a s(a y, t),
    u = z / sqrt(nu); h = <s_y - r, s_y + r + 2u> / 2 with r = -y / (ref_var + nu) the
    reference's score, or |s_y + u|^2 / 2 - D / (2 nu) without a reference."""
    M, B, D = z.shape[0], x.shape[0], x[0].numel()
    t, a, nu = (bcast(c.expand(M, B), z).to(x.device) for c in p[:3])
    z = z.double()
    y = x.detach().double()[None] + nu.sqrt() * z
    xt = (a * y).to(x.dtype).reshape(M * B, *x.shape[1:])
    tv = t.reshape(M * B).to(x.dtype)
    s = a * score_fn(xt, tv).double().reshape(y.shape)
    u = z / nu.sqrt()
    if ref_var is None:
        return 0.5 * (s + u).flatten(2).pow(2).sum(-1) - D / (2 * nu.flatten(2)[..., 0])
    r = -y / (ref_var + nu)
    return 0.5 * ((s - r) * (s + r + 2 * u)).flatten(2).sum(-1)


def _reference_integral(x: torch.Tensor, nu_T: float, ref_var: float | None) -> torch.Tensor:
    """int_0^nu_T of the reference N(0, ref_var I)'s integrand in closed form (docs/MATH.md
    11.2), float64 [B]; 0 without a reference."""
    if ref_var is None:
        return x.new_zeros(x.shape[0], dtype=torch.float64)
    c, D = ref_var, x[0].numel()
    sq = x.detach().double().flatten(1).pow(2).sum(1)
    return sq * nu_T / (2 * c * (c + nu_T)) - 0.5 * D * (math.log1p(nu_T / c) + nu_T / (c + nu_T))


def _terminal(sde: LinearSDE, x: torch.Tensor, end: _Path) -> torch.Tensor:
    """E log prior(x_T) + D log a_T over x_T = a_T (x + sqrt(nu_T) z), in closed form,
    float64 [B] (docs/MATH.md 11.4)."""
    D = x[0].numel()
    a_T, nu_T = float(end.a), float(end.nu)
    mean = a_T * x.detach().double()
    return (sde.prior_logp(mean) - D * a_T ** 2 * nu_T / (2 * sde.prior_std ** 2)
            + D * math.log(a_T))


def _draws(x: torch.Tensor, samples: int, generator) -> torch.Tensor:
    """samples standard normal draws like x, [samples, *x.shape], float64 whatever x's dtype
    (the same seed gives the same draws for a float32 and a float64 model), drawn on the
    generator's device and moved to x's."""
    dev = generator.device if generator is not None else x.device
    z = torch.randn((samples, *x.shape), generator=generator, device=dev, dtype=torch.float64)
    return z.to(x.device)


def _check_density(sde, x, eps, nodes, samples, rule, variable, antithetic, ref_var) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor [B, ...], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde must be a LinearSDE (VE, VP or sub-VP), got {type(sde).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps!r}")
    for name, value, least in (("nodes", nodes, 1), ("samples", samples, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    check_choice("rule", rule, DENSITY_RULES)
    check_choice("variable", variable, DENSITY_VARIABLES)
    if ref_var is not None and (isinstance(ref_var, bool) or not isinstance(ref_var, (int, float))
                                or not math.isfinite(ref_var) or ref_var <= 0):
        raise ValueError(f"ref_var must be a finite number > 0 or None, got {ref_var!r}")
    if rule == "stratified" and (ref_var is None or not antithetic):
        raise ValueError("rule='stratified' needs antithetic=True and a ref_var: its points "
                         "come arbitrarily close to t = eps, where without the reference the "
                         "values grow like 1/nu and without the pairs like 1/sqrt(nu), and its "
                         "variance is infinite (docs/MATH.md 11.3); use a fixed rule")
    sigma_eps = float(sde.sigma(torch.tensor([float(eps)], dtype=torch.float64)))
    if variable == "logsnr" and not sigma_eps > 0:
        raise ValueError(f"variable='logsnr' needs sigma(eps) > 0 (a finite log-SNR at eps); "
                         f"{sde!r} has sigma({eps!r}) = 0: use eps > 0 or variable='t'")


def density_log_likelihood(score_fn, sde: LinearSDE, x: torch.Tensor, *, nodes: int = 32,
                           samples: int = 8, rule: str = "stratified", variable: str = "t",
                           antithetic: bool = True, ref_var: float | None = 1.0,
                           eps: float = 1e-5,
                           generator: torch.Generator | None = None) -> DensityResult:
    """log q_eps(x) in nats per sample by the score-based density formula (docs/MATH.md 11).

    x: [B, ...] data in the model's range, treated as a sample at time eps (as
    log_likelihood). The integral over the noise level runs over [eps, T] in ``variable``
    ("t", or "logsnr": lambda = log(alpha / sigma)) with ``nodes`` nodes: ``rule``
    "stratified" draws each evaluation's point uniformly in its node's stratum (unbiased, and
    the standard error covers the quadrature); "gauss_legendre" and "midpoint" are fixed open
    rules. samples: Monte-Carlo draws z per node and sample, fresh at every node (from
    generator); antithetic: each draw also with -z at the same point (twice the evaluations;
    it cancels the part odd in z, which dominates at small noise). ref_var: variance of the
    Gaussian reference whose integrand is subtracted draw by draw and added back in closed
    form (a control variate, exact for every value; None: the plain integrand). The stratified
    rule needs both devices (without them its variance is infinite). The terminal term is the
    SDE's prior in closed form; its mismatch with q_T is the ODE's too. Each node is one call
    of score_fn on samples x B inputs (twice that when antithetic): choose B for the memory.
    """
    _check_density(sde, x, eps, nodes, samples, rule, variable, antithetic, ref_var)
    eps = float(eps)
    B = x.shape[0]
    total = torch.zeros(B, dtype=torch.float64, device=x.device)
    var = torch.zeros_like(total)
    with torch.no_grad():
        for i in range(nodes):
            p, w = _node_points(sde, eps, variable, rule, nodes, i, (samples, B), generator)
            z = _draws(x, samples, generator)
            if antithetic:
                p2 = _Path(*(c.expand(samples, B).repeat(2, 1) for c in p))
                h = _values(score_fn, x, p2, torch.cat([z, -z]), ref_var)
                h = 0.5 * (h[:samples] + h[samples:])
            else:
                h = _values(score_fn, x, p, z, ref_var)
            wh = w.to(x.device) * h
            total += wh.mean(0)
            var += wh.var(0) / samples
        end = _path(sde, eps, torch.tensor([sde.T], dtype=torch.float64), "t")
        integral = total + _reference_integral(x, float(end.nu), ref_var).to(x.device)
        terminal = _terminal(sde, x, end).to(x.device)
    nfe = nodes * samples * (2 if antithetic else 1)
    return DensityResult((terminal - integral).to(x.dtype), var.sqrt().to(x.dtype),
                         terminal.to(x.dtype), nfe)


def density_bits_per_dim(score_fn, sde: LinearSDE, images: torch.Tensor, *,
                         data_range: tuple[float, float] = (-1.0, 1.0), nodes: int = 32,
                         samples: int = 8, rule: str = "stratified", variable: str = "t",
                         antithetic: bool = True, ref_var: float | None = 1.0,
                         eps: float = 1e-5, generator: torch.Generator | None = None,
                         dtype: torch.dtype = torch.float32) -> DensityBPDResult:
    """Bits/dim of uint8 images [B, C, H, W] as bits_per_dim, by the density formula in place
    of the ODE (dequantisation first, then the formula's draws, from one generator); the
    standard error is the formula's, in bits/dim."""
    x = dequantize_to_range(images, data_range=data_range, generator=generator, dtype=dtype)
    ll = density_log_likelihood(score_fn, sde, x, nodes=nodes, samples=samples, rule=rule,
                                variable=variable, antithetic=antithetic, ref_var=ref_var,
                                eps=eps, generator=generator)
    D = x[0].numel()
    return DensityBPDResult(nll_to_bpd(ll.logp, D, data_range), ll.stderr / (D * math.log(2)), ll)

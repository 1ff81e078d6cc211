"""The score-based density formula (docs/MATH.md 11) against exact references: the mixture
oracle's log q_eps (MATH.md 6), Gaussian data whose integrand, terminal mismatch and
log-density are closed-form, and a linear (wrong) score whose reverse-SDE and ODE model
densities are closed-form, for what the formula computes with a learned score (11.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

from fpkern.data.mixture import GaussianMixture
from fpkern.likelihood import (density_bits_per_dim, density_log_likelihood,
                               dequantize_to_range, log_likelihood)
from fpkern.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

EPS = 1e-5
SDES = [VESDE, VPSDE, SubVPSDE]


@pytest.fixture(scope="module")
def gm():
    """The two-component 2-D mixture of tests/test_likelihood.py."""
    mix = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5])
    return mix.to(dtype=torch.float64)


def _tv(t: float, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.float64)


def _c(fn, t: float) -> float:
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


def _transition(sde, t: float) -> tuple[float, float]:
    """(a, b^2) of x_t = a x_eps + b z, from alpha and sigma directly."""
    a = _c(sde.alpha, t) / _c(sde.alpha, EPS)
    return a, _c(sde.sigma2, t) - a * a * _c(sde.sigma2, EPS)


def _gauss_expect_logpdf(mean_x, b2, mu, var) -> torch.Tensor:
    """E log N(x_T; mu, var I) over x_T ~ N(mean_x, b2 I), per row, float64."""
    D = mean_x.shape[1]
    sq = (mean_x - mu).pow(2).sum(1)
    return -0.5 * D * math.log(2 * math.pi * var) - (sq + D * b2) / (2 * var)


def _prior_mismatch(sde, x, mean, s0) -> torch.Tensor:
    """delta(x) = E[log q_T(x_T) - log prior(x_T) | x_eps = x] for data N(mean, s0^2 I)
    (docs/MATH.md 11.4), in closed form."""
    aT, b2 = _transition(sde, sde.T)
    alpha_T = _c(sde.alpha, sde.T)
    qT_var = alpha_T ** 2 * s0 ** 2 + _c(sde.sigma2, sde.T)
    m = torch.as_tensor(mean, dtype=torch.float64)
    return (_gauss_expect_logpdf(aT * x, b2, alpha_T * m, qT_var)
            - _gauss_expect_logpdf(aT * x, b2, torch.zeros_like(m), sde.prior_std ** 2))


# ---- the exact mixture score ---------------------------------------------------------------
@pytest.mark.parametrize("sde_cls", SDES)
def test_exact_mixture_score_within_0_01_nats_per_dim(gm, sde_cls):
    """The issue's bar: at most 0.01 nats/dim from the exact log q_eps, per point, on the
    oracle's score, for VE, VP and sub-VP; every error within 4 standard errors."""
    sde = sde_cls()
    x = gm.sample(4, generator=torch.Generator().manual_seed(5))
    res = density_log_likelihood(gm.score_fn(sde), sde, x, nodes=16, samples=4096,
                                 generator=torch.Generator().manual_seed(0))
    err = res.logp - gm.log_prob(x, _tv(EPS, 4), sde)
    clean = (res.logp - gm.log_prob(x)).abs().mean().item() / gm.dim
    print(f"{sde_cls.__name__}: mean |error| {err.abs().mean().item() / gm.dim:.4f} nats/dim "
          f"(vs clean data {clean:.4f}), SE {res.stderr.mean().item() / gm.dim:.4f}, "
          f"nfe {res.nfe}")
    assert res.nfe == 16 * 4096 * 2
    assert err.abs().mean().item() / gm.dim <= 0.01
    assert clean <= 0.01
    assert bool((err.abs() <= 4 * res.stderr).all()), (err / res.stderr).tolist()


@pytest.mark.parametrize("sde_cls", SDES)
def test_data_set_mean_within_0_01_nats_per_dim_at_1024_evaluations(gm, sde_cls):
    """The NLL of a data set, the mean over 512 points: 1024 evaluations per point suffice
    for 0.01 nats/dim, since the errors of the points are independent."""
    sde, n = sde_cls(), 512
    x = gm.sample(n, generator=torch.Generator().manual_seed(6))
    res = density_log_likelihood(gm.score_fn(sde), sde, x, nodes=16, samples=32,
                                 generator=torch.Generator().manual_seed(0))
    err = (res.logp - gm.log_prob(x, _tv(EPS, n), sde)).mean().item()
    se = res.stderr.pow(2).mean().sqrt().item() / math.sqrt(n)
    print(f"{sde_cls.__name__}: error of the mean {err / gm.dim:.4f} nats/dim, "
          f"SE {se / gm.dim:.4f}, nfe {res.nfe} per point")
    assert res.nfe == 1024
    assert abs(err) / gm.dim <= 0.01
    assert abs(err) <= 4 * se


@pytest.mark.parametrize("rule,nodes,samples", [("stratified", 8, 16), ("gauss_legendre", 16, 8)])
@pytest.mark.parametrize("sde_cls", [VESDE, VPSDE])
def test_standard_error_is_honest_across_seeds(gm, sde_cls, rule, nodes, samples):
    """z = error / SE over 16 seeds x 16 points: mean near 0, RMS near 1, few beyond 3."""
    sde = sde_cls()
    x = gm.sample(16, generator=torch.Generator().manual_seed(5))
    exact = gm.log_prob(x, _tv(EPS, 16), sde)
    z = torch.cat([(r.logp - exact) / r.stderr for r in (
        density_log_likelihood(gm.score_fn(sde), sde, x, nodes=nodes, samples=samples,
                               rule=rule, generator=torch.Generator().manual_seed(seed))
        for seed in range(16))])
    rms, beyond = z.pow(2).mean().sqrt().item(), (z.abs() > 3).double().mean().item()
    print(f"{sde_cls.__name__} {rule}: mean z {z.mean().item():.3f}, rms {rms:.3f}, "
          f"|z| > 3: {beyond:.3f}")
    assert abs(z.mean().item()) < 0.3
    assert 0.7 < rms < 1.4
    assert beyond < 0.04


def test_control_variate_and_antithetic_pairs_cut_the_error_at_equal_cost(gm):
    """At the same number of evaluations the Gaussian reference and the antithetic pairs
    give a smaller standard error than the plain integrand (MATH.md 11.2; a fixed rule:
    the stratified one refuses the plain integrand, whose variance is then infinite)."""
    sde = VPSDE()
    x = gm.sample(16, generator=torch.Generator().manual_seed(5))
    kw = dict(nodes=8, rule="gauss_legendre", generator=torch.Generator().manual_seed(1))
    full = density_log_likelihood(gm.score_fn(sde), sde, x, samples=32, **kw)
    plain = density_log_likelihood(gm.score_fn(sde), sde, x, samples=64, antithetic=False,
                                   ref_var=None, **kw)
    assert full.nfe == plain.nfe
    ratio = (plain.stderr / full.stderr).median().item()
    print(f"plain / default standard error at {full.nfe} evaluations: {ratio:.2f}")
    assert ratio > 2


def test_variables_and_rules_agree(gm):
    """t and log-SNR, stratified and fixed rules: all within their standard errors."""
    sde = SubVPSDE()
    x = gm.sample(4, generator=torch.Generator().manual_seed(3))
    exact = gm.log_prob(x, _tv(EPS, 4), sde)
    for variable in ("t", "logsnr"):
        for rule in ("stratified", "gauss_legendre", "midpoint"):
            nodes = 8 if rule == "stratified" else 32
            r = density_log_likelihood(gm.score_fn(sde), sde, x, nodes=nodes, samples=128,
                                       rule=rule, variable=variable,
                                       generator=torch.Generator().manual_seed(2))
            assert bool(((r.logp - exact).abs() <= 4 * r.stderr + 1e-3).all()), (variable, rule)


class _IssueSDE(LinearSDE):
    """The issue's process dX = -X / (2 (1 - t)) dt + (1 - t)^{-1/2} dB: alpha^2 = 1 - t,
    sigma^2 = t, stopped at T = 1 - 1e-6 (alpha(1) = 0)."""

    T = 1.0 - 1e-6

    def f(self, t):
        return -0.5 / (1 - t)

    def g2(self, t):
        return 1 / (1 - t)

    def log_alpha(self, t):
        return 0.5 * torch.log1p(-t)

    def sigma(self, t):
        return torch.sqrt(t)

    def sigma2(self, t):
        return t

    @property
    def prior_std(self):
        return 1.0


def test_the_issues_form_of_the_formula_on_its_own_process(gm):
    """log q_0(x) = -(d/2) log(2 pi e) - int_0^1 [E|s_t(X_t) + (X_t - sqrt(1-t) x) / t|^2
    / (2 (1-t)) - d / (2t)] dt (MATH.md 11.1, "the issue's form"), coded here directly:
    Gauss-Legendre in log t, antithetic draws, and the mean-zero (1 - t)(|z|^2 - d) / t
    taken from each squared error (it only removes noise). It matches the oracle's exact
    log q_0; density_log_likelihood on the same process (eps = 0) does too."""
    sde, d = _IssueSDE(), gm.dim
    x = gm.sample(4, generator=torch.Generator().manual_seed(2))
    exact = gm.log_prob(x)
    gen = torch.Generator().manual_seed(0)
    lo, hi, M = math.log(1e-12), math.log1p(-1e-12), 512
    u, w = np.polynomial.legendre.leggauss(48)
    integral, var = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for ui, wi in zip(u, w):
        t = math.exp(lo + (hi - lo) * (ui + 1) / 2)
        z = torch.randn(M, *x.shape, generator=gen, dtype=torch.float64)
        z = torch.cat([z, -z])
        xt = math.sqrt(1 - t) * x + math.sqrt(t) * z
        s = gm.score(xt.reshape(-1, d), _tv(t, 2 * M * 4), sde).reshape(xt.shape)
        err2 = (s + (xt - math.sqrt(1 - t) * x) / t).pow(2).sum(-1)
        err2 = err2 - (1 - t) * (z.pow(2).sum(-1) - d) / t
        val = err2 / (2 * (1 - t)) - d / (2 * t)
        val = 0.5 * (val[:M] + val[M:])
        weight = wi * (hi - lo) / 2 * t                  # dt = t d(log t)
        integral += weight * val.mean(0)
        var += weight ** 2 * val.var(0) / M
    issue = -0.5 * d * math.log(2 * math.pi * math.e) - integral
    se = var.sqrt()
    print(f"issue's form: error {(issue - exact).tolist()}, SE {se.tolist()}")
    assert bool(((issue - exact).abs() <= 4 * se + 1e-3).all())
    ours = density_log_likelihood(gm.score_fn(sde), sde, x, nodes=16, samples=256, eps=0.0,
                                  generator=torch.Generator().manual_seed(1))
    assert bool(((ours.logp - exact).abs() <= 4 * ours.stderr + 1e-3).all())


# ---- Gaussian data: closed forms -----------------------------------------------------------
@pytest.mark.parametrize("variable", ["t", "logsnr"])
@pytest.mark.parametrize("sde_cls", SDES)
def test_reference_gaussian_data_is_exact(sde_cls, variable):
    """Data N(0, s0^2 I) with ref_var its variance at eps: every draw's value is 0, so any
    rule gives terminal - (reference integral) exactly, which with the closed-form prior
    mismatch is log q_eps (checks nu_T, a_T, the terminal term and the reference's integral)."""
    sde, s0, D = sde_cls(), 0.7, 3
    g = GaussianMixture([1.0], torch.zeros(1, D, dtype=torch.float64), [s0])
    x = g.sample(5, generator=torch.Generator().manual_seed(0)) * 2
    v_eps = _c(sde.alpha, EPS) ** 2 * s0 ** 2 + _c(sde.sigma2, EPS)
    res = density_log_likelihood(g.score_fn(sde), sde, x, nodes=3, samples=2, ref_var=v_eps,
                                 variable=variable, generator=torch.Generator().manual_seed(0))
    delta = _prior_mismatch(sde, x, torch.zeros(D), s0)
    print(f"{sde_cls.__name__}: prior mismatch {delta.abs().max().item():.2e} nats")
    assert res.stderr.max().item() < 1e-9
    torch.testing.assert_close(res.logp + delta, g.log_prob(x, _tv(EPS, 5), sde), rtol=0,
                               atol=1e-8)


def _nu(sde, t: float) -> float:
    a, b2 = _transition(sde, t)
    return b2 / a ** 2


def _dnu_dt(sde, t: float) -> float:
    """d nu / dt by float64 autograd through alpha and sigma (independent of the g^2 / a^2
    the code uses)."""
    tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
    e = torch.tensor([EPS], dtype=torch.float64)
    nu = sde.alpha(e) ** 2 * (sde.sigma2(tt) / sde.alpha(tt) ** 2
                              - sde.sigma2(e) / sde.alpha(e) ** 2)
    (d,) = torch.autograd.grad(nu.sum(), tt)
    return float(d)


def _gauss_integrand(x, nu, mean, v, D) -> torch.Tensor:
    """I(nu) of MATH.md 11.1 for data N(mean, v I) at eps: p_nu = N(mean, (v + nu) I)."""
    sq = (x - mean).pow(2).sum(1)
    return sq / (2 * (v + nu) ** 2) - D * (2 * v + nu) / (2 * (v + nu) ** 2)


@pytest.mark.parametrize("sde_cls", SDES)
def test_gaussian_integrand_in_closed_form(sde_cls):
    """Data N(m, s0^2 I), m != 0, s0^2 != ref_var: with Gauss-Legendre nodes in t the
    estimate is the same rule applied to the closed-form integrand (nodes and d nu / dt
    computed here), within 4 standard errors; with the stratified rule, plus the prior
    mismatch, it is log q_eps within 4 standard errors."""
    sde, s0, D, n = sde_cls(), 0.4, 2, 12
    mean = torch.tensor([0.8, -0.5], dtype=torch.float64)
    g = GaussianMixture([1.0], mean[None], [s0])
    x = g.sample(6, generator=torch.Generator().manual_seed(1))
    a0 = _c(sde.alpha, EPS)
    v = a0 ** 2 * s0 ** 2 + _c(sde.sigma2, EPS)
    u, w = np.polynomial.legendre.leggauss(n)
    quadrature = torch.zeros(6, dtype=torch.float64)
    for ui, wi in zip(u, w):
        t = EPS + (sde.T - EPS) * (ui + 1) / 2
        quadrature += (wi * (sde.T - EPS) / 2 * _dnu_dt(sde, t)
                       * _gauss_integrand(x, _nu(sde, t), a0 * mean, v, D))
    aT, b2 = _transition(sde, sde.T)
    terminal = (_gauss_expect_logpdf(aT * x, b2, torch.zeros(D), sde.prior_std ** 2)
                + D * math.log(aT))
    res = density_log_likelihood(g.score_fn(sde), sde, x, nodes=n, samples=512,
                                 rule="gauss_legendre", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(res.terminal, terminal, rtol=0, atol=1e-9)
    assert bool(((res.logp - (terminal - quadrature)).abs() <= 4 * res.stderr).all())
    strat = density_log_likelihood(g.score_fn(sde), sde, x, nodes=8, samples=512,
                                   generator=torch.Generator().manual_seed(5))
    err = strat.logp + _prior_mismatch(sde, x, mean, s0) - g.log_prob(x, _tv(EPS, 6), sde)
    print(f"{sde_cls.__name__}: |error| {err.abs().max().item():.4f}, "
          f"SE {strat.stderr.mean().item():.4f}")
    assert bool((err.abs() <= 4 * strat.stderr).all())


# ---- a wrong score: what the formula computes then (MATH.md 11.5) --------------------------
def _linear_models(sde, s0: float, k: float):
    """For the score -x / (k Sigma(t)), Sigma the marginal variance of N(0, s0^2) data: the
    reverse-SDE and probability-flow model variances at eps (started from the prior at T),
    and L(|x|^2), the density formula in closed form (one-dimensional quadrature)."""
    Sig = lambda t: _c(sde.alpha, t) ** 2 * s0 ** 2 + _c(sde.sigma2, t)
    f, g2 = (lambda t: _c(sde.f, t)), (lambda t: _c(sde.g2, t))
    kap = lambda t: k * Sig(t)
    v0 = sde.prior_std ** 2
    opts = dict(rtol=1e-11, atol=1e-12, method="DOP853")
    v_sde = solve_ivp(lambda t, V: 2 * (f(t) + g2(t) / kap(t)) * V - g2(t), (sde.T, EPS),
                      [v0], **opts).y[0, -1]
    log_ode = solve_ivp(lambda t, L: [2 * (f(t) + g2(t) / (2 * kap(t)))], (sde.T, EPS),
                        [math.log(v0)], **opts).y[0, -1]
    a0 = _c(sde.alpha, EPS)

    def L(sq: float, D: int) -> float:
        def integrand(t):   # d nu / dt times I_theta(nu), score in y coordinates -y / k_y
            a = _c(sde.alpha, t) / a0
            ky, nu = kap(t) / a ** 2, _nu(sde, t)
            return (sq / (2 * ky ** 2) - D / ky + D * nu / (2 * ky ** 2)) * g2(t) / a ** 2
        pts = np.linspace(EPS, sde.T, 41)
        integral = sum(quad(integrand, lo, hi, epsabs=1e-12, epsrel=1e-11)[0]
                       for lo, hi in zip(pts[:-1], pts[1:]))
        aT, b2 = _transition(sde, sde.T)
        term = (-0.5 * D * math.log(2 * math.pi * v0) - (aT ** 2 * sq + D * b2) / (2 * v0)
                + D * math.log(aT))
        return term - integral
    return v_sde, math.exp(log_ode), L


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE])
def test_a_wrong_score_gives_the_reverse_sde_bound_not_the_ode_likelihood(sde_cls):
    """A linear score with the wrong variance (k = 2): the estimate matches the closed-form
    formula L, L <= log p_SDE at every x (equality for the true score, k = 1), and L lies
    above log p_ODE at x = 0: the formula bounds the reverse-SDE model's likelihood, not the
    probability-flow model's, which fpkern.likelihood.log_likelihood computes."""
    sde, s0, D = sde_cls(), 0.7, 2
    x = torch.tensor([[0.0, 0.0], [0.3, -0.2], [1.0, 0.5], [2.5, -1.5]], dtype=torch.float64)
    sq = x.pow(2).sum(1)

    def logn(var):
        return -0.5 * D * math.log(2 * math.pi * var) - sq / (2 * var)

    for k in (2.0, 1.0):
        def score(xt, t, k=k):
            return -xt / (k * (sde.alpha(t) ** 2 * s0 ** 2 + sde.sigma2(t)))[:, None]

        v_sde, v_ode, L = _linear_models(sde, s0, k)
        bound = torch.tensor([L(float(s), D) for s in sq], dtype=torch.float64)
        res = density_log_likelihood(score, sde, x, nodes=16, samples=256,
                                     generator=torch.Generator().manual_seed(0))
        print(f"{sde_cls.__name__} k={k}: L {bound.tolist()}\n  SDE {logn(v_sde).tolist()}\n"
              f"  ODE {logn(v_ode).tolist()}\n  estimate {res.logp.tolist()}")
        assert bool(((res.logp - bound).abs() <= 4 * res.stderr + 1e-6).all())
        gap = logn(v_sde) - bound
        if k == 1.0:
            assert gap.abs().max().item() < 1e-3   # only the prior mismatch
        else:
            assert bool((gap > 0.1).all())
            assert bound[0].item() > logn(v_ode)[0].item() + 0.5
            ode = log_likelihood(score, sde, x, probes=None, rtol=1e-7, atol=1e-7)
            torch.testing.assert_close(ode.logp, logn(v_ode), rtol=0, atol=1e-3)


# ---- bits/dim, counting, options -----------------------------------------------------------
def test_density_bits_per_dim_gaussian_images():
    """As tests/test_likelihood.py::test_bits_per_dim_gaussian_images, by the formula."""
    D, s0 = 12, 0.5
    gauss = GaussianMixture([1.0], torch.zeros(1, D, dtype=torch.float64), [s0])
    sde = VPSDE()
    images = torch.randint(0, 256, (6, 3, 2, 2), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    res = density_bits_per_dim(gauss.score_fn(sde), sde, images, nodes=8, samples=64,
                               generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    xq = dequantize_to_range(images, generator=torch.Generator().manual_seed(9),
                             dtype=torch.float64)
    expected = -gauss.log_prob(xq, _tv(EPS, 6), sde) / (D * math.log(2)) + 7
    print(f"bpd {res.bpd.tolist()} expected {expected.tolist()} SE {res.stderr.tolist()}")
    assert bool(((res.bpd - expected).abs() <= 4 * res.stderr + 1e-4).all())
    torch.testing.assert_close(res.stderr, res.likelihood.stderr / (D * math.log(2)))


def test_nfe_counts_the_score_evaluations_and_the_seed_reproduces(gm):
    sde = VESDE()
    x = gm.sample(3, generator=torch.Generator().manual_seed(0))
    rows = []

    def counting(xt, t):
        assert xt.shape[1:] == x.shape[1:] and t.shape == (xt.shape[0],)
        rows.append(xt.shape[0])
        return gm.score(xt, t, sde)

    for antithetic, per in ((True, 2), (False, 1)):
        rows.clear()
        r = density_log_likelihood(counting, sde, x, nodes=5, samples=3, antithetic=antithetic,
                                   rule="midpoint", generator=torch.Generator().manual_seed(7))
        assert r.nfe == 5 * 3 * per == sum(rows) // x.shape[0]
    a, b = (density_log_likelihood(gm.score_fn(sde), sde, x, nodes=4, samples=4,
                                   generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.logp, b.logp) and torch.equal(a.stderr, b.stderr)


def test_float32_network_dtype(gm):
    """A float32 score and data: the result is float32 and close to the float64 one."""
    sde = VPSDE()
    x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    g32 = gm.to(dtype=torch.float32)
    kw = dict(nodes=8, samples=64)
    r32 = density_log_likelihood(g32.score_fn(sde), sde, x.float(), **kw,
                                 generator=torch.Generator().manual_seed(1))
    r64 = density_log_likelihood(gm.score_fn(sde), sde, x, **kw,
                                 generator=torch.Generator().manual_seed(1))
    assert r32.logp.dtype == torch.float32
    torch.testing.assert_close(r32.logp.double(), r64.logp, rtol=0, atol=1e-3)


def test_eps_zero(gm):
    """eps = 0: fine in t for VP (sigma(0) = 0, nu from 0) and for VE (sigma_min > 0) in
    either variable; log-SNR with sigma(eps) = 0 is refused, naming the variable."""
    x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    for sde, variable in ((VPSDE(), "t"), (VESDE(), "logsnr")):
        r = density_log_likelihood(gm.score_fn(sde), sde, x, nodes=8, samples=128, eps=0.0,
                                   variable=variable, generator=torch.Generator().manual_seed(0))
        err = r.logp - gm.log_prob(x, _tv(0.0, 4), sde)
        assert bool((err.abs() <= 4 * r.stderr + 1e-3).all())
    with pytest.raises(ValueError, match="variable='logsnr' needs sigma"):
        density_log_likelihood(gm.score_fn(VPSDE()), VPSDE(), x, eps=0.0, variable="logsnr")


@pytest.mark.parametrize("kwargs,match", [
    (dict(nodes=0), "nodes"), (dict(nodes=2.5), "nodes"), (dict(nodes=True), "nodes"),
    (dict(samples=1), "samples"), (dict(rule="trapezoid"), "rule"),
    (dict(variable="snr"), "variable"), (dict(ref_var=0.0), "ref_var"),
    (dict(ref_var=float("nan")), "ref_var"), (dict(eps=1.0), "eps"), (dict(eps=-1e-3), "eps"),
    (dict(ref_var=None), "rule='stratified' needs"),
    (dict(antithetic=False), "rule='stratified' needs"),
])
def test_bad_options_name_the_argument(gm, kwargs, match):
    sde = VPSDE()
    x = gm.sample(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        density_log_likelihood(gm.score_fn(sde), sde, x, **kwargs)


def test_bad_inputs(gm):
    sde = VPSDE()
    with pytest.raises(ValueError, match="x must be"):
        density_log_likelihood(gm.score_fn(sde), sde, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="sde must be"):
        density_log_likelihood(gm.score_fn(sde), "vp", torch.zeros(4, 2))


def test_study_script_tiny(experiment, tmp_path):
    """experiments/density_likelihood.py with tiny settings: both outputs written, every
    table row there, the numbers finite."""
    import json

    study = experiment("density_likelihood")
    res = study.main(["--points", "8", "--budgets", "64", "--tols", "1e-2", "--train-steps", "3",
                      "--fp-steps", "2", "--trained-budget", "64", "--variant-budget", "64",
                      "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "density_likelihood.json").read_text())
    md = (tmp_path / "density_likelihood.md").read_text()
    assert len(saved["oracle"]) == 2 * 3 * 3 + 3 * len(study.VARIANTS)
    assert len(saved["trained"]) == 4
    assert "| dsm+fp |" in md and "### mix16" in md
    for row in res["oracle"] + res["trained"]:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    with pytest.raises(ValueError, match="budget"):
        study.split_budget(18)


def test_density_digits_smoke_on_a_zero_score_model(experiment, tmp_path):
    """experiments/density_digits.py on a zero-weight VE checkpoint: the ODE stands still,
    so its bits/dim are N(0, sigma_max^2 I)'s on the same dequantised digits (the closed form
    of tests/test_evaluate_cli.py); both estimates and the paired difference are written."""
    import json

    from tests.test_evaluate_cli import N, SEED, _dequantised, _gauss_bpd
    from tests.test_sample_cli import train_checkpoint

    ckpt, _ = train_checkpoint(tmp_path / "ve", arch="ncsnpp", zero=True)
    study = experiment("density_digits")
    res = study.main(["--checkpoint", str(ckpt), "--images", str(N), "--seed", str(SEED),
                      "--probes", "1", "--tol", "1e-3", "--nodes", "2", "--mc-samples", "2",
                      "--threads", "1", "--out", str(tmp_path)])
    want = _gauss_bpd(_dequantised(0.0, 1.0), 16.0 ** 2, 0.0, 1.0)
    assert abs(res["ode"]["bpd"] - want) < 1e-3
    assert math.isfinite(res["density"]["bpd"]) and res["density"]["evals_per_image"] == 8
    saved = json.loads((tmp_path / "density_digits.json").read_text())
    assert saved["command"].startswith("python experiments/density_digits.py")
    assert len(saved["per_image"]["ode"]) == N
    assert "Paired per-image difference" in (tmp_path / "density_digits.md").read_text()

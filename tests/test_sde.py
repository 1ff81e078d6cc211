"""The forward SDEs: closed forms, the variance ODE, accuracy near t = 0, Score SDE interface."""

import math

import pytest
import torch

from fpkern.sde import SDES, SubVPSDE, VESDE, VPSDE, get_sde

F64 = torch.float64
ALL = [VESDE(), VPSDE(), SubVPSDE()]
IDS = ["ve", "vp", "subvp"]


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_coefficients_solve_the_moment_odes(sde):
    """alpha' = f alpha and (sigma^2)' = 2 f sigma^2 + g^2: the marginal of dx = f x dt + g dW."""
    t = torch.linspace(0, 1, 41, dtype=F64).requires_grad_()
    log_a, var = sde.log_alpha(t), sde.sigma2(t)
    dlog_a = torch.autograd.grad(log_a.sum(), t)[0]
    dvar = torch.autograd.grad(var.sum(), t)[0]
    t = t.detach()
    assert torch.allclose(dlog_a, sde.f(t), rtol=1e-12, atol=1e-12)
    assert torch.allclose(dvar, 2 * sde.f(t) * sde.sigma2(t) + sde.g2(t), rtol=1e-10, atol=1e-12)


def test_closed_forms_of_math_md():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    ve, vp, sub = VESDE(), VPSDE(), SubVPSDE()
    assert torch.allclose(ve.sigma(t), 0.01 * 5000.0 ** t)
    assert torch.allclose(ve.g2(t), 2 * ve.sigma(t) ** 2 * math.log(5000.0))
    beta = 0.1 + t * 19.9
    a = torch.exp(-t ** 2 * 19.9 / 4 - t * 0.05)
    assert torch.allclose(vp.f(t), -beta / 2) and torch.allclose(vp.g2(t), beta)
    assert torch.allclose(vp.alpha(t), a) and torch.allclose(vp.sigma(t) ** 2, 1 - a ** 2)
    assert torch.allclose(sub.g2(t), beta * (1 - a ** 4))
    assert torch.allclose(sub.sigma(t), 1 - a ** 2)
    assert ve.T == vp.T == sub.T == 1.0


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_accurate_in_float32_near_zero(sde):
    t64 = torch.tensor([1e-7, 1e-5, 1e-3], dtype=F64)
    t32 = t64.float()
    for fn in (sde.sigma, sde.sigma2, sde.g2):
        ref = fn(t32.double())
        got = fn(t32)
        assert ((got.double() - ref).abs() / ref).max() < 1e-5, fn.__name__


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_finite_on_the_whole_interval(sde):
    t = torch.cat([torch.zeros(1), torch.logspace(-8, 0, 50)])
    for fn in (sde.f, sde.g2, sde.alpha, sde.sigma, sde.sigma2):
        assert torch.isfinite(fn(t)).all()


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_marginal_and_sde(sde, gen):
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=F64)
    t = torch.rand(4, generator=gen, dtype=F64)
    mean, std = sde.marginal_prob(x, t)
    assert torch.allclose(mean, sde.alpha(t)[:, None, None, None] * x) and std.shape == (4,)
    assert torch.allclose(std, sde.sigma(t))
    drift, diffusion = sde.sde(x, t)
    assert torch.allclose(drift, sde.f(t)[:, None, None, None] * x)
    assert torch.allclose(diffusion, sde.g2(t).sqrt())


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_prior(sde, gen):
    z = sde.prior_sampling((20000, 2), generator=gen, dtype=F64)
    assert abs(z.std().item() / sde.prior_std - 1) < 0.03
    x = torch.randn(6, 2, 3, generator=gen, dtype=F64)
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(sde.prior_logp(x), ref)


def test_discretisations_follow_score_sde():
    ve = VESDE(N=10)
    x = torch.ones(2, 3, dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    f, G = ve.discretize(x, t)
    sig = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), 10, dtype=F64))
    assert torch.equal(f, torch.zeros_like(x))
    assert torch.allclose(G, torch.stack([sig[0], (sig[4] ** 2 - sig[3] ** 2).sqrt()]))
    vp = VPSDE(N=10)
    f, G = vp.discretize(x, t)
    betas = torch.linspace(0.1 / 10, 20.0 / 10, 10, dtype=F64)
    assert torch.allclose(G, betas[[0, 4]].sqrt())
    assert torch.allclose(f, (1 - betas[[0, 4]]).sqrt()[:, None] * x - x)
    sub = SubVPSDE(N=10)
    f, G = sub.discretize(x, t)
    drift, diff = sub.sde(x, t)
    assert torch.allclose(f, drift / 10) and torch.allclose(G, diff * 0.1 ** 0.5)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_reverse_sde_and_probability_flow(sde, gen):
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    t = torch.rand(3, generator=gen, dtype=F64)
    score = lambda x, t: -x / (1 + t[:, None])  # noqa: E731
    drift, diffusion = sde.sde(x, t)
    rev = sde.reverse(score)
    rdrift, rdiff = rev.sde(x, t)
    assert torch.allclose(rdrift, drift - diffusion[:, None] ** 2 * score(x, t))
    assert torch.allclose(rdiff, diffusion)
    ode = sde.reverse(score, probability_flow=True)
    odrift, odiff = ode.sde(x, t)
    assert torch.allclose(odrift, drift - 0.5 * diffusion[:, None] ** 2 * score(x, t))
    assert torch.equal(odiff, torch.zeros_like(odiff))
    f, G = sde.discretize(x, t)
    rf, rG = rev.discretize(x, t)
    assert torch.allclose(rf, f - G[:, None] ** 2 * score(x, t)) and torch.allclose(rG, G)


def test_registry_and_bad_parameters():
    assert isinstance(get_sde("VP", beta_max=10.0), VPSDE) and set(SDES) == {"ve", "vp", "subvp"}
    with pytest.raises(ValueError, match="valid names"):
        get_sde("edm")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match=r"\[0, T=1.0\]"):
        VPSDE().check_time(torch.tensor([0.5, 1.01]))
    with pytest.raises(ValueError, match="NaN"):
        VPSDE().check_time(torch.tensor([float("nan")]))

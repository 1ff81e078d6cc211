"""The Gaussian-mixture oracle: density, score and the scalar FPE it satisfies exactly."""

import math

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64


def _gm(D=3):
    return GaussianMixture.random(4, D, generator=torch.Generator().manual_seed(3))


def test_clean_density_matches_torch_distributions(gen):
    gm = _gm()
    x = torch.randn(7, 3, generator=gen, dtype=F64) * 3
    comp = torch.distributions.Independent(
        torch.distributions.Normal(gm.means, gm.stds[:, None].expand_as(gm.means)), 1)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gm.weights), comp)
    assert torch.allclose(gm.log_prob(x), ref.log_prob(x), rtol=1e-12)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=["ve", "vp", "subvp"])
def test_score_is_the_gradient_of_the_log_density(sde, gen):
    gm = _gm()
    x = (torch.randn(6, 3, generator=gen, dtype=F64) * 2).requires_grad_()
    t = torch.tensor([0.0, 1e-4, 0.01, 0.2, 0.6, 1.0], dtype=F64)
    g = torch.autograd.grad(gm.log_prob(x, t, sde).sum(), x)[0]
    assert torch.allclose(gm.score(x, t, sde), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=["ve", "vp", "subvp"])
def test_log_density_satisfies_the_scalar_fpe(sde, gen):
    """d_t log q = 1/2 g^2 (div s + |s|^2) - f <x, s> - D f   (docs/MATH.md section 2)."""
    gm = _gm()
    D = gm.dim
    x = (torch.randn(5, D, generator=gen, dtype=F64) * 2).requires_grad_()
    t = torch.tensor([1e-4, 0.01, 0.2, 0.6, 1.0], dtype=F64).requires_grad_()
    logq = gm.log_prob(x, t, sde)
    dt_logq = torch.autograd.grad(logq.sum(), t, retain_graph=True)[0]
    s = gm.score(x, t, sde)
    div = sum(torch.autograd.grad(s[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(D))
    f, g2 = sde.f(t), sde.g2(t)
    rhs = 0.5 * g2 * (div + s.pow(2).sum(1)) - f * (x * s).sum(1) - D * f
    assert torch.allclose(dt_logq, rhs.detach(), rtol=1e-8, atol=1e-8 * rhs.abs().max().item())


def test_sampling_moments(gen):
    gm = GaussianMixture([1.0, 3.0], [[-2.0, 0.0], [2.0, 1.0]], [0.5, 1.0])
    x = gm.sample(200_000, generator=gen)
    mean = (gm.weights[:, None] * gm.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    second = (gm.weights[:, None] * (gm.means ** 2 + gm.stds[:, None] ** 2)).sum(0)
    assert torch.allclose((x ** 2).mean(0), second, rtol=0.02)


def test_image_shaped_inputs_and_errors():
    gm = _gm(D=12)
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    t = torch.tensor([0.1, 0.2], dtype=F64)
    assert gm.score(x, t, VPSDE()).shape == x.shape
    with pytest.raises(ValueError, match="12 features"):
        gm.score(torch.randn(2, 5, dtype=F64), t, VPSDE())
    with pytest.raises(ValueError, match="weights must be positive"):
        GaussianMixture([1.0, -1.0], [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="needs an sde"):
        gm.log_prob(torch.randn(2, 12, dtype=F64), t)
    assert math.isclose(gm.weights.sum().item(), 1.0)

"""The log-density FPE (fpkern.ops.log_density_fpe) against the mixture's exact log q_t and
float64 autograd, its unbiased R^2, the vector residual grad_x R, and bad input."""

import logging
import math

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.jet import JetUnsupported
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models import EnergyMLP, EnergyScore
from fpkern.ops import fpe_residual, log_density_fpe
from fpkern.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
SDES = {"vp": VPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=5.0), "subvp": SubVPSDE()}
D = 4


def _points(sde, mix, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, generator=g)
    t = 0.02 + 0.95 * torch.rand(n, generator=g, dtype=F64)
    mean, std = sde.marginal_prob(x0, t)
    return mean + std[:, None] * torch.randn(x0.shape, generator=g, dtype=F64), t


def _basis_sets(x):
    """Both probe sets = sqrt(D) e_i: their means are the exact Laplacian and |grad u|^2."""
    n, d = x.shape
    basis = (math.sqrt(d) * torch.eye(d, dtype=x.dtype))[:, None, :].expand(d, n, d)
    return torch.cat([basis, basis])


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(3, D, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def energy():
    torch.manual_seed(0)
    return EnergyScore(EnergyMLP(D, width=32, depth=3).double(), VPSDE())


def _exact_residual(u_fn, x, t, sde):
    """R by float64 autograd written out here: grad, d_t and the Hessian's trace."""
    x = x.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    u = u_fn(x, t)
    gx, gt = torch.autograd.grad(u.sum(), (x, t), create_graph=True)
    lap = sum(torch.autograd.grad(gx[:, i].sum(), x, create_graph=True)[0][:, i]
              for i in range(x.shape[1]))
    f, g2 = sde.f(t), sde.g2(t)
    return x, (gt - 0.5 * g2 * (lap + gx.pow(2).sum(1)) + f * (x * gx).sum(1)
               + x.shape[1] * f)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("method", ["fused", "naive", "exact"])
def test_zero_at_the_mixtures_exact_log_density(mix, name, method):
    """R = 0 to rounding for log q_t itself (with probes whose means are exact)."""
    sde = SDES[name]
    x, t = _points(sde, mix)
    out = log_density_fpe(lambda y, s: mix.log_prob(y, s, sde), x, t, sde, method=method,
                          probes=_basis_sets(x))
    scale = _exact_residual(lambda y, s: 1.1 * mix.log_prob(y, s, sde), x, t, sde)[1].abs()
    assert out.residual.abs().max() <= 1e-10 * (1 + scale.max())
    assert torch.allclose(out.value, mix.log_prob(x, t, sde), rtol=1e-12)
    assert scale.min() > 1e-3        # a perturbed log q (1.1 log q_t) is far from solving it


@pytest.mark.parametrize("name", sorted(SDES))
def test_fused_and_naive_give_the_same_estimates_on_a_network(energy, name):
    sde = SDES[name]
    energy.sde = sde
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(5, D, generator=g, dtype=F64), 0.05 + 0.9 * torch.rand(5, generator=g, dtype=F64)
    V = torch.randn(6, 5, D, generator=g, dtype=F64)          # K = 3 per set
    a = log_density_fpe(energy, x, t, sde, method="fused", probes=V, strict=True)
    b = log_density_fpe(energy, x, t, sde, method="naive", probes=V)
    for got, want in zip(a, b):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    exact = _exact_residual(energy.log_density, x, t, sde)[1]
    fused_basis = log_density_fpe(energy, x, t, sde, method="fused", probes=_basis_sets(x))
    ours = log_density_fpe(energy, x, t, sde, method="exact")
    assert torch.allclose(fused_basis.residual, exact, rtol=1e-10, atol=1e-10)
    assert torch.allclose(ours.residual, exact, rtol=1e-10, atol=1e-10)
    assert torch.allclose(ours.square, exact ** 2, rtol=1e-10, atol=1e-10)


def test_parameter_gradients_match_the_naive_method(energy):
    sde = VPSDE()
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(4, D, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64)
    V = torch.randn(2, 4, D, generator=g, dtype=F64)
    params = [p for p in energy.parameters() if p.requires_grad]
    grads = []
    for method in ("fused", "naive"):
        loss = log_density_fpe(energy, x, t, sde, method=method, probes=V).square.mean()
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for p, a, b in zip(params, *grads):
        a, b = (torch.zeros_like(p) if v is None else v for v in (a, b))
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # the head's bias shifts u by a constant, on which R does not depend
    bias = next(i for i, p in enumerate(params) if p is energy.net.head.bias)
    assert grads[1][bias] is None


def test_the_product_of_two_sets_is_unbiased_for_r_squared(energy):
    """Mean of R_1 R_2 over many probe draws within 4 standard errors of the exact R^2; the
    square of one estimate is biased upward by its variance, by many standard errors."""
    sde = VPSDE()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, D, generator=g, dtype=F64).expand(4000, D)
    t = torch.full((4000,), 0.3, dtype=F64)
    with torch.no_grad():
        out = log_density_fpe(energy, x, t, sde, probes=1, generator=g)
    exact = log_density_fpe(energy, x[:1], t[:1], sde, method="exact").square.detach()
    se = out.square.std() / math.sqrt(4000)
    assert (out.square.mean() - exact).abs() <= 4 * se
    single = log_density_fpe(energy, x, t, sde, probes=torch.cat([
        torch.randint(0, 2, (1,) + x.shape, generator=g).to(F64) * 2 - 1] * 2)).square.detach()
    assert single.mean() - exact > 10 * single.std() / math.sqrt(4000)


def test_the_vector_residual_is_the_gradient_of_r(energy):
    """The score-FPE residual of s = grad u (div form, exact) equals grad_x R."""
    sde = VPSDE()
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(3, D, generator=g, dtype=F64), 0.1 + 0.8 * torch.rand(3, generator=g, dtype=F64)
    xg, R = _exact_residual(energy.log_density, x, t, sde)
    (grad_r,) = torch.autograd.grad(R.sum(), xg)
    r = fpe_residual(energy, x, t, sde, form="div", method="exact")
    assert torch.allclose(r, grad_r, rtol=1e-9, atol=1e-9)


def test_falls_back_without_a_jet_rule_and_strict_refuses(energy, caplog):
    sde = VPSDE()

    def clipped(x, t):                    # torch.where has no jet rule
        u = energy.log_density(x, t)
        return torch.where(u > -1e9, u, u * 0)

    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(3, D, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64)
    V = torch.randn(2, 3, D, generator=g, dtype=F64)
    with pytest.raises(JetUnsupported, match="where"):
        log_density_fpe(clipped, x, t, sde, probes=V, strict=True)
    with caplog.at_level(logging.WARNING):
        got = log_density_fpe(clipped, x, t, sde, probes=V)
    want = log_density_fpe(energy, x, t, sde, method="naive", probes=V)
    assert torch.allclose(got.residual, want.residual, rtol=1e-10)


def test_bad_input_is_named(energy):
    sde = VPSDE()
    x, t = torch.randn(3, D, dtype=F64), torch.rand(3, dtype=F64)
    with pytest.raises(ValueError, match=r"shape \(3, 1\).*squeeze"):
        log_density_fpe(lambda y, s: energy.log_density(y, s)[:, None], x, t, sde)
    with pytest.raises(ValueError, match="even number of probes"):
        log_density_fpe(energy, x, t, sde, probes=torch.randn(3, 3, D, dtype=F64))
    with pytest.raises(ValueError, match="strict=True applies to method 'fused'"):
        log_density_fpe(energy, x, t, sde, method="naive", strict=True)
    with pytest.raises(ValueError, match="float32"):
        log_density_fpe(lambda y, s: energy.log_density(y, s).float(), x, t, sde)
    with pytest.raises(ValueError, match="method"):
        log_density_fpe(energy, x, t, sde, method="stencil")
    with pytest.raises(ValueError, match="t must lie in"):
        log_density_fpe(energy, x, t + 2, sde)


def test_fp_loss_form_log_density(energy):
    sde = VPSDE()
    fp = FPLoss(sde, alpha=0.5, form="log_density", normalize="dim")
    assert fp.beta == 0.0 and FPLoss(sde, preset="paper").beta == 0.01
    assert FPLoss(sde, form="log_density", preset="paper").beta == 0.0   # whatever the preset
    x = torch.randn(8, D, dtype=F64)
    d, f = fp.with_dsm(DSMLoss(sde), energy, x, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)          # the same draws: t and z, then the probes
    t, xt, _, _ = DSMLoss(sde).perturb(x, generator=g)
    terms = log_density_fpe(energy, xt, t, sde, probes=1, generator=g)
    assert torch.allclose(f.vec, sde.g2(t) * terms.square / D, rtol=1e-12)
    assert torch.allclose(f.loss, 0.5 * f.vec.mean()) and f.scalar == 0
    (d.loss.mean() + f.loss).backward()
    assert all(p.grad is not None for p in energy.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="beta 0"):
        FPLoss(sde, form="log_density", beta=0.01)
    with pytest.raises(ValueError, match="m 2"):
        FPLoss(sde, form="log_density", m=1)
    with pytest.raises(TypeError, match="EnergyScore"):
        FPLoss(sde, form="log_density")(lambda y, s: -y, x)

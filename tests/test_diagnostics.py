"""Residual profile, conservativity, distances and the ODE-SDE gap on exact fields."""

import math

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.diagnostics import (conservativity, conservativity_profile, mmd, ode_sde_gap,
                                residual_profile, sliced_wasserstein)
from fpkern.plots import plot_residual_profile
from fpkern.sde import VESDE, VPSDE

TS = [1e-3, 0.05, 0.2, 0.5, 0.9]
OMEGA = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5]).to(dtype=torch.float64)


def perturbed(gm, sde, w=0.5):
    """Mixture score + a smooth non-conservative (rotational) term w (1 + t) Omega x."""
    return lambda x, t: gm.score(x, t, sde) + w * (1 + t)[:, None] * (x @ OMEGA.T)


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE])
def test_residual_profile_exact_zero_perturbed_not(gm, sde_cls, tmp_path):
    sde = sde_cls()
    x0 = gm.sample(32, generator=torch.Generator().manual_seed(0))
    exact = residual_profile(gm.score_fn(sde), sde, x0, TS, generator=torch.Generator().manual_seed(1))
    pert = residual_profile(perturbed(gm, sde), sde, x0, TS, generator=torch.Generator().manual_seed(1))
    for form in ("div", "laplacian"):
        print(sde_cls.__name__, form, "exact rel", exact.rel[form].max().item(),
              "perturbed rel", pert.rel[form].min().item())
        assert exact.rel[form].max() < 1e-20
        assert pert.rel[form].min() > 1e-3
    plot_residual_profile(pert, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_residual_profile_fused_method(gm):
    sde = VPSDE()
    x0 = gm.sample(16, generator=torch.Generator().manual_seed(0))
    prof = residual_profile(gm.score_fn(sde), sde, x0, [0.1, 0.6], forms=("laplacian",),
                            method="fused", probes=4, generator=torch.Generator().manual_seed(1))
    assert set(prof.abs) == {"laplacian"} and prof.t.dtype == torch.float64
    assert bool(torch.isfinite(prof.rel["laplacian"]).all())


def test_conservativity_exact_and_rotated(gm):
    sde = VPSDE()
    x = gm.sample(64, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 0.3, dtype=torch.float64)
    c = conservativity(gm.score_fn(sde), x, t, probes=8, generator=torch.Generator().manual_seed(1))
    assert c.shape == (64,) and c.max() < 1e-25
    # s = -R_theta x / v: J = -R/v, (J - J^T) v = -2 sin(theta) Omega v / v, |J v| = |v| / v,
    # so the ratio is 4 sin(theta)^2 for every probe
    theta = 0.3
    R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                     dtype=torch.float64)
    rot = lambda y, tt: -(y @ R.T) / (1.0 + tt)[:, None]  # noqa: E731
    c = conservativity(rot, x, t, probes=3, probe_dist="gaussian",
                       generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(c, torch.full_like(c, 4 * math.sin(theta) ** 2), rtol=1e-12, atol=0)
    prof = conservativity_profile(rot, sde, x, TS, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(prof, torch.full_like(prof, 4 * math.sin(theta) ** 2))
    prof = conservativity_profile(gm.score_fn(sde), sde, x, TS)
    assert prof.max() < 1e-25


def test_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64)
    y = torch.randn(400, 2, generator=g, dtype=torch.float64)
    assert abs(mmd(x, y)) < 5e-3 and mmd(x, x + 1.0) > 0.1
    assert mmd(x, y, unbiased=False) > 0
    # sliced W2 of a shift by a: sqrt(E_u <a, u>^2) = |a| / sqrt(2) in 2-D
    sw = sliced_wasserstein(x, x + torch.tensor([3.0, 0.0], dtype=torch.float64), projections=4000,
                            generator=g)
    assert abs(sw - 3 / math.sqrt(2)) < 0.05
    assert sliced_wasserstein(x, y[:300], generator=g) < 0.2


def test_ode_sde_gap(gm):
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    exact = ode_sde_gap(gm.score_fn(sde), sde, 600, steps=100, generator=g)
    rotated = ode_sde_gap(perturbed(gm, sde, w=2.0), sde, 600, steps=100, generator=g)
    print(f"gap exact {exact.distance:.3f}, non-conservative {rotated.distance:.3f}")
    assert exact.ode_samples.shape == (600, 2) and exact.distance < 0.15
    assert rotated.distance > 2 * exact.distance
    with pytest.raises(ValueError, match="valid names"):
        ode_sde_gap(gm.score_fn(sde), sde, 10, distance="kl")

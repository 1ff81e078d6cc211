"""Samplers against the Gaussian-mixture oracle (docs/MATH.md 6), RK45 and the sample CLI."""

import math

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.diagnostics import mmd
from fpkern.sampling import SAMPLERS, odeint_rk45, sample, time_grid
from fpkern.sde import SubVPSDE, VESDE, VPSDE

N = 1200


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5]).to(dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(gm):
    """A true sample and the MMD^2 noise level between independent true samples."""
    g = torch.Generator().manual_seed(7)
    ref = gm.sample(N, generator=g)
    null = max(abs(mmd(gm.sample(N, generator=g), ref)) for _ in range(3))
    return ref, null


def _tol(null):
    return 4 * max(null, 2.5e-4)


# (sde, method, steps): VE's uniform-t grid is coarse where sigma is large; its first-order
# fixed-step methods (ode_euler; reverse_diffusion, measurably biased at 100 steps:
# mean MMD^2 ~9e-4 over 8 seeds against ~2e-4 for the null) get 300 steps.
CASES = [(sde, m, 300 if (sde == "ve" and m in ("ode_euler", "reverse_diffusion")) else 100)
         for sde in ("vp", "ve") for m in sorted(SAMPLERS)] + [("subvp", "ode", 100),
                                                               ("subvp", "euler_maruyama", 100)]
SDES = {"vp": VPSDE, "ve": VESDE, "subvp": SubVPSDE}


@pytest.mark.parametrize("sde_name,method,steps", CASES)
def test_sampler_matches_mixture(gm, reference, sde_name, method, steps):
    ref, null = reference
    sde = SDES[sde_name]()
    g = torch.Generator().manual_seed(11)
    res = sample(gm.score_fn(sde), sde, (N, 2), method=method, steps=steps, generator=g,
                 dtype=torch.float64)
    assert res.samples.shape == (N, 2) and torch.isfinite(res.samples).all()
    d = mmd(res.samples, ref)
    print(f"{sde_name} {method}: MMD^2 {d:.2e} (null {null:.2e}), nfe {res.nfe}")
    assert d < _tol(null), (d, null)


def test_mmd_test_has_power(gm, reference):
    """A crude sampler (VE, 20 fixed Euler ODE steps) is rejected by the same criterion."""
    ref, null = reference
    sde = VESDE()
    res = sample(gm.score_fn(sde), sde, (N, 2), method="ode_euler", steps=20,
                 generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mmd(res.samples, ref) > _tol(null)


def test_nfe_and_reproducibility(gm):
    sde = VPSDE()
    sf = gm.score_fn(sde)
    counted = []

    def counting(x, t):
        counted.append(1)
        return sf(x, t)

    for method, steps, expect in [("euler_maruyama", 7, 8), ("reverse_diffusion", 7, 8),
                                  ("pc", 7, 15), ("ode_euler", 7, 8), ("ode_heun", 7, 15)]:
        counted.clear()
        a = sample(counting, sde, (5, 2), method=method, steps=steps,
                   generator=torch.Generator().manual_seed(3))
        b = sample(sf, sde, (5, 2), method=method, steps=steps,
                   generator=torch.Generator().manual_seed(3))
        assert a.nfe == expect == len(counted), method
        torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    counted.clear()
    r = sample(counting, sde, (5, 2), method="ode", generator=torch.Generator().manual_seed(3))
    assert r.nfe == len(counted) and r.samples.dtype == torch.float32
    r = sample(sf, sde, (5, 2), method="pc", steps=3, denoise=False)
    assert r.nfe == 6


def test_unknown_method_and_option(gm):
    sde = VPSDE()
    with pytest.raises(ValueError, match="valid names: .*euler_maruyama.*ode.*pc"):
        sample(gm.score_fn(sde), sde, (4, 2), method="ddim")
    with pytest.raises(ValueError, match="valid names: \\['snr', 'corrector_steps'\\]"):
        sample(gm.score_fn(sde), sde, (4, 2), method="pc", rtol=1e-3)
    with pytest.raises(ValueError, match="valid names: \\[\\]"):
        sample(gm.score_fn(sde), sde, (4, 2), method="euler_maruyama", snr=0.1)
    with pytest.raises(ValueError, match="steps"):
        sample(gm.score_fn(sde), sde, (4, 2), method="euler_maruyama", steps=0)


def test_time_grid_float64():
    grid = time_grid(VPSDE(), 10, 1e-3)
    assert grid.dtype == torch.float64 and grid[0] == 1.0 and grid[-1] == 1e-3 and len(grid) == 11
    assert bool((grid[1:] < grid[:-1]).all())


def test_rk45_matches_closed_form_and_scipy_counts():
    # dy/dt = -cos(t) y, y(0) = 1 -> y(5) = exp(-sin 5); scipy's RK45 needs 278 evaluations
    f = lambda t, y: -math.cos(t) * y  # noqa: E731
    r = odeint_rk45(f, torch.ones(3, dtype=torch.float64), 0.0, 5.0, rtol=1e-8, atol=1e-10)
    assert abs(r.y[0].item() - math.exp(-math.sin(5))) < 1e-7
    assert r.nfe == 278
    back = odeint_rk45(lambda t, y: -y, torch.ones(2, dtype=torch.float64), 2.0, 0.0,
                       rtol=1e-9, atol=1e-12)
    assert abs(back.y[0].item() - math.exp(2)) < 1e-7


def test_rk45_errors_name_the_problem():
    ones = torch.ones(2, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite state at t=0"):
        odeint_rk45(lambda t, y: y * float("nan"), ones, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="no convergence after 3 steps"):
        odeint_rk45(lambda t, y: -math.cos(t) * y, ones, 0.0, 50.0, rtol=1e-10, atol=1e-12,
                    max_steps=3)
    with pytest.raises(ValueError, match="rtol and atol must be positive"):
        odeint_rk45(lambda t, y: y, ones, 0.0, 1.0, rtol=0.0)
    same = odeint_rk45(lambda t, y: y, ones, 1.0, 1.0)
    assert same.y is ones and same.nfe == same.steps == same.rejected == 0


def test_write_samples_png(gm, tmp_path):
    from fpkern.sample import save_image_grid, write_samples

    sde = VPSDE()
    out = tmp_path / "scatter.png"
    res = write_samples(gm.score_fn(sde), sde, (64, 2), out, method="ode_euler", steps=20)
    assert out.stat().st_size > 1000 and res.samples.shape == (64, 2)
    grid = tmp_path / "grid.png"
    save_image_grid(torch.rand(5, 3, 8, 8) * 2 - 1, grid)
    from PIL import Image

    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)

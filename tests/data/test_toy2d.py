import math

import numpy as np
import pytest
import torch

from fpkern.data.toy2d import (EIGHT_GAUSSIANS_CENTRES, EIGHT_GAUSSIANS_STD, RING_RADII, TOY_SETS,
                               sample_toy)

N = 20_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_names():
    assert set(TOY_SETS) == {"checkerboard", "moons", "swissroll", "8gaussians", "rings"}


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_shape_dtype_finite_and_range(name):
    x = sample_toy(name, 1000, generator=_gen())
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.abs().max() < 5.0  # all sets are scaled into roughly [-4, 4]
    assert sample_toy(name, 0, generator=_gen()).shape == (0, 2)


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_deterministic_given_generator(name):
    a = TOY_SETS[name](500, _gen(3))
    b = TOY_SETS[name](500, generator=_gen(3))
    c = TOY_SETS[name](500, generator=_gen(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_global_rng_untouched(name):
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    TOY_SETS[name](100, generator=_gen())
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="checkerboard.*moons"):
        sample_toy("spirals", 10)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        sample_toy("moons", n)


def test_checkerboard_cells():
    x = sample_toy("checkerboard", N, generator=_gen())
    assert x.min() >= -4 and x.max() <= 4
    cell = torch.floor(x / 2).long()          # cell indices in -2..1 per axis
    assert ((cell.sum(1) % 2) == 0).all()     # only the "black" cells
    counts = torch.bincount((cell[:, 0] + 2) * 4 + (cell[:, 1] + 2), minlength=16)
    occupied = counts[counts > 0]
    assert occupied.numel() == 8
    assert (occupied.float() / N - 1 / 8).abs().max() < 0.015


def test_rings_radii_and_weights():
    x = sample_toy("rings", N, generator=_gen())
    r = x.norm(dim=1)
    radii = torch.tensor(RING_RADII)
    dist, ring = (r[:, None] - radii[None]).abs().min(1)
    assert (dist < 5 * 0.08).float().mean() > 0.999
    assert abs(float(dist.pow(2).mean().sqrt()) - 0.08) < 0.01  # radial noise std
    frac = torch.bincount(ring, minlength=4).float() / N
    assert (frac - 0.25).abs().max() < 0.02


def test_8gaussians_centres_and_std():
    x = sample_toy("8gaussians", N, generator=_gen())
    c = EIGHT_GAUSSIANS_CENTRES
    assert torch.allclose(c.norm(dim=1), torch.full((8,), 4 / math.sqrt(2)))
    k = torch.cdist(x, c).argmin(1)
    frac = torch.bincount(k, minlength=8).float() / N
    assert (frac - 1 / 8).abs().max() < 0.015
    resid = x - c[k]
    assert torch.allclose(resid.mean(0), torch.zeros(2), atol=0.02)
    assert torch.allclose(resid.std(0), torch.full((2,), EIGHT_GAUSSIANS_STD), rtol=0.05)


def _moments_close(a, b, atol):
    assert np.allclose(a.mean(0), b.mean(0), atol=atol), (a.mean(0), b.mean(0))
    assert np.allclose(np.cov(a.T), np.cov(b.T), atol=atol), (np.cov(a.T), np.cov(b.T))


def test_moons_matches_sklearn_reference():
    from sklearn.datasets import make_moons

    ref = make_moons(N, noise=0.1, random_state=0)[0] * 2 + np.array([-1.0, -0.2])
    x = sample_toy("moons", N, generator=_gen()).double().numpy()
    _moments_close(x, ref, atol=0.05)
    # every point is within noise of one of the two unit half circles (scaled by 2)
    p = (x - np.array([-1.0, -0.2])) / 2
    d_upper = np.abs(np.hypot(p[:, 0], p[:, 1]) - 1)
    d_lower = np.abs(np.hypot(p[:, 0] - 1, p[:, 1] - 0.5) - 1)
    assert (np.minimum(d_upper, d_lower) < 0.5).all()


def test_swissroll_matches_sklearn_reference():
    from sklearn.datasets import make_swiss_roll

    ref = make_swiss_roll(N, noise=1.0, random_state=0)[0][:, [0, 2]] / 5
    x = sample_toy("swissroll", N, generator=_gen()).double().numpy()
    _moments_close(x, ref, atol=0.06)

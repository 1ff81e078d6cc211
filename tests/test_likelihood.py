"""Probability-flow likelihood against the exact mixture log-density (docs/MATH.md 6, 7)."""

import math

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.likelihood import bits_per_dim, dequantize_to_range, log_likelihood, nll_to_bpd
from fpkern.sde import SubVPSDE, VESDE, VPSDE

B = 16


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5]).to(dtype=torch.float64)


@pytest.fixture(scope="module")
def x(gm):
    return gm.sample(B, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE, SubVPSDE])
def test_exact_divergence_matches_log_density(gm, x, sde_cls):
    sde = sde_cls()
    res = log_likelihood(gm.score_fn(sde), sde, x, probes="exact", rtol=1e-6, atol=1e-6)
    err = (res.logp - gm.log_prob(x)).abs().mean().item() / gm.dim
    print(f"{sde_cls.__name__}: mean |error| {err:.2e} nats/dim, nfe {res.nfe}")
    assert err < 0.01
    # the remaining error is the prior mismatch q_T != N(0, prior_std^2): with the exact q_T
    # in place of the prior the ODE solve itself is checked to the solver tolerance
    tT = torch.full((B,), sde.T, dtype=torch.float64)
    teps = torch.full((B,), 1e-5, dtype=torch.float64)
    corrected = res.delta_logp + gm.log_prob(res.z, tT, sde)
    torch.testing.assert_close(corrected, gm.log_prob(x, teps, sde), rtol=0, atol=2e-4)


def test_hutchinson_path_with_spanning_probes(gm, x):
    """In D = 2 the Rademacher pair (1, 1), (1, -1) gives the exact trace, so the Hutchinson
    path with these probes fixed along the solve reproduces the exact path."""
    sde = VPSDE()
    V = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)[:, None, :].expand(2, B, 2)
    h = log_likelihood(gm.score_fn(sde), sde, x, probes=V.clone(), rtol=1e-6, atol=1e-6)
    e = log_likelihood(gm.score_fn(sde), sde, x, probes=None, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.logp, e.logp, rtol=0, atol=1e-9)


def test_hutchinson_random_probes_unbiased_on_average(gm, x):
    sde = VPSDE()
    res = log_likelihood(gm.score_fn(sde), sde, x, probes=16, probe_dist="rademacher",
                         rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(0))
    mean_err = (res.logp - gm.log_prob(x)).mean().item() / gm.dim
    print(f"Hutchinson K=16: batch-mean error {mean_err:.2e} nats/dim")
    assert abs(mean_err) < 0.05


def test_nll_to_bpd_offsets():
    logp = torch.tensor([0.0, -100.0], dtype=torch.float64)
    torch.testing.assert_close(nll_to_bpd(logp, 10), torch.tensor([7.0, 7 + 100 / (10 * math.log(2))],
                                                                  dtype=torch.float64))
    assert nll_to_bpd(torch.tensor(0.0), 10, (0.0, 1.0)).item() == 8.0
    # the uniform density on [-1, 1]^D is 256^-D on the 8-bit grid: exactly 8 bits/dim
    D = 12
    assert abs(nll_to_bpd(torch.tensor(-D * math.log(2.0)), D).item() - 8.0) < 1e-12
    with pytest.raises(ValueError):
        nll_to_bpd(logp, 10, (1.0, 1.0))


def test_bits_per_dim_gaussian_images():
    """A Gaussian score on 3x2x2 images: bpd equals the closed form on the same dequantised
    data (the generator's first draw), within 1e-3 bits/dim."""
    D, s0 = 12, 0.5
    gauss = GaussianMixture([1.0], torch.zeros(1, D, dtype=torch.float64), [s0])
    sde = VPSDE()
    images = torch.randint(0, 256, (6, 3, 2, 2), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    res = bits_per_dim(gauss.score_fn(sde), sde, images, probes="exact", rtol=1e-6, atol=1e-6,
                       generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    xq = dequantize_to_range(images, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert bool(((xq + 1) * 128).floor().to(torch.uint8).eq(images).all())
    teps = torch.full((6,), 1e-5, dtype=torch.float64)
    expected = -gauss.log_prob(xq, teps, sde) / (D * math.log(2)) + 7
    print(f"bpd {res.bpd.tolist()} expected {expected.tolist()}")
    torch.testing.assert_close(res.bpd, expected, rtol=0, atol=1e-3)


def test_bad_probes(gm, x):
    sde = VPSDE()
    with pytest.raises(ValueError, match="probes"):
        log_likelihood(gm.score_fn(sde), sde, x, probes="hutch")
    with pytest.raises(ValueError, match="probe_dist"):
        log_likelihood(gm.score_fn(sde), sde, x, probes=1, probe_dist="sphere")


def test_evaluate_bpd_synthetic(tmp_path):
    from fpkern.evaluate import evaluate_bpd

    D = 12
    gauss = GaussianMixture([1.0], torch.zeros(1, D, dtype=torch.float64), [0.5])
    sde = VPSDE()
    images = torch.randint(0, 256, (5, 3, 2, 2), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8)
    bpd = evaluate_bpd(gauss.score_fn(sde), sde, images, batch_size=2, probes=1, rtol=1e-4,
                       atol=1e-4, dtype=torch.float64, progress=False)
    assert bpd.shape == (5,) and bool(torch.isfinite(bpd).all())
    assert 5 < bpd.mean().item() < 12

"""The damped second-order Langevin corrector, pc_lml (docs/MATH.md 12), against exact answers:
Gaussian targets (linear score, constant Jacobian), float64 autograd and the mixture oracle."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fpkern.data.mixture import GaussianMixture
from fpkern.diagnostics import mmd
from fpkern.sampling import (_langevin, _lml, _lml_move, _lml_preconditioner, _orthonormal,
                             _as_rows, _score_and_jvps, sample)
from fpkern.sde import VESDE, VPSDE

D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5]).to(dtype=D64)


def _gaussian(D=3, seed=0, eigs=(4.0, 1.0, 0.25)):
    """(m, Sigma, H = Sigma^-1, score) of an anisotropic N(m, Sigma); the score ignores t."""
    g = _gen(seed)
    Qm = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=D64)).Q
    H = Qm @ torch.diag(torch.tensor(eigs, dtype=D64)) @ Qm.T
    m = torch.randn(D, generator=g, dtype=D64)
    return m, torch.linalg.inv(H), H, (lambda x, t: -(x - m) @ H)


def _whitened_cov(x, m, H):
    """Sigma^-1/2 Cov(x) Sigma^-1/2 (identity for the target) and the whitened mean error."""
    e, U = torch.linalg.eigh(H)
    root = U @ torch.diag(e.sqrt()) @ U.T
    y = (x - m) @ root
    return torch.cov(y.T), y.mean(0)


def _jacobian_rows(score_fn, x, t):
    """Per-sample Jacobians [B, D, D] of score_fn by float64 reverse-mode autograd."""
    full = torch.autograd.functional.jacobian(lambda y: score_fn(y, t), x)   # [B, D, B, D]
    return torch.stack([full[b, :, b, :] for b in range(x.shape[0])])


# ---- the J v products ------------------------------------------------------------------
def _no_jet_rule_score(x, t):
    A = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -0.7], [0.0, 0.4, 1.1]], dtype=x.dtype)
    return -x + 0.3 * F.softplus(x @ A, beta=2.0) * (1 + t[:, None])


def _mlp_score():
    from fpkern.models import MLP, ScoreFn
    torch.manual_seed(0)
    return ScoreFn(MLP(3, width=16, depth=2), VPSDE()).double()


@pytest.mark.parametrize("kind", ["mixture", "mlp", "no_jet_rule"])
def test_score_and_jvps_match_autograd(kind):
    """One pass gives s and exact J v_i (jet path; torch.func for a score without jet rules)."""
    g = _gen(1)
    x = torch.randn(4, 3, generator=g, dtype=D64)
    t = torch.full((4,), 0.4, dtype=D64)
    if kind == "mixture":
        sf = GaussianMixture.random(3, 3, generator=_gen(2)).to(dtype=D64).score_fn(VPSDE())
    else:
        sf = _mlp_score() if kind == "mlp" else _no_jet_rule_score
    V = torch.randn(2, 4, 3, generator=g, dtype=D64)
    with torch.no_grad():
        s, JV = _score_and_jvps(sf, x, t, V)
    J = _jacobian_rows(sf, x, t)
    torch.testing.assert_close(s, sf(x, t).detach(), rtol=1e-12, atol=1e-12)
    for i in range(2):
        ref = torch.einsum("bij,bj->bi", J, V[i])
        torch.testing.assert_close(JV[i], ref, rtol=1e-10, atol=1e-12)


# ---- the preconditioner ------------------------------------------------------------------
def _dense_reference(H, Q, lam):
    """lam (lam I + (P H P)_+)^-1 and its symmetric root from D x D eigendecompositions."""
    P = Q @ Q.T
    e, U = torch.linalg.eigh(P @ H @ P)
    A = lam * torch.eye(len(H), dtype=D64) + U @ torch.diag(e.clamp(min=0)) @ U.T
    ea, Ua = torch.linalg.eigh(lam * torch.linalg.inv(A))
    return Ua @ torch.diag(ea) @ Ua.T, Ua @ torch.diag(ea.sqrt()) @ Ua.T


@pytest.mark.parametrize("eigs", [(4.0, 1.0, 0.25, 2.0, 0.5), (3.0, -2.0, 0.5, 1.0, -0.3)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_preconditioner_is_the_damped_inverse_and_its_root(eigs, k):
    """M = lam (lam I + H_k)^-1 with H_k the Rayleigh-Ritz curvature on span(Q), negative
    curvature clipped; M^(1/2) its symmetric square root; also for an indefinite H."""
    D, lam = 5, 0.7
    _, _, H, sf = _gaussian(D, seed=3, eigs=eigs)
    x = torch.randn(2, D, generator=_gen(4), dtype=D64)
    Q = _orthonormal(torch.randn(k, 2, D, generator=_gen(5), dtype=D64))
    with torch.no_grad():
        _, JQ = _score_and_jvps(sf, x, torch.zeros(2, dtype=D64), _as_rows(Q, x))
    pre = _lml_preconditioner(Q, JQ, lam)
    eye = torch.eye(D, dtype=D64)
    for b in range(2):
        M_ref, R_ref = _dense_reference(H, Q[b], lam)
        cols = eye[:, None, :].expand(D, 2, D)
        M = torch.stack([pre.apply(c)[b] for c in cols], 1)
        R = torch.stack([pre.apply(c, 0.5)[b] for c in cols], 1)
        torch.testing.assert_close(M, M_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(R, R_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(R @ R, M, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gaussian_step_keeps_the_law_to_second_order(k):
    """On N(m, Sigma) with directions independent of x, one step from the target law has
    mean m and covariance Sigma + eps^2 M H M exactly: the O(eps) terms cancel, so the
    corrector's continuous-time limit leaves the target invariant (MATH.md 12.3)."""
    D, eps = 3, 0.3
    m, Sigma, H, sf = _gaussian(D)
    Q = _orthonormal(torch.randn(k, 1, D, generator=_gen(6), dtype=D64))
    x0 = m[None]
    with torch.no_grad():
        _, JQ = _score_and_jvps(sf, x0, torch.zeros(1, dtype=D64), _as_rows(Q, x0))
    pre = _lml_preconditioner(Q, JQ, lam=0.5)
    eye = torch.eye(D, dtype=D64)
    zero = torch.zeros(1, D, dtype=D64)
    step = lambda x, z: _lml_move(x, sf(x, None), pre, z, eps)  # noqa: E731
    torch.testing.assert_close(step(x0, zero), x0, rtol=0, atol=1e-14)      # m is a fixed point
    B = torch.stack([step(x0 + e[None], zero)[0] - m for e in eye], 1)      # drift matrix
    N = torch.stack([step(x0, e[None])[0] - m for e in eye], 1)             # noise matrix
    M = torch.stack([pre.apply(e[None])[0] for e in eye], 1)
    torch.testing.assert_close(B @ Sigma @ B.T + N @ N.T, Sigma + eps ** 2 * M @ H @ M,
                               rtol=1e-12, atol=1e-12)


def test_full_rank_chain_has_the_predicted_law():
    """The corrector loop itself (snr rule, damping scale, random directions, jet passes) at
    fixed t on an anisotropic Gaussian: with k = D and lambda -> 0 it is Newton-Langevin, whose
    stationary law under the snr rule is N(m, (1 + snr^2) Sigma) (MATH.md 12.3), reached from
    a far start in 40 steps; the plain Langevin corrector, in the same steps, is not there."""
    n, snr = 10000, 0.5
    m, Sigma, H, sf = _gaussian()
    x0 = m + 3 * torch.randn(n, 3, generator=_gen(7), dtype=D64)
    sde = VESDE()
    with torch.no_grad():
        x, _ = _lml(sf, sde, x0, 0.5, 0.49, _gen(8), snr, 40, 3, 1e-6, None, _gen(9))
        plain = _langevin(sf, sde, x0, 0.5, 0.49, _gen(8), snr, 40)
    C, mean = _whitened_cov(x, m, H)
    assert float(mean.abs().max()) < 4 / math.sqrt(n) * math.sqrt(1 + snr ** 2)
    torch.testing.assert_close(C, (1 + snr ** 2) * torch.eye(3, dtype=D64), rtol=0, atol=0.07)
    C_plain, _ = _whitened_cov(plain, m, H)
    assert float((torch.linalg.eigvalsh(C_plain) - (1 + snr ** 2)).abs().max()) > 0.3


def test_low_rank_chain_preserves_the_target():
    """k = 1 < D random directions, damping 1: started at N(m, Sigma), 50 steps keep it
    (whitened mean and covariance within the sampling error and the O(eps) step bias)."""
    n, snr = 10000, 0.08
    m, Sigma, H, sf = _gaussian()
    L = torch.linalg.cholesky(Sigma)
    x0 = m + torch.randn(n, 3, generator=_gen(9), dtype=D64) @ L.T
    with torch.no_grad():
        x, _ = _lml(sf, VESDE(), x0, 0.5, 0.49, _gen(10), snr, 50, 1, 1.0, None, _gen(11))
    C, mean = _whitened_cov(x, m, H)
    assert float(mean.abs().max()) < 4 / math.sqrt(n)
    torch.testing.assert_close(C, torch.eye(3, dtype=D64), rtol=0, atol=0.07)


def test_large_damping_is_the_plain_langevin_corrector(gm):
    """lambda -> infinity: M -> I, and with the same noise the step is _langevin's (the snr
    rule is invariant to the scale of M); at damping 1 it is not."""
    sde = VPSDE()
    sf = gm.score_fn(sde)
    x = gm.sample(64, generator=_gen(11)) * 1.3
    V = torch.randn(2, 64, 2, generator=_gen(12), dtype=D64)
    with torch.no_grad():
        ref = _langevin(sf, sde, x, 0.5, 0.49, _gen(13), 0.16, 1)
        big, _ = _lml(sf, sde, x, 0.5, 0.49, _gen(13), 0.16, 1, 2, 1e12, V)
        one, _ = _lml(sf, sde, x, 0.5, 0.49, _gen(13), 0.16, 1, 2, 1.0, V)
    torch.testing.assert_close(big, ref, rtol=1e-9, atol=1e-10)
    assert float((one - ref).abs().max()) > 1e-3


# ---- the sampler -------------------------------------------------------------------------
def test_nfe_counts_rows_and_runs_are_reproducible(gm):
    """nfe = steps (1 + corrector_steps (1 + rank)) + 1 forward-equivalents, from
    steps (1 + corrector_steps) + 1 calls of score_fn (one jet pass per corrector step)."""
    sde = VPSDE()
    sf = gm.score_fn(sde)
    calls = []

    def counting(x, t):
        calls.append(1)
        return sf(x, t)

    for directions in ("random", "power"):
        calls.clear()
        a = sample(counting, sde, (5, 2), method="pc_lml", steps=7, corrector_steps=2, rank=2,
                   directions=directions, generator=_gen(3), dtype=D64)
        b = sample(sf, sde, (5, 2), method="pc_lml", steps=7, corrector_steps=2, rank=2,
                   directions=directions, generator=_gen(3), dtype=D64)
        assert a.nfe == 7 * (1 + 2 * 3) + 1 and len(calls) == 7 * (1 + 2) + 1
        torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    r = sample(sf, sde, (5, 2), method="pc_lml", steps=3, corrector_steps=0, denoise=False)
    assert r.nfe == 3


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE])
def test_pc_lml_matches_the_mixture(gm, sde_cls):
    """rank 2 = D: the full damped Hessian; 2400 samples pass test_sampling's MMD criterion."""
    sde = sde_cls()
    n, g = 2400, _gen(7)
    ref = gm.sample(n, generator=g)
    null = max(abs(mmd(gm.sample(n, generator=g), ref)) for _ in range(3))
    res = sample(gm.score_fn(sde), sde, (n, 2), method="pc_lml", steps=100, rank=2,
                 generator=_gen(11), dtype=D64)
    assert torch.isfinite(res.samples).all()
    assert mmd(res.samples, ref) < 4 * max(null, 2.5e-4)


def test_full_rank_does_not_depend_on_the_directions(gm):
    """With rank = D the preconditioner depends only on span(Q) = R^D: "random" and "power"
    give the same samples (the other draws are shared), and the draws are pc's: with a huge
    damping pc_lml reproduces pc (common random numbers, _direction_generator)."""
    sde = VESDE()
    run = lambda **o: sample(gm.score_fn(sde), sde, (64, 2), steps=20,  # noqa: E731
                             generator=_gen(5), dtype=D64, **o).samples
    rand = run(method="pc_lml", rank=2)
    torch.testing.assert_close(run(method="pc_lml", rank=2, directions="power"), rand,
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(run(method="pc_lml", rank=1, damping=1e12), run(method="pc"),
                               rtol=1e-9, atol=1e-10)
    assert float((rand - run(method="pc")).abs().max()) > 1e-3


@pytest.mark.parametrize("options,match", [
    ({"rank": 0}, "rank must be an int in \\[1, D=2\\]"),
    ({"rank": 3}, "rank must be an int in \\[1, D=2\\]"),
    ({"rank": 1.0}, "rank must be an int"),
    ({"rank": True}, "rank must be an int"),
    ({"damping": 0.0}, "damping must be a positive finite number"),
    ({"damping": -1.0}, "damping must be a positive finite number"),
    ({"damping": math.inf}, "damping must be a positive finite number"),
    ({"damping": math.nan}, "damping must be a positive finite number"),
    ({"damping": True}, "damping must be a positive finite number"),
    ({"damping": "1"}, "damping must be a positive finite number"),
    ({"directions": "score"}, "unknown directions 'score'; valid names: \\['random', 'power'\\]"),
    ({"snr": 0.0}, "snr must be positive"),
    ({"corrector_steps": -1}, "corrector_steps must be a non-negative int"),
    ({"lml_rank": 2}, "unknown option\\(s\\) \\['lml_rank'\\] for method 'pc_lml'; valid names: "
                      "\\['snr', 'corrector_steps', 'rank', 'damping', 'directions'\\]"),
])
def test_bad_options_are_refused(gm, options, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample(gm.score_fn(sde), sde, (4, 2), method="pc_lml", steps=2, **options)


# ---- the study script --------------------------------------------------------------------
def test_lml_corrector_study_smoke(experiment, tmp_path):
    study = experiment("lml_corrector")
    summary, comps = study.main(["--seeds", "2", "--n", "100", "--nfe", "16", "--data", "mix2",
                                 "--sdes", "vp", "--damping", "1", "10", "--no-costs",
                                 "--out", str(tmp_path)])
    by = {(s["config"], s["budget"]): s for s in summary}
    assert by[("lml1", 16)]["nfe"] == 5 * (1 + 2) + 1 and by[("lml1", 16)]["steps"] == 5
    assert by[("L2", 16)]["nfe"] == 16 and by[("none", 16)]["nfe"] == 17
    assert ("lml2 damping 10", 16) in by and all(s["seeds"] == 2 for s in summary)
    assert {(c["a"], c["b"]) for c in comps} >= {("lml1", "L2"), ("lml1", "L1g1"),
                                                  ("lml2", "L3"), ("lml1p", "none")}
    saved = json.loads((tmp_path / "lml_corrector.json").read_text())
    assert saved["command"].startswith("python experiments/lml_corrector.py --seeds 2")
    md = (tmp_path / "lml_corrector.md").read_text()
    assert "### mix2: sw2" in md and "| lml1 (5) |" in md and "## Conclusion" in md

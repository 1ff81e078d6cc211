"""fpkern.losses: DSM formula, FP weighting and D^m normalisation, t in [eps, T], bad options."""

import pytest
import torch

from fpkern.losses import DSMLoss, FPLoss, sample_time
from fpkern.ops import fpe_residual, hutchinson_divergence
from fpkern.sde import SubVPSDE, VESDE, VPSDE


class Field(torch.nn.Module):
    """A smooth non-exact score field s(x, t) = -x / (1 + t) + w tanh(x), x [B, ...]."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x, t):
        return -x / (1 + t.reshape(-1, *([1] * (x.dim() - 1)))) + self.w * torch.tanh(x)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=["ve", "vp", "subvp"])
@pytest.mark.parametrize("weighting", ["ll", "score_sde"])
def test_dsm_matches_formula(sde, weighting):
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = Field()
    out = DSMLoss(sde, weighting=weighting, eps=1e-5)(f, x, generator=torch.Generator().manual_seed(1))
    # redraw the same t and z and compute the formula by hand
    g = torch.Generator().manual_seed(1)
    t = 1e-5 + (sde.T - 1e-5) * torch.rand(6, generator=g, dtype=torch.float64)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    std = sde.sigma(t)[:, None]
    xt = sde.alpha(t)[:, None] * x + std * z
    lam = sde.g2(t) if weighting == "ll" else sde.sigma(t) ** 2
    want = lam * ((f(xt, t) + z / std) ** 2).mean(1)
    torch.testing.assert_close(out.t, t)
    torch.testing.assert_close(out.xt, xt)
    torch.testing.assert_close(out.loss, want)
    assert out.loss.shape == (6,)


@pytest.mark.parametrize("weighting", ["constant", "convention", "ll"])
@pytest.mark.parametrize("m", [1.0, 2.0, 3.0])
def test_fp_vec_weighting_and_normalisation(weighting, m):
    sde = VPSDE()
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(3))
    fp = FPLoss(sde, preset="paper", alpha=0.5, beta=0.0, m=m, weighting=weighting, method="exact")
    out = fp(f, x, dsm=dsm)
    r = fpe_residual(f, dsm.xt, dsm.t, sde, method="exact")
    w = {"constant": torch.ones_like(dsm.t), "convention": sde.g(dsm.t), "ll": sde.g2(dsm.t)}[weighting]
    want = w * r.flatten(1).norm(dim=1) ** m / 6 ** m          # D = 2 * 3
    torch.testing.assert_close(out.vec, want)
    torch.testing.assert_close(out.loss, 0.5 * want.mean())
    assert float(out.scalar) == 0.0


def test_fp_scalar_term_reuses_dsm_score():
    sde = VESDE()
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(5))
    calls = []

    def counted(y, t):
        calls.append(y.shape)
        return f(y, t)

    fp = FPLoss(sde, preset="paper", alpha=0.0, beta=0.25, probes=2)
    out = fp(counted, x, dsm=dsm, generator=torch.Generator().manual_seed(6))
    div = hutchinson_divergence(f, dsm.xt, dsm.t, probes=2, generator=torch.Generator().manual_seed(6))
    fc, g2 = sde.f(dsm.t), sde.g2(dsm.t)
    h = 0.5 * g2 * (div + dsm.s.pow(2).sum(1)) - fc * (dsm.xt * dsm.s).sum(1)
    torch.testing.assert_close(out.scalar, h.norm())
    torch.testing.assert_close(out.loss, 0.25 * h.norm())
    assert len(calls) == 1  # only the divergence pass: s comes from the DSM forward


@pytest.mark.parametrize("m", [2.0, 1.5])
def test_fused_laplacian_loss_takes_both_terms_from_one_jet_pass(m):
    """form 'laplacian', method 'fused': vec = w |r_V|^m / D^m and the scalar term with the
    same probes V, from a single call of the score function on Jets (plus none on tensors:
    s is the DSM forward's)."""
    from fpkern.jet import Jet
    from fpkern.ops import forward_mode
    from fpkern.ops.probes import resolve_probes
    sde = VPSDE()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(8))
    calls = []

    def counted(y, t):
        calls.append(isinstance(y, Jet))
        return f(y, t)

    fp = FPLoss(sde, preset="paper", alpha=0.3, beta=0.2, m=m, form="laplacian", method="fused", probes=2)
    out = fp(counted, x, dsm=dsm, generator=torch.Generator().manual_seed(9))
    assert calls == [True]
    V = resolve_probes(2, dsm.xt, "rademacher", torch.Generator().manual_seed(9))
    r = forward_mode.residual(f, dsm.xt, dsm.t, sde, "laplacian", V)
    want_vec = sde.g2(dsm.t) * r.flatten(1).norm(dim=1) ** m / 3 ** m
    s, jv = forward_mode.directional(f, dsm.xt, dsm.t, V)
    div = (V * jv).flatten(2).sum(2).mean(0)
    h = 0.5 * sde.g2(dsm.t) * (div + s.pow(2).sum(1)) - sde.f(dsm.t) * (dsm.xt * s).sum(1)
    torch.testing.assert_close(out.vec, want_vec)
    torch.testing.assert_close(out.scalar, h.norm())
    torch.testing.assert_close(out.loss, 0.3 * want_vec.mean() + 0.2 * h.norm())
    (g,) = torch.autograd.grad(out.loss, [f.w])
    (g_want,) = torch.autograd.grad(0.3 * want_vec.mean() + 0.2 * h.norm(), [f.w])
    torch.testing.assert_close(g, g_want)


def test_fp_points_and_subset():
    sde = VPSDE()
    x = torch.rand(8, 3, dtype=torch.float64)
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(0))
    for pts in ("pert", "x", "random"):
        out = FPLoss(sde, preset="paper", fp_points=pts, batch=3, method="exact")(f, x, dsm=dsm,
                                                                  generator=torch.Generator().manual_seed(1))
        assert out.vec.shape == (3,) and torch.isfinite(out.loss)
    yy, tt, _ = FPLoss(sde, preset="paper", fp_points="random").points(x, None, generator=torch.Generator().manual_seed(2))
    assert float(yy.min()) >= float(x.min()) and float(yy.max()) <= float(x.max())
    assert float(tt.min()) >= 1e-5


def test_time_in_eps_T():
    g = torch.Generator().manual_seed(0)
    t = sample_time(100000, eps=0.25, T=1.0, generator=g)
    assert float(t.min()) >= 0.25 and float(t.max()) <= 1.0
    assert float(t.min()) < 0.26 and float(t.max()) > 0.99
    out = DSMLoss(VESDE(), eps=0.5)(Field(), torch.randn(1000, 2, dtype=torch.float64),
                                    generator=g)
    assert float(out.t.min()) >= 0.5


@pytest.mark.parametrize("kwargs, name", [
    (dict(weighting="nope"), "constant"), (dict(fp_points="nope"), "pert"),
    (dict(form="nope"), "laplacian"), (dict(method="nope"), "fused"),
    (dict(probe_dist="nope"), "rademacher"),
])
def test_fp_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=f"valid names.*{name}"):
        FPLoss(VPSDE(), **kwargs)


def test_dsm_bad_options():
    with pytest.raises(ValueError, match="valid names.*score_sde"):
        DSMLoss(VPSDE(), weighting="nope")
    with pytest.raises(ValueError):
        FPLoss(VPSDE(), m=0)
    with pytest.raises(ValueError):
        FPLoss(VPSDE(), probes=0)


def test_projected_estimator_is_unbiased_for_the_vector_term():
    """With estimator 'projected', vec = w (u . r)^2 / D^2: its mean over directions u is the
    vector estimator's w |r|^2 / D^2 for the same probes."""
    sde = VPSDE()
    f = Field()
    x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = x.expand(3000, 3).contiguous()
    t = torch.full((3000,), 0.3, dtype=torch.float64)
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(5))
    dsm = dsm._replace(t=t, xt=x)                    # one point, many directions u
    fp = FPLoss(sde, preset="paper", alpha=1.0, beta=0.0, estimator="projected")
    proj = fp(f, x, dsm=dsm, generator=torch.Generator().manual_seed(6)).vec
    exact = FPLoss(sde, preset="paper", alpha=1.0, beta=0.0, method="exact")(f, x[:1], dsm=dsm).vec[0]
    # probes: Rademacher, and for this field J is diagonal so div is exact for any probe
    sem = proj.std() / 3000 ** 0.5
    assert abs(proj.mean() - exact) < 5 * sem, (proj.mean(), exact, sem)


def test_projected_estimator_needs_the_div_form_and_m_2():
    with pytest.raises(ValueError, match="needs form 'div', m 2"):
        FPLoss(VPSDE(), estimator="projected", form="laplacian")
    with pytest.raises(ValueError, match="needs form 'div', m 2"):
        FPLoss(VPSDE(), estimator="projected", m=1)
    with pytest.raises(ValueError, match="valid names.*projected"):
        FPLoss(VPSDE(), estimator="nope")


def _counting(f):
    from fpkern.jet import Jet
    calls = []

    def counted(y, t):
        calls.append("jet" if isinstance(y, Jet) else "plain")
        return f(y, t)

    return counted, calls


@pytest.mark.parametrize("estimator", ["vector", "projected"])
def test_fused_div_loss_takes_every_term_from_the_residuals_pass(estimator):
    """form 'div', method 'fused': vec and the scalar term (its divergence with the
    residual's probes) from one call of the score function on Jets; the gradient of the
    vector estimator's recomputes that pass once more in the backward."""
    from fpkern.ops import forward_mode
    from fpkern.ops.probes import resolve_probes
    sde = VPSDE()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(8))
    counted, calls = _counting(f)
    fp = FPLoss(sde, preset="paper", alpha=0.3, beta=0.2, probes=2, estimator=estimator)
    out = fp(counted, x, dsm=dsm, generator=torch.Generator().manual_seed(9))
    assert calls == ["jet"]
    g = torch.Generator().manual_seed(9)
    V = resolve_probes(2, dsm.xt, "rademacher", g)
    r = forward_mode.residual(f, dsm.xt, dsm.t, sde, "div", V)
    if estimator == "projected":
        U = resolve_probes(1, dsm.xt, "rademacher", g)[0]
        sq = (U * r).sum(1) ** 2
    else:
        sq = r.pow(2).sum(1)
    want_vec = sde.g2(dsm.t) * sq / 3 ** 2
    s, jv = forward_mode.directional(f, dsm.xt, dsm.t, V)
    div = (V * jv).flatten(2).sum(2).mean(0)
    h = 0.5 * sde.g2(dsm.t) * (div + s.pow(2).sum(1)) - sde.f(dsm.t) * (dsm.xt * s).sum(1)
    torch.testing.assert_close(out.vec, want_vec)
    torch.testing.assert_close(out.scalar, h.norm())
    (grad,) = torch.autograd.grad(out.loss, [f.w])
    (g_want,) = torch.autograd.grad(0.3 * want_vec.mean() + 0.2 * h.norm(), [f.w])
    torch.testing.assert_close(grad, g_want)
    assert calls == (["jet"] if estimator == "projected" else ["jet", "jet"])


@pytest.mark.parametrize("config, plain", [
    (dict(), None),                                          # div, vector: the default
    (dict(estimator="projected"), None),
    (dict(batch=4), 2),                                      # FP on part of the batch
    (dict(form="laplacian"), 6),                             # needs s for its direction
    (dict(method="naive"), 6),
    (dict(fp_points="x"), 6),
    (dict(alpha=0.0), 6),
])
def test_with_dsm_equals_the_two_terms_apart(config, plain):
    """FPLoss.with_dsm = DSMLoss then FPLoss(dsm=...): same values and parameter gradients,
    the same random numbers drawn. Where the FP pass sees the DSM's points in the div form,
    the DSM term takes s from it: the score function runs on plain tensors only for the
    samples the FP terms leave out (`plain`: that batch size, None: never)."""
    from fpkern.models import MLP, ScoreFn
    torch.manual_seed(0)
    sde = VPSDE()
    net = ScoreFn(MLP(3, width=16, depth=2), sde).double()
    params = [p for p in net.parameters() if p.requires_grad]
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dsm = DSMLoss(sde)
    fp = FPLoss(sde, preset="paper", **{"alpha": 0.3, "beta": 0.2, "probes": 2, **config})
    assert fp.shares_dsm_forward() == (plain != 6)
    seen = []

    def counted(y, t):
        from fpkern.jet import Jet
        if not isinstance(y, Jet):
            seen.append(y.shape[0])
        return net(y, t)

    g1 = torch.Generator().manual_seed(2)
    d1, f1 = fp.with_dsm(dsm, counted, x, generator=g1)
    assert seen[:1] == ([] if plain is None else [plain])
    g2 = torch.Generator().manual_seed(2)
    d2 = dsm(net, x, generator=g2)
    f2 = fp(net, x, dsm=d2, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    for a, b in [(d1.loss, d2.loss), (d1.s, d2.s), (f1.vec, f2.vec), (f1.scalar, f2.scalar)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(d1.loss.mean() + f1.loss, params)
    want = torch.autograd.grad(d2.loss.mean() + f2.loss, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * b.abs().max().item())


@pytest.mark.parametrize("weighting", ["constant", "convention", "ll"])
@pytest.mark.parametrize("m", [1.0, 2.0, 3.0])
def test_fp_vec_dim_normalisation(weighting, m):
    """normalize 'dim': vec = w (|r|^2 / D)^(m/2) = w |r|^m / D^(m/2), with D the size of a
    sample of any shape (here 2 x 3); D^(m/2) times the paper's value."""
    sde = VPSDE()
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(3))
    fp = FPLoss(sde, preset="paper", alpha=0.5, beta=0.0, m=m, weighting=weighting, method="exact",
                normalize="dim")
    out = fp(f, x, dsm=dsm)
    r = fpe_residual(f, dsm.xt, dsm.t, sde, method="exact")
    w = {"constant": torch.ones_like(dsm.t), "convention": sde.g(dsm.t),
         "ll": sde.g2(dsm.t)}[weighting]
    want = w * (r.flatten(1).pow(2).sum(1) / 6) ** (m / 2)
    torch.testing.assert_close(out.vec, want)
    torch.testing.assert_close(out.loss, 0.5 * want.mean())
    paper = FPLoss(sde, preset="paper", alpha=0.5, beta=0.0, m=m, weighting=weighting, method="exact")(
        f, x, dsm=dsm)
    torch.testing.assert_close(out.vec, 6 ** (m / 2) * paper.vec)


def test_fp_consistent_scalar_term_from_the_dsm_score():
    """scalar 'consistent': mean(e)^2 - var(e) / n with e = (h - D f) / D, h from the DSM
    forward's s and the Hutchinson divergence (as the paper's term, which is |h|_2)."""
    sde = VPSDE()
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    f = Field()
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(5))
    fp = FPLoss(sde, preset="paper", alpha=0.0, beta=0.25, probes=2, scalar="consistent")
    out = fp(f, x, dsm=dsm, generator=torch.Generator().manual_seed(6))
    div = hutchinson_divergence(f, dsm.xt, dsm.t, probes=2,
                                generator=torch.Generator().manual_seed(6))
    fc, g2 = sde.f(dsm.t), sde.g2(dsm.t)
    h = 0.5 * g2 * (div + dsm.s.pow(2).sum(1)) - fc * (dsm.xt * dsm.s).sum(1)
    e = (h - 4 * fc) / 4
    torch.testing.assert_close(out.scalar, e.mean() ** 2 - e.var() / 7)
    torch.testing.assert_close(out.loss, 0.25 * (e.mean() ** 2 - e.var() / 7))

"""method="fused" (collapsed Taylor mode through fpkern.jet) against float64 references."""

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.models import MLP, ScoreFn, from_preset
from fpkern.jet import JetUnsupported
from fpkern.ops import (forward_mode, fpe_residual, fpe_terms, fused_div, fused_laplacian,
                        projected_residual, scalar_fpe_rhs)
from fpkern.ops.jet_pass import Layout, jet_pass
from fpkern.sde import SubVPSDE, VESDE, VPSDE
from tests import reference

F64 = torch.float64
SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": SubVPSDE()}
TIMES = [1e-3, 1e-2, 0.1, 0.5, 1.0]


def _model(kind, sde):
    torch.manual_seed(0)
    if kind == "mixture":
        gm = GaussianMixture.random(3, 3, generator=torch.Generator().manual_seed(0))
        return reference.perturbed_field(gm, sde), (3,)
    if kind == "mlp":
        return ScoreFn(MLP(3, width=64, depth=3), sde).double(), (3,)
    name = "small/ncsnpp" if isinstance(sde, VESDE) and not isinstance(sde, VPSDE) else "small/ddpmpp"
    net = ScoreFn(from_preset(name), sde).double().eval()
    return net, tuple(net.input_shape)


def _as32(score_fn):
    if isinstance(score_fn, torch.nn.Module):
        import copy
        return copy.deepcopy(score_fn).float()
    return score_fn


@pytest.mark.parametrize("kind", ["mixture", "mlp", "ncsnpp"])
@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", ["div", "laplacian"])
def test_float32_fused_matches_float64_probe_conditional_value(kind, name, form, gen):
    sde = SDES[name]
    score64, shape = _model(kind, sde)
    B = len(TIMES)
    x = torch.randn((B,) + shape, generator=gen, dtype=F64)
    t = torch.tensor(TIMES, dtype=F64)
    V = torch.randn((2, B) + shape, generator=gen, dtype=F64)
    want = forward_mode.residual(score64, x, t, sde, form, V).detach()
    got = fpe_residual(_as32(score64), x.float(), t.float(), sde, form=form, method="fused",
                       probes=V.float()).detach()
    assert got.dtype == torch.float32
    rel = (got.double() - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert rel.max() < 1e-4, f"relative error per t {dict(zip(TIMES, rel.tolist()))}"


@pytest.mark.parametrize("kind", ["mixture", "mlp", "ncsnpp"])
@pytest.mark.parametrize("form", ["div", "laplacian"])
def test_float64_fused_equals_generic_path(kind, form, gen):
    sde = SDES["vp"]
    score_fn, shape = _model(kind, sde)
    x = torch.randn((3,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=F64)
    V = torch.randn((3, 3) + shape, generator=gen, dtype=F64)
    got = fpe_residual(score_fn, x, t, sde, form=form, method="fused", probes=V)
    want = forward_mode.residual(score_fn, x, t, sde, form, V)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("kind", ["mixture", "mlp", "ncsnpp"])
def test_projected_residual_is_u_dot_r(kind, gen):
    sde = SDES["subvp"]
    score_fn, shape = _model(kind, sde)
    x = torch.randn((3,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.01, 0.3, 1.0], dtype=F64)
    V = torch.randn((2, 3) + shape, generator=gen, dtype=F64)
    U = torch.randn((3,) + shape, generator=gen, dtype=F64)
    got = projected_residual(score_fn, x, t, sde, directions=U, probes=V)
    r = fpe_residual(score_fn, x, t, sde, form="div", method="fused", probes=V)
    want = (U * r).flatten(1).sum(1)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())
    if kind == "mixture":       # a score_fn without jet rules: the generic torch.func path
        plain = lambda y, tt: score_fn(y, tt) + 0.0 * torch.atan(y)  # noqa: E731
        generic = projected_residual(plain, x, t, sde, directions=U, probes=V)
        assert torch.allclose(generic, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())
    with torch.no_grad():
        assert projected_residual(score_fn, x, t, sde, directions=U, probes=V).grad_fn is None


def test_projected_square_is_unbiased_for_the_squared_residual(gen):
    sde = SDES["vp"]
    score_fn, shape = _model("mixture", sde)
    x = torch.randn((1,) + shape, generator=gen, dtype=F64).expand(4000, -1).contiguous()
    t = torch.full((4000,), 0.2, dtype=F64)
    V = torch.randn((1, 1) + shape, generator=gen, dtype=F64).expand(1, 4000, -1).contiguous()
    proj = projected_residual(score_fn, x, t, sde, probes=V, generator=gen)
    r = fpe_residual(score_fn, x[:1], t[:1], sde, form="div", method="fused", probes=V[:, :1])
    est, exact = proj.pow(2).mean().item(), r.pow(2).sum().item()
    sem = proj.pow(2).std().item() / 4000 ** 0.5
    assert abs(est - exact) < 5 * sem, (est, exact, sem)


def test_parameter_gradients_of_the_mlp_match_the_exact_method(gen):
    sde = SDES["ve"]
    net = ScoreFn(MLP(2, width=32, depth=2), sde).double()
    x = torch.randn(4, 2, generator=gen, dtype=F64)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=F64)
    V = torch.randn(2, 4, 2, generator=gen, dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]
    for form in ("div", "laplacian"):
        got = torch.autograd.grad(fpe_residual(net, x, t, sde, form=form, method="fused",
                                               probes=V).pow(2).sum(), params)
        ref = reference.residual(net, x, t, sde, form, probes=V)
        want = torch.autograd.grad(ref.pow(2).sum(), params)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-8, atol=1e-10 * w.abs().max().item())


def test_unsupported_score_functions_fall_back_to_the_generic_path(gen, caplog):
    sde = SDES["vp"]
    score_fn = lambda x, t: torch.where(x > 0, -x, -2 * x) * (1 + t[:, None])  # noqa: E731
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    t = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    V = torch.randn(1, 3, 2, generator=gen, dtype=F64)
    with caplog.at_level("WARNING"):
        got = fpe_residual(score_fn, x, t, sde, form="laplacian", method="fused", probes=V)
    want = forward_mode.residual(score_fn, x, t, sde, "laplacian", V)
    assert torch.allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("kind", ["mixture", "mlp", "ncsnpp"])
@pytest.mark.parametrize("name", SDES)
def test_models_run_on_jets_without_the_generic_fallback(kind, name, gen):
    """The fused residuals raise JetUnsupported instead of falling back: every op of these
    score functions has a jet rule (so the tests above exercise the jet engine, not
    torch.func)."""
    sde = SDES[name]
    score_fn, shape = _model(kind, sde)
    x = torch.randn((2,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.02, 0.7], dtype=F64).requires_grad_()
    V = torch.randn((1, 2) + shape, generator=gen, dtype=F64)
    for form in (fused_div, fused_laplacian):
        assert torch.isfinite(form.residual(score_fn, x, t, sde, V)).all()
    U = torch.randn((2,) + shape, generator=gen, dtype=F64)
    assert torch.isfinite(fused_div.div_pass(score_fn, x, t, sde, V, U)[2]).all()


@pytest.mark.parametrize("kind", ["mixture", "mlp", "ncsnpp"])
def test_a_known_score_gives_the_same_laplacian_residual_in_one_pass(kind, gen):
    sde = SDES["vp"]
    score_fn, shape = _model(kind, sde)
    params = [p for p in score_fn.parameters() if p.requires_grad] if kind != "mixture" else []
    x = torch.randn((3,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.01, 0.3, 1.0], dtype=F64)
    V = torch.randn((2, 3) + shape, generator=gen, dtype=F64)
    two = fpe_residual(score_fn, x, t, sde, form="laplacian", method="fused", probes=V)
    one = fpe_residual(score_fn, x, t, sde, form="laplacian", method="fused", probes=V,
                       score=score_fn(x, t))
    assert torch.allclose(one, two, rtol=1e-10, atol=1e-13 * two.abs().max().item())
    if params:
        g1 = torch.autograd.grad(one.pow(2).sum(), params)
        g2 = torch.autograd.grad(two.pow(2).sum(), params)
        scale = max(b.abs().max().item() for b in g2)     # some layers' gradients are ~0
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * scale)
    with pytest.raises(ValueError, match="score must have x's shape"):
        fpe_residual(score_fn, x, t, sde, form="laplacian", method="fused", probes=V,
                     score=x[:2])


@pytest.mark.parametrize("kind", ["mixture", "mlp", "ncsnpp"])
@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("variant", ["laplacian", "div", "div-projected"])
def test_fpe_terms_in_float32_match_float64_definitions(kind, name, variant, gen):
    """Every term from one pass (laplacian: the transport row (-c, 1) and one fused
    kernel; div: the residual's jet pass; projected: u . r in forward mode): r, div, loss,
    h and s against float64 forward-mode references with the same probes."""
    sde = SDES[name]
    score64, shape = _model(kind, sde)
    B = len(TIMES)
    form = variant.split("-")[0]
    x = torch.randn((B,) + shape, generator=gen, dtype=F64)
    t = torch.tensor(TIMES, dtype=F64)
    V = torch.randn((2, B) + shape, generator=gen, dtype=F64)
    U = torch.randn((B,) + shape, generator=gen, dtype=F64).sign()
    weight = torch.rand(B, generator=gen, dtype=F64) + 0.5
    r64 = forward_mode.residual(score64, x, t, sde, form, V).detach()
    s64, jv64 = forward_mode.directional(score64, x, t, V)
    div64 = (V * jv64).flatten(2).sum(2).mean(0)
    f, g2 = sde.f(t), sde.g2(t)
    h64 = scalar_fpe_rhs(x, s64, div64, f, g2).detach()
    score32 = _as32(score64)
    x32 = x.float()
    projected = variant == "div-projected"
    score = score32(x32, t.float()) if form == "laplacian" else None
    got = fpe_terms(score32, x32, t.float(), sde, form=form, weight=weight.float(), m=2,
                    probes=V.float(), score=score, directions=U.float() if projected else None)
    assert got.residual.dtype == torch.float32

    def rel(a, b):
        return ((a.double() - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max()

    if projected:
        u_r = (U * r64).flatten(1).sum(1)
        scale = (U.abs() * r64.abs()).flatten(1).sum(1)      # u . r may cancel to ~0
        assert ((got.residual.double() - u_r).abs() / scale).max() < 1e-4
        assert ((got.loss.double() - weight * u_r ** 2).abs() / (weight * scale ** 2)).max() < 2e-4
    else:
        assert rel(got.residual, r64) < 1e-4
        assert rel(got.loss[:, None], (weight * r64.flatten(1).pow(2).sum(1))[:, None]) < 2e-4
    scale = (g2 * (div64.abs() + s64.flatten(1).pow(2).sum(1))
             + (f[:, None] * (x * s64).flatten(1)).abs().sum(1))
    assert ((got.divergence.double() - div64).abs() / (div64.abs() + 1e-3 * scale)).max() < 1e-3
    assert ((got.scalar.double() - h64).abs() / scale).max() < 1e-4
    assert rel(got.score, s64.detach()) < 1e-5


@pytest.mark.parametrize("variant", ["laplacian", "div", "div-projected"])
def test_fpe_terms_parameter_gradients_match_the_exact_method(variant, gen):
    """The gradient of loss, scalar term and score together against the float64 reference
    residual (nested autograd) with s and div computed on their own."""
    sde = SDES["vp"]
    net = ScoreFn(MLP(2, width=32, depth=2), sde).double()
    form, projected = variant.split("-")[0], variant.endswith("projected")
    x = torch.randn(4, 2, generator=gen, dtype=F64)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=F64)
    V = torch.randn(2, 4, 2, generator=gen, dtype=F64)
    U = torch.randn(4, 2, generator=gen, dtype=F64)
    z = torch.randn(4, 2, generator=gen, dtype=F64)
    w = torch.rand(4, generator=gen, dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]
    for m in ((2.0,) if projected else (2.0, 1.5)):
        terms = fpe_terms(net, x, t, sde, form=form, weight=w, m=m, probes=V,
                          score=net(x, t) if form == "laplacian" else None,
                          directions=U if projected else None)
        got = torch.autograd.grad(terms.loss.sum() + terms.scalar.pow(2).sum()
                                  + (terms.score * z).sum(), params)
        r = reference.residual(net, x, t, sde, form, probes=V)
        s, jv = forward_mode.directional(net, x, t, V)
        div = (V * jv).flatten(2).sum(2).mean(0)
        h = scalar_fpe_rhs(x, s, div, sde.f(t), sde.g2(t))
        sq = (U * r).sum(1) ** 2 if projected else r.flatten(1).pow(2).sum(1).pow(m / 2)
        want = torch.autograd.grad((w * sq).sum() + h.pow(2).sum() + (s * z).sum(), params)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10 * b.abs().max().item())


@pytest.mark.parametrize("variant", ["laplacian", "div", "div-projected"])
def test_fpe_terms_without_a_score_or_jet_rules(variant, gen):
    """Jets against the generic torch.func path (a score_fn using an op without a jet
    rule); the laplacian form with and without the caller's score."""
    sde = SDES["ve"]
    score_fn, shape = _model("mixture", sde)
    form = variant.split("-")[0]
    x = torch.randn((3,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.01, 0.3, 1.0], dtype=F64)
    V = torch.randn((2, 3) + shape, generator=gen, dtype=F64)
    kw = dict(form=form, probes=V,
              directions=torch.ones_like(x) if variant.endswith("projected") else None)
    a = fpe_terms(score_fn, x, t, sde, **kw)
    b = fpe_terms(score_fn, x, t, sde, score=score_fn(x, t), **kw) if form == "laplacian" else a
    plain = lambda y, tt: score_fn(y, tt) + 0.0 * torch.atan(y)  # noqa: E731  (no jet rule)
    with pytest.raises(JetUnsupported):
        jet_pass(plain, x, t, V[:1], time=False, layout=Layout(n1=1))
    c = fpe_terms(plain, x, t, sde, **kw)
    for u, v, w in zip(a, b, c):
        assert torch.allclose(u, v, rtol=1e-12) and torch.allclose(u, w, rtol=1e-10)
    with pytest.raises(ValueError, match="weight must have shape"):
        fpe_terms(score_fn, x, t, sde, probes=V, weight=t[:2], form=form)
    with pytest.raises(ValueError, match="directions"):
        fpe_terms(score_fn, x, t, sde, form="laplacian", directions=1)
    with pytest.raises(ValueError, match="directions must have x's shape"):
        fpe_terms(score_fn, x, t, sde, form="div", directions=x[:2])

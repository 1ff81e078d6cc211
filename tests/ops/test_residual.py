"""fpe_residual, hutchinson_divergence and laplacian against the exact oracle and references."""

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.ops import exact, fpe_residual, hutchinson_divergence, laplacian
from fpkern.sde import SubVPSDE, VESDE, VPSDE
from tests import reference

SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": SubVPSDE()}
FORMS = ["div", "laplacian"]
F64 = torch.float64


def _mixture(D=3, K=3, seed=0):
    return GaussianMixture.random(K, D, generator=torch.Generator().manual_seed(seed))


def _points(gm, sde, t, gen):
    """Samples of q_t: where the residual matters."""
    x0 = gm.sample(t.shape[0], generator=gen)
    mean, std = sde.marginal_prob(x0, t)
    return mean + std[:, None] * torch.randn(x0.shape, generator=gen, dtype=F64)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _first_mismatch(a, b, rtol, atol):
    bad = ~torch.isclose(a, b, rtol=rtol, atol=atol)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        return f"first mismatch at {i}: {a[i].item()!r} vs {b[i].item()!r}"
    return ""


# ---- the exact oracle -----------------------------------------------------------------
@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", FORMS)
def test_true_mixture_score_has_zero_residual(name, form, gen):
    sde, gm = SDES[name], _mixture()
    t = torch.tensor([1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=F64)
    x = _points(gm, sde, t, gen)
    score_fn = gm.score_fn(sde)
    r = fpe_residual(score_fn, x, t, sde, form=form, method="exact")
    _, dts = exact.score_and_time_derivative(score_fn, x, t)
    rel = r.norm(dim=1) / dts.norm(dim=1)
    assert rel.max() < 1e-8, f"relative residual per t: {rel.tolist()}"


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", FORMS)
def test_exact_matches_independent_autograd_on_perturbed_field(name, form, gen):
    sde, gm = SDES[name], _mixture()
    score_fn = reference.perturbed_field(gm, sde)
    t = torch.tensor([1e-3, 0.05, 0.4, 1.0], dtype=F64)
    x = _points(gm, sde, t, gen)
    r = fpe_residual(score_fn, x, t, sde, form=form, method="exact")
    ref = reference.residual(score_fn, x, t, sde, form)
    assert ref.norm() > 1e-2, "the perturbation must make the residual non-zero"
    assert torch.allclose(r, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item()), \
        _first_mismatch(r, ref, 1e-9, 1e-9 * ref.abs().max().item())


def test_forms_differ_for_a_non_conservative_field(gen):
    sde, gm = SDES["vp"], _mixture()
    score_fn = reference.perturbed_field(gm, sde)
    t = torch.full((6,), 0.3, dtype=F64)
    x = _points(gm, sde, t, gen)
    r = fpe_residual(score_fn, x, t, sde, form="div", method="exact")
    rc = fpe_residual(score_fn, x, t, sde, form="laplacian", method="exact")
    assert _rel(r, rc) > 1e-3


# ---- probe-conditional values: fused and naive ------------------------------------------
@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_fused_equals_probe_conditional_value(name, form, dist, gen):
    sde, gm = SDES[name], _mixture()
    score_fn = reference.perturbed_field(gm, sde)
    t = torch.tensor([0.0, 1e-3, 0.1, 0.5, 1.0], dtype=F64)
    x = _points(gm, sde, t, gen)
    from fpkern.ops import draw_probes
    V = draw_probes(3, x, dist, gen)
    r = fpe_residual(score_fn, x, t, sde, form=form, method="fused", probes=V)
    ref = reference.residual(score_fn, x, t, sde, form, probes=V)
    atol = 1e-10 * ref.abs().max().item()
    assert torch.allclose(r, ref, rtol=1e-9, atol=atol), _first_mismatch(r, ref, 1e-9, atol)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", FORMS)
def test_naive_agrees_with_probe_conditional_value_within_stencil_error(name, form, gen):
    sde, gm = SDES[name], _mixture()
    score_fn = reference.perturbed_field(gm, sde)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=F64)
    x = _points(gm, sde, t, gen)
    V = torch.randn((2,) + x.shape, generator=gen, dtype=F64)
    r = fpe_residual(score_fn, x, t, sde, form=form, method="naive", probes=V)
    ref = reference.residual(score_fn, x, t, sde, form, probes=V)
    # the stencil is second order: error ~ h^2 |d^3 s/dt^3|, with h ~ 1e-3
    terms = reference.residual_terms(score_fn, x, t, sde, probes=V)
    err = (r - ref).norm(dim=1) / terms["dts"].norm(dim=1).clamp(min=1.0)
    assert err.max() < 1e-4, err.tolist()
    # and the stencil is the only difference: with exact d_t s swapped in, it matches
    stencil = naive_stencil_error(score_fn, x, t, sde)
    assert torch.allclose(r - stencil, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())


def naive_stencil_error(score_fn, x, t, sde):
    from fpkern.ops import naive
    exact_dts = reference.residual_terms(score_fn, x, t, sde)["dts"]
    return naive.time_derivative_stencil(score_fn, x, t, sde.T) - exact_dts


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", FORMS)
def test_naive_is_finite_on_all_of_0_T(name, form, gen):
    sde, gm = SDES[name], _mixture()
    score_fn = gm.score_fn(sde)
    t = torch.tensor([0.0, 1e-5, 5e-4, 1e-3, 0.5, 1.0 - 1e-4, 1.0], dtype=F64)
    x = _points(gm, sde, t, gen)
    r = fpe_residual(score_fn, x, t, sde, form=form, method="naive", probes=2, generator=gen)
    assert torch.isfinite(r).all()
    from fpkern.ops import naive
    nodes = naive.stencil_nodes(t, sde.T)
    assert (nodes >= 0).all() and (nodes <= sde.T).all()


def test_naive_stencil_matches_exact_time_derivative_at_the_ends(gen):
    sde, gm = SDES["vp"], _mixture()
    score_fn = gm.score_fn(sde)
    t = torch.tensor([0.0, 2e-4, 1.0], dtype=F64)
    x = _points(gm, sde, t, gen)
    from fpkern.ops import naive
    est = naive.time_derivative_stencil(score_fn, x, t, sde.T)
    _, dts = exact.score_and_time_derivative(score_fn, x, t)
    rel = (est - dts).norm(dim=1) / dts.norm(dim=1)
    assert rel.max() < 1e-3, rel.tolist()   # second order in h ~ 1.5e-3, VP's stiff start


# ---- the Hutchinson estimators ----------------------------------------------------------
def test_estimators_with_given_probes_equal_their_definitions(gen):
    sde, gm = SDES["ve"], _mixture(D=4)
    score_fn = reference.perturbed_field(gm, sde)
    t = torch.tensor([0.01, 0.3, 0.7], dtype=F64)
    x = _points(gm, sde, t, gen)
    V = torch.randn((5,) + x.shape, generator=gen, dtype=F64)
    T = reference.residual_terms(score_fn, x, t, sde)
    div_def = torch.einsum("kbi,bij,kbj->b", V, T["J"], V) / 5
    lap_def = torch.einsum("bijl,kbj,kbl->bi", T["H"], V, V) / 5
    assert torch.allclose(hutchinson_divergence(score_fn, x, t, probes=V), div_def, rtol=1e-11)
    assert torch.allclose(laplacian(score_fn, x, t, probes=V), lap_def, rtol=1e-10,
                          atol=1e-12 * lap_def.abs().max().item())


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_estimators_converge_to_exact_values(dist, gen):
    sde, gm = SDES["vp"], _mixture(D=3)
    score_fn = reference.perturbed_field(gm, sde)
    t = torch.tensor([0.05, 0.5], dtype=F64)
    x = _points(gm, sde, t, gen)
    K = 4000
    div = hutchinson_divergence(score_fn, x, t, probes=K, probe_dist=dist, generator=gen)
    lap = laplacian(score_fn, x, t, probes=K, probe_dist=dist, generator=gen)
    div_exact = exact.divergence(score_fn, x, t)
    lap_exact = exact.laplacian(score_fn, x, t)
    # Monte Carlo error ~ O(1/sqrt(K)) of the off-diagonal mass: allow 6 sigma-ish
    T = reference.residual_terms(score_fn, x, t, sde)
    scale_div = T["J"].flatten(1).norm(dim=1) * 3 / K ** 0.5
    scale_lap = T["H"].flatten(1).norm(dim=1)[:, None] * 6 / K ** 0.5
    assert ((div - div_exact).abs() < scale_div).all(), (div, div_exact)
    assert ((lap - lap_exact).abs() < scale_lap).all(), (lap, lap_exact)
    # exact values agree with the reference's traces
    assert torch.allclose(div_exact, torch.einsum("bii->b", T["J"]), rtol=1e-11)
    assert torch.allclose(lap_exact, torch.einsum("bijj->bi", T["H"]), rtol=1e-10)


def test_rademacher_divergence_is_exact_for_a_diagonal_jacobian(gen):
    score_fn = lambda x, t: -x * (1 + t[:, None]) + torch.sin(x)  # noqa: E731
    x = torch.randn(4, 5, dtype=F64, generator=gen)
    t = torch.rand(4, dtype=F64, generator=gen)
    div = hutchinson_divergence(score_fn, x, t, probes=1, generator=gen)
    assert torch.allclose(div, exact.divergence(score_fn, x, t), rtol=1e-12)


# ---- images, parameter gradients, purity --------------------------------------------------
class TinyConvScore(torch.nn.Module):
    def __init__(self, c=2):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, c, 3, padding=1)
        self.temb = torch.nn.Linear(1, 4)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.conv1(x) + self.temb(t[:, None])[:, :, None, None])
        return self.conv2(h) - x


def test_image_shaped_inputs_and_all_methods_agree_in_expectation_structure(gen):
    torch.manual_seed(0)
    net = TinyConvScore().double()
    sde = SDES["subvp"]
    x = torch.randn(2, 2, 3, 3, dtype=F64, generator=gen)
    t = torch.tensor([0.2, 0.6], dtype=F64)
    V = torch.randn((2,) + x.shape, generator=gen, dtype=F64)
    for form in FORMS:
        fused = fpe_residual(net, x, t, sde, form=form, method="fused", probes=V)
        naive = fpe_residual(net, x, t, sde, form=form, method="naive", probes=V)
        assert fused.shape == x.shape
        assert _rel(naive, fused) < 1e-5
        ex = fpe_residual(net, x, t, sde, form=form, method="exact")
        assert ex.shape == x.shape


@pytest.mark.parametrize("method", ["exact", "fused", "naive"])
@pytest.mark.parametrize("form", FORMS)
def test_parameter_gradients_match_independent_autograd(method, form, gen):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    score_fn = lambda x, t: net(torch.cat([x, t[:, None]], 1))  # noqa: E731
    sde = SDES["vp"]
    x = torch.randn(5, 2, dtype=F64, generator=gen)
    t = torch.rand(5, dtype=F64, generator=gen) * 0.9 + 0.05
    V = torch.randn((2,) + x.shape, generator=gen, dtype=F64)
    probes = None if method == "exact" else V
    r = fpe_residual(score_fn, x, t, sde, form=form, method=method,
                     probes=V if probes is not None else 1)
    got = torch.autograd.grad(r.pow(2).sum(), list(net.parameters()))
    ref_r = reference.residual(score_fn, x, t, sde, form, probes=probes)
    want = torch.autograd.grad(ref_r.pow(2).sum(), list(net.parameters()))
    tol = 1e-4 if method == "naive" else 1e-8
    for g, w in zip(got, want):
        assert _rel(g, w) < tol


@pytest.mark.parametrize("method", ["exact", "fused", "naive"])
def test_caller_tensors_are_not_modified(method, gen):
    sde, gm = SDES["ve"], _mixture()
    x = torch.randn(3, 3, dtype=F64, generator=gen)
    t = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    V = torch.randn((1,) + x.shape, generator=gen, dtype=F64)
    x0, t0, V0 = x.clone(), t.clone(), V.clone()
    fpe_residual(gm.score_fn(sde), x, t, sde, method=method, probes=V)
    assert not x.requires_grad and not t.requires_grad and not V.requires_grad
    assert torch.equal(x, x0) and torch.equal(t, t0) and torch.equal(V, V0)


def test_float32_inputs_keep_their_dtype(gen):
    sde, gm = SDES["vp"], _mixture().__class__.random(2, 2, dtype=torch.float32)
    x = torch.randn(4, 2, generator=gen)
    t = torch.rand(4, generator=gen)
    for method in ["exact", "fused", "naive"]:
        r = fpe_residual(gm.score_fn(sde), x, t, sde, method=method)
        assert r.dtype == torch.float32 and torch.isfinite(r).all()


# ---- bad input ------------------------------------------------------------------------------
def _args():
    sde, gm = SDES["vp"], _mixture(D=2)
    return gm.score_fn(sde), torch.randn(3, 2, dtype=F64), torch.full((3,), 0.5, dtype=F64), sde


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.update(x=a["x"][:, :, None].expand(3, 2, 2).reshape(6, 2)), ValueError, "shape [B]"),
    (lambda a: a.update(t=a["t"][:2]), ValueError, "shape [B]"),
    (lambda a: a.update(x=torch.ones(3, 2, dtype=torch.int64)), TypeError, "floating dtype"),
    (lambda a: a.update(t=torch.ones(3, dtype=torch.int64)), TypeError, "floating dtype"),
    (lambda a: a.update(t=torch.full((3,), 1.5, dtype=F64)), ValueError, "[0, T=1.0]"),
    (lambda a: a.update(t=torch.full((3,), -0.1, dtype=F64)), ValueError, "[0, T=1.0]"),
    (lambda a: a["x"].__setitem__((0, 0), float("nan")), ValueError, "x contains NaN"),
    (lambda a: a["t"].__setitem__(1, float("inf")), ValueError, "t contains inf"),
    (lambda a: a.update(x=torch.randn(3, dtype=F64)), ValueError, "at least one feature"),
    (lambda a: a.update(form="grad"), ValueError, "unknown form 'grad'"),
    (lambda a: a.update(method="stde"), ValueError, "unknown method 'stde'"),
    (lambda a: a.update(probe_dist="uniform"), ValueError, "unknown probe_dist 'uniform'"),
    (lambda a: a.update(probes=torch.randn(2, 3, 3, dtype=F64)), ValueError, "probes must have shape"),
    (lambda a: a.update(probes=torch.randn(0, 3, 2, dtype=F64)), ValueError, "with K >= 1"),
    (lambda a: a.update(probes=0), TypeError, "positive int"),
    (lambda a: a.update(probes=torch.ones(1, 3, 2, dtype=torch.int64)), TypeError, "probes must have a floating"),
    (lambda a: a.update(score_fn=3), TypeError, "score_fn must be callable"),
])
def test_bad_input_is_named(mutate, exc, words):
    score_fn, x, t, sde = _args()
    a = dict(score_fn=score_fn, x=x, t=t, sde=sde)
    mutate(a)
    kw = {k: a.pop(k) for k in ("form", "method", "probe_dist", "probes") if k in a}
    kw.setdefault("method", "fused")
    with pytest.raises(exc) as err:
        fpe_residual(a["score_fn"], a["x"], a["t"], a["sde"], **kw)
    assert words in str(err.value)


def test_exact_refuses_large_inputs_clearly():
    sde = SDES["vp"]
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="D=3072"):
        fpe_residual(lambda x, t: -x, x, torch.full((1,), 0.5), sde, method="exact")

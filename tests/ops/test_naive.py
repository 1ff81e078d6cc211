"""method="naive" on all of [0, T]: its stencil stays where the score is defined, and its
d_t s stays second-order accurate, against exact d_t s (forward mode in t) and method
"fused" (the same probe-conditional value with d_t s exact)."""

import pytest
import torch

from fpkern.models import MLP, ScoreFn, from_score_sde_config, get_config, sde_from_config
from fpkern.ops import (exact, fpe_residual, fpe_terms, hutchinson_divergence, laplacian, naive,
                        projected_residual)
from fpkern.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": SubVPSDE()}
SMALL_T = [1e-5, 5e-4, 1e-3, 2e-3]


def _mlp(name, dtype=F64):
    torch.manual_seed(0)
    sde = SDES[name]
    return ScoreFn(MLP(2, width=32, depth=2), sde).to(dtype), sde, (2,)


def _ncsnpp(name):
    """A random-init NCSN++ of the small/ncsnpp preset, cut to one 8x8 level, under the SDE
    `name` (scale_by_sigma for VE only, as Score SDE's VP configs)."""
    cfg = get_config("small/ncsnpp")
    cfg["training"]["sde"] = {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}[name]
    cfg["model"].update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        scale_by_sigma=name == "ve")
    cfg["data"]["image_size"] = 8
    torch.manual_seed(0)
    sde = sde_from_config(cfg)
    return ScoreFn(from_score_sde_config(cfg), sde).double().eval(), sde, (1, 8, 8)


def _stencil_error(score_fn, sde, shape, times, gen, form="div", dtype=F64):
    """|naive - fused| / |d_t s| per sample, the naive residual finite."""
    t = torch.tensor(times, dtype=F64)
    x = torch.rand((len(times),) + shape, generator=gen, dtype=F64)
    V = torch.randn((1,) + x.shape, generator=gen, dtype=F64)
    r = fpe_residual(score_fn, x.to(dtype), t.to(dtype), sde, form=form, method="naive",
                     probes=V.to(dtype))
    assert r.dtype == dtype and torch.isfinite(r).all(), r
    score64 = score_fn.double()
    want = fpe_residual(score64, x, t, sde, form=form, method="fused", probes=V)
    _, dts = exact.score_and_time_derivative(score64, x, t)
    return (r.double() - want).flatten(1).norm(dim=1) / dts.flatten(1).norm(dim=1)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("form", ["div", "laplacian"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_naive_is_finite_and_accurate_near_t0_for_an_mlp(name, form, dtype, gen):
    score_fn, sde, shape = _mlp(name, dtype)
    times = ([0.0] if name == "ve" else []) + SMALL_T + [0.3]
    err = _stencil_error(score_fn, sde, shape, times, gen, form, dtype)
    # the paper's stencil on this network (Fourier features of t at scale 16) is ~1e-2
    # accurate at every t; near t = 0 the relative step RHO keeps it so
    assert err.max() < 3e-2, dict(zip(times, err.tolist()))


@pytest.mark.parametrize("name", SDES)
def test_naive_is_finite_and_accurate_near_t0_for_ncsnpp(name, gen):
    score_fn, sde, shape = _ncsnpp(name)
    times = ([0.0] if name == "ve" else []) + SMALL_T
    err = _stencil_error(score_fn, sde, shape, times, gen)
    assert err.max() < 1e-2, dict(zip(times, err.tolist()))


def _vp_like(t, x, sde):
    """-x / sigma(t) + a smooth part: the 1/sigma(t) singularity of a score network at t = 0."""
    return -x / sde.sigma(t)[:, None] + torch.sin(3 * t)[:, None] * x


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_the_stencil_near_t0_is_second_order_in_its_relative_step(name, monkeypatch):
    sde = SDES[name]
    t = torch.tensor([1e-6, 1e-4, 3e-3], dtype=F64)
    x = torch.ones(3, 2, dtype=F64)
    score_fn = lambda y, tt: _vp_like(tt, y, sde)  # noqa: E731
    _, dts = exact.score_and_time_derivative(score_fn, x, t)
    errors = []
    for rho in (0.1, 0.05):
        monkeypatch.setattr(naive, "RHO", rho)
        est = naive.time_derivative_stencil(score_fn, x, t, sde.T, singular_at_zero=True)
        errors.append(((est - dts).norm(dim=1) / dts.norm(dim=1)))
    ratio = errors[0] / errors[1]
    assert errors[0].max() < 1e-2, errors[0].tolist()
    assert ((ratio > 3.5) & (ratio < 4.5)).all(), ratio.tolist()


def test_stencil_nodes_lie_where_the_score_is_defined():
    T = 1.0
    for dtype in (F64, torch.float32):
        t = torch.tensor([1e-12, 1e-8, 1e-5, 5e-4, 1e-3, 5e-3, 0.01, 0.5, 1.0], dtype=dtype)
        nodes = naive.stencil_nodes(t, T, singular_at_zero=True)
        assert (nodes > 0).all() and (nodes <= T).all(), nodes
        assert (nodes[0] >= t * (1 - naive.RHO) * (1 - 1e-6)).all()
        inner = t < 0.5
        assert (nodes[0, inner] < t[inner]).all() and (nodes[2, inner] > t[inner]).all()
        # from t = HS / RHO on, the paper's stencil (t - hs, t, t + hd), shifted back near T
        far = t >= naive.HS / naive.RHO
        paper = naive.stencil_nodes(t, T)
        assert torch.equal(nodes[:, far], paper[:, far])
        # at t = 0 itself: (0, hs, hs + hd), the residual needing s(x, 0) anyway
        zero = naive.stencil_nodes(torch.zeros(1, dtype=dtype), T, singular_at_zero=True)
        assert torch.equal(zero, naive.stencil_nodes(torch.zeros(1, dtype=dtype), T))
        assert zero[0, 0] == 0 and zero[1, 0] == torch.tensor(naive.HS, dtype=dtype)


def test_stencil_nodes_without_a_singularity_are_the_shifted_paper_stencil():
    t = torch.tensor([0.0, 1e-5, 5e-4, 1e-3, 0.3, 1.0 - 1e-4, 1.0], dtype=F64)
    shift = (naive.HS - t).clamp(min=0) - (t + naive.HD - 1.0).clamp(min=0)
    want = torch.stack([t + shift - naive.HS, t + shift, t + shift + naive.HD])
    assert torch.equal(naive.stencil_nodes(t, 1.0), want)


def test_which_sdes_have_sigma_zero_at_t0():
    assert not naive.sigma_vanishes_at_zero(VESDE())
    assert naive.sigma_vanishes_at_zero(VPSDE()) and naive.sigma_vanishes_at_zero(SubVPSDE())


# ---- t = 0 where the score itself is undefined ----------------------------------------------
def _every_op(score_fn, x, t, sde):
    V = torch.randn((1,) + x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    ops = {f"fpe_residual/{m}/{f}": (lambda m=m, f=f: fpe_residual(
        score_fn, x, t, sde, form=f, method=m, probes=V))
        for m in ("exact", "fused", "naive") for f in ("div", "laplacian")}
    ops.update({
        "fpe_terms/div": lambda: fpe_terms(score_fn, x, t, sde, probes=V).residual,
        "fpe_terms/laplacian": lambda: fpe_terms(score_fn, x, t, sde, form="laplacian",
                                                 probes=V).residual,
        "projected_residual": lambda: projected_residual(score_fn, x, t, sde, probes=V),
        "hutchinson_divergence": lambda: hutchinson_divergence(score_fn, x, t, probes=V),
        "laplacian": lambda: laplacian(score_fn, x, t, probes=V),
    })
    return ops


#: the ops tried on NCSN++ (each pass costs ~0.5 s there); the MLP tries them all
NCSNPP_OPS = ("fpe_residual/fused/div", "fpe_residual/naive/div", "hutchinson_divergence")


@pytest.mark.parametrize("build", [_mlp, _ncsnpp])
@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_a_score_undefined_at_t0_is_a_clear_error_for_every_method(build, name, gen):
    score_fn, sde, shape = build(name)
    x = torch.rand((2,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    with torch.no_grad():
        assert not torch.isfinite(score_fn(x, t)[0]).all()      # sigma(0) = 0
    for op_name, op in _every_op(score_fn, x, t, sde).items():
        if build is _ncsnpp and op_name not in NCSNPP_OPS:
            continue
        with pytest.raises(ValueError, match=r"not finite at t = 0 \(1 of 2 samples\).*sigma"):
            op()


@pytest.mark.parametrize("build", [_mlp, _ncsnpp])
def test_a_score_defined_at_t0_gives_finite_values_from_every_method(build, gen):
    score_fn, sde, shape = build("ve")                          # VE: sigma(0) = sigma_min
    x = torch.rand((2,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    for op_name, op in _every_op(score_fn, x, t, sde).items():
        if build is _ncsnpp and op_name not in NCSNPP_OPS:
            continue
        assert torch.isfinite(op()).all(), op_name


def test_other_non_finite_values_pass_through(gen):
    """Only a score undefined at t = 0 is an error. NaN elsewhere (a diverged network) is
    returned as before, for the caller's own non-finite check; so is a non-finite value at
    t = 0 whose score is finite there."""
    sde = SDES["vp"]
    x = torch.randn(2, 2, generator=gen, dtype=F64)
    nan_below = lambda y, tt: -y * torch.log(tt - 0.4)[:, None]  # noqa: E731  NaN for t < 0.4
    for op in _every_op(nan_below, x, torch.tensor([0.1, 0.2], dtype=F64), sde).values():
        assert torch.isnan(op()).any()
    root = lambda y, tt: -y * torch.sqrt(tt)[:, None]  # noqa: E731  d_t s infinite at t = 0
    t = torch.tensor([0.0, 0.2], dtype=F64)
    ops = _every_op(root, x, t, sde)
    assert not torch.isfinite(ops["fpe_residual/fused/div"]()[0]).all()
    for op in ops.values():
        op()


@pytest.mark.parametrize("form", ["div", "laplacian"])
def test_naive_handles_a_score_affine_in_x(form, gen):
    """s = -x / sigma(t)^2, the score of N(0, sigma^2 I): its Jacobian is constant in x, so
    the laplacian form's second derivatives are zero rather than an autograd error."""
    sde = SDES["ve"]
    score_fn = lambda y, tt: -y / sde.sigma(tt)[:, None] ** 2  # noqa: E731
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    t = torch.tensor([0.1, 0.4, 0.9], dtype=F64)
    V = torch.randn((2,) + x.shape, generator=gen, dtype=F64)
    got = fpe_residual(score_fn, x, t, sde, form=form, method="naive", probes=V)
    want = fpe_residual(score_fn, x, t, sde, form=form, method="fused", probes=V)
    _, dts = exact.score_and_time_derivative(score_fn, x, t)
    assert ((got - want).norm(dim=1) / dts.norm(dim=1)).max() < 1e-4

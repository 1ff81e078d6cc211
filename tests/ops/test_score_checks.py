"""What every residual op does with what score_fn returns, in every grad mode, for every
batch size, and in the dtypes it cannot compute accurately (fpkern.ops._common)."""

import contextlib

import pytest
import torch

from fpkern.models import MLP, ScoreFn, from_score_sde_config, get_config, sde_from_config
from fpkern.ops import (fpe_residual, fpe_terms, hutchinson_divergence, laplacian,
                        projected_residual)
from fpkern.sde import VPSDE

F64 = torch.float64
SDE = VPSDE()


def _ops(x, t, V, sde=SDE):
    """name -> op(score_fn) for every public entry point and method; each returns a tensor."""
    ops = {f"fpe_residual/{m}/{f}": (lambda sf, m=m, f=f: fpe_residual(
        sf, x, t, sde, form=f, method=m, probes=V))
        for m in ("exact", "fused", "naive") for f in ("div", "laplacian")}
    ops.update({
        "fpe_terms/div": lambda sf: fpe_terms(sf, x, t, sde, probes=V).loss,
        "fpe_terms/laplacian": lambda sf: fpe_terms(sf, x, t, sde, form="laplacian",
                                                    probes=V).loss,
        "fpe_terms/projected": lambda sf: fpe_terms(sf, x, t, sde, probes=V,
                                                    directions=torch.ones_like(x)).loss,
        "projected_residual": lambda sf: projected_residual(sf, x, t, sde, probes=V,
                                                            directions=V[0].flip(0)),
        "hutchinson_divergence": lambda sf: hutchinson_divergence(sf, x, t, probes=V),
        "laplacian": lambda sf: laplacian(sf, x, t, probes=V),
    })
    return ops


def _inputs(B=3, D=2, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    t = torch.linspace(0.2, 0.8, B, dtype=dtype)
    V = torch.randn((1, B, D), generator=g, dtype=dtype)
    return x, t, V


def _good(x, t):
    return -x * (1 + t[:, None]) + torch.sin(x)


def _no_jet_rule(x, t):
    return _good(x, t) + 0.0 * torch.atan(x)        # the generic torch.func path


# ---- what score_fn returns ------------------------------------------------------------------
BAD = {
    "one column": (lambda x, t: _good(x, t).sum(1, keepdim=True), ValueError,
                   r"score_fn\(x, t\) has shape \(3, 1\) for x of shape \(3, 2\)"),
    "an extra dim": (lambda x, t: _good(x, t)[..., None], ValueError,
                     r"score_fn\(x, t\) has shape \(3, 2, 1\) for x of shape \(3, 2\)"),
    "one sample": (lambda x, t: _good(x, t)[:1], ValueError,
                   r"score_fn\(x, t\) has shape \(1, 2\) for x of shape \(3, 2\)"),
    "float32": (lambda x, t: _good(x, t).float(), ValueError,
                r"score_fn\(x, t\) is torch.float32 for x of torch.float64"),
    "a list": (lambda x, t: [_good(x, t)], TypeError,
               r"score_fn\(x, t\) must return a torch.Tensor, got list"),
}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("jets", [True, False], ids=["jets", "generic"])
def test_a_wrong_score_is_named_by_every_op(bad, jets):
    fn, exc, words = BAD[bad]
    sf = fn if jets else (lambda x, t: fn(x, t + 0.0 * torch.atan(t)))
    x, t, V = _inputs()
    for name, op in _ops(x, t, V).items():
        with pytest.raises(exc, match=words):
            op(sf)


def test_a_score_on_another_device_is_named():
    x, t, V = _inputs()
    sf = lambda y, tt: torch.empty(y.shape, dtype=y.dtype, device="meta")  # noqa: E731
    for name, op in _ops(x, t, V).items():
        with pytest.raises(ValueError, match=r"score_fn\(x, t\) is on meta for x on cpu"):
            op(sf)


def test_a_given_score_is_checked_like_score_fn():
    x, t, V = _inputs()
    for bad, words in ((_good(x, t).float(), "score is torch.float32 for x of torch.float64"),
                       (_good(x, t)[:, :1], r"score has shape \(3, 1\)")):
        with pytest.raises(ValueError, match=words):
            fpe_residual(_good, x, t, SDE, form="laplacian", method="fused", score=bad)
        with pytest.raises(ValueError, match=words):
            fpe_terms(_good, x, t, SDE, form="laplacian", score=bad)


# ---- grad modes --------------------------------------------------------------------------
MODES = {"default": contextlib.nullcontext, "no_grad": torch.no_grad,
         "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}


def _mlp():
    torch.manual_seed(0)
    return ScoreFn(MLP(2, width=16, depth=2), SDE).double()


@pytest.mark.parametrize("kind", ["mlp", "generic"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x", "x_requires_grad"])
@pytest.mark.parametrize("mode", MODES)
def test_every_op_works_in_every_grad_mode(kind, x_grad, mode):
    net = _mlp()
    sf = net if kind == "mlp" else (lambda y, tt: net(y, tt) + 0.0 * torch.atan(y))
    x0, t, V = _inputs()
    want = {k: op(sf).detach() for k, op in _ops(x0, t, V).items()}
    with MODES[mode]():
        x = x0.clone().requires_grad_(x_grad and mode != "inference_mode")
        got = {k: op(sf) for k, op in _ops(x, t, V).items()}
    records = mode in ("default", "enable_grad")
    for k, r in got.items():
        assert torch.allclose(r.detach(), want[k], rtol=1e-10, atol=1e-12), k
        assert (r.grad_fn is not None) == records, (k, r.grad_fn)
        assert not r.is_inference(), k
        if records:
            params = [p for p in net.parameters() if p.requires_grad]
            grads = torch.autograd.grad(r.sum(), params, allow_unused=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads), k
    assert not x.requires_grad or x_grad


# ---- batch sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "generic"])
def test_a_batch_of_one_equals_the_row_of_a_larger_batch(kind):
    net = _mlp()
    sf = net if kind == "mlp" else (lambda y, tt: net(y, tt) + 0.0 * torch.atan(y))
    x, t, V = _inputs(B=3)
    big = {k: op(sf) for k, op in _ops(x, t, V).items()}
    one = {k: op(sf) for k, op in _ops(x[1:2], t[1:2], V[:, 1:2]).items()}
    for k in big:
        assert one[k].shape[0] == 1, k
        assert torch.allclose(one[k], big[k][1:2], rtol=1e-9, atol=1e-12), k


def test_an_empty_batch_is_refused_clearly():
    x, t, V = _inputs(B=0)
    for name, op in _ops(x, t, V).items():
        with pytest.raises(ValueError, match=r"x has batch size 0 \(shape \(0, 2\)\)"):
            op(_good)


# ---- dtypes ------------------------------------------------------------------------------
def _tiny_ncsnpp(sde_name="vpsde"):
    cfg = get_config("small/ncsnpp")
    cfg["training"]["sde"] = sde_name
    cfg["model"].update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        scale_by_sigma=sde_name == "vesde")
    cfg["data"]["image_size"] = 8
    torch.manual_seed(0)
    sde = sde_from_config(cfg)
    return ScoreFn(from_score_sde_config(cfg), sde).eval(), sde


def _image_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g).to(dtype)
    return x, torch.tensor([0.3, 0.7]).to(dtype), torch.randn(1, 2, 1, 8, 8, generator=g).to(dtype)


def test_float16_is_refused_by_every_op():
    net, sde = _tiny_ncsnpp()
    x, t, V = _image_inputs(torch.float16)
    for name, op in _ops(x, t, V, sde).items():
        if "exact" in name:
            continue
        with pytest.raises(TypeError, match="x is float16.*use bfloat16 or float32"):
            op(net.half())
    x32, _, V32 = _image_inputs()
    with pytest.raises(TypeError, match="t is float16"):
        fpe_residual(net.float(), x32, t, sde, method="fused", probes=V32)


def test_a_float16_autocast_computes_in_x_dtype():
    """Under autocast(float16) the NCSN++ jets overflow to NaN; the ops switch it off."""
    net, sde = _tiny_ncsnpp()
    x, t, V = _image_inputs()
    ops = {k: op for k, op in _ops(x, t, V, sde).items() if k in (
        "fpe_residual/fused/div", "fpe_residual/fused/laplacian", "fpe_terms/laplacian",
        "hutchinson_divergence", "laplacian")}
    want = {k: op(net).detach() for k, op in ops.items()}
    with torch.autocast("cpu", dtype=torch.float16):
        got = {k: op(net).detach() for k, op in ops.items()}
    for k in ops:
        assert got[k].dtype == torch.float32, k
        atol = 1e-6 * want[k].abs().max().item()
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=atol), k


def test_bfloat16_stays_available_except_for_the_naive_stencil():
    net, sde = _tiny_ncsnpp()
    x, t, V = _image_inputs()
    want = fpe_residual(net, x, t, sde, method="fused", probes=V)
    nb = net.bfloat16()
    got = fpe_residual(nb, x.bfloat16(), t.bfloat16(), sde, method="fused", probes=V.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert ((got.float() - want).norm() / want.norm()) < 0.1
    with pytest.raises(TypeError, match="method='naive'.*bfloat16.*float32 or float64"):
        fpe_residual(nb, x.bfloat16(), t.bfloat16(), sde, method="naive", probes=V.bfloat16())
    # under a bfloat16 autocast the naive stencil runs in x's dtype, and agrees with fp32
    net.float()
    want = fpe_residual(net, x, t, sde, method="naive", probes=V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fpe_residual(net, x, t, sde, method="naive", probes=V)
        fused = fpe_residual(net, x, t, sde, method="fused", probes=V)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert torch.isfinite(fused).all()                 # fused keeps the autocast

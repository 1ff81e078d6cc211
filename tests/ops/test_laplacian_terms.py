"""The one-pass laplacian-form FPE terms: every backend against the torch reference."""

import pytest
import torch

from fpkern import backend
from fpkern.kernels import laplacian_terms as kernels
from fpkern.kernels.offline import recorded_launches
from fpkern.ops.laplacian_terms import laplacian_terms, laplacian_terms_ref
from tests.kernel_checks import (assert_close, assert_compile_for_sm90, backends, device_for,
                                 needs_nvidia_compiler)


def _close(got, want, tol, what):
    """Against a float64 reference: the dtypes differ by design."""
    assert_close(got, want, tol, what, check_dtype=False)


F64 = torch.float64
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _inputs(K, shape, dtype, device, gen):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(device, dtype)  # noqa: E731
    B = shape[0]
    return [mk(K, *shape), mk(K, *shape)] + [mk(*shape) for _ in range(4)] + \
        [mk(B).abs(), mk(B), mk(B).abs()]


def test_reference_matches_definitions(gen):
    v, jv, w, lap, s, x, g2, f, wt = _inputs(3, (4, 5), F64, "cpu", gen)
    r, div, loss, h = laplacian_terms_ref(v, jv, w, lap, s, x, g2, f, wt, 2.0)
    for b in range(4):
        rb = w[b] - 0.5 * g2[b] * lap[b] + f[b] * s[b]
        db = sum(float(v[k, b] @ jv[k, b]) for k in range(3)) / 3
        _close(r[b], rb, 1e-14, "r")
        _close(div[b], torch.tensor(db, dtype=F64), 1e-14, "div")
        _close(loss[b], wt[b] * (rb @ rb), 1e-14, "loss")
        _close(h[b], 0.5 * g2[b] * (db + s[b] @ s[b]) - f[b] * (x[b] @ s[b]), 1e-14, "h")


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("shape", [(1, 1), (5, 123), (3, 2, 7, 9), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m", [2.0, 1.5])
def test_backends_match_reference(name, shape, dtype, m, gen):
    K = 2
    args = _inputs(K, shape, dtype, device_for(name), gen)
    a1 = [a.clone().requires_grad_() for a in args]
    a2 = [a.clone().double().requires_grad_() for a in args]
    with backend.use_backend(name):
        out = laplacian_terms(*a1, m)
    ref = laplacian_terms_ref(*a2, m)
    for o, e, what in zip(out, ref, ("r", "div", "loss", "h")):
        assert o.dtype == dtype
        _close(o, e, TOL[dtype] * (10 if what == "loss" else 1), f"{name} {what}")
    gouts = [torch.randn(o.shape, generator=gen, dtype=F64) for o in out]
    with backend.use_backend(name):
        g1 = torch.autograd.grad(out, a1, [g.to(o) for g, o in zip(gouts, out)])
    g2 = torch.autograd.grad(ref, a2, gouts)
    names = ("v", "jv", "w", "lap", "s", "x", "g2", "f", "weight")
    for got, want, what in zip(g1, g2, names):
        _close(got, want, TOL[dtype] * 10, f"{name} grad {what}")


@pytest.mark.parametrize("name", backends())
def test_gradcheck_and_double_backward(name, gen):
    device = device_for(name)
    args = [a.requires_grad_() for a in _inputs(2, (3, 4), F64, device, gen)]
    fast = name == "triton"          # the interpreter is slow: random-projection gradcheck
    with backend.use_backend(name):
        assert torch.autograd.gradcheck(lambda *a: laplacian_terms(*a, 2.0), args, fast_mode=fast)
        assert torch.autograd.gradcheck(lambda *a: laplacian_terms(*a, 3.0), args, fast_mode=fast)
        if name != "triton":
            assert torch.autograd.gradgradcheck(lambda *a: laplacian_terms(*a, 2.0), args)


@pytest.mark.parametrize("name", backends())
def test_zero_residual_has_finite_gradients_for_small_m(name, gen):
    v, jv, w, lap, s, x, g2, f, wt = _inputs(1, (2, 3), F64, device_for(name), gen)
    w, lap, f = torch.zeros_like(w).requires_grad_(), torch.zeros_like(lap), torch.zeros_like(f)
    with backend.use_backend(name):
        r, div, loss, h = laplacian_terms(v, jv, w, lap, s, x, g2, f, wt, 1.0)
        (gw,) = torch.autograd.grad(loss.sum(), w)
    assert r.abs().max() == 0 and torch.isfinite(gw).all() and gw.abs().max() == 0


def test_opcheck(gen):
    args = [a.float().requires_grad_() for a in _inputs(2, (3, 5), F64, "cpu", gen)]
    torch.library.opcheck(torch.ops.fpkern.laplacian_terms.default, (*args, 2.0))


def test_bad_input_is_named(gen):
    v, jv, w, lap, s, x, g2, f, wt = _inputs(2, (3, 5), F64, "cpu", gen)
    with pytest.raises(ValueError, match="lap has shape"):
        laplacian_terms(v, jv, w, lap[:2], s, x, g2, f, wt)
    with pytest.raises(ValueError, match="weight"):
        laplacian_terms(v, jv, w, lap, s, x, g2, f, wt.float())
    with pytest.raises(ValueError, match="m must be > 0"):
        laplacian_terms(v, jv, w, lap, s, x, g2, f, wt, 0.0)


def test_torch_compile_accepts_the_op(gen):
    args = [a.float() for a in _inputs(2, (3, 5), F64, "cpu", gen)]
    fn = torch.compile(lambda *a: laplacian_terms(*a, 2.0)[2].sum(), backend="eager",
                       fullgraph=True)
    assert torch.allclose(fn(*args), laplacian_terms_ref(*args, 2.0)[2].sum())


@needs_nvidia_compiler
def test_kernels_compile_for_sm90(gen):
    """The forward and backward kernels in every dtype, for m = 2 and another m."""
    with recorded_launches(kernels) as launches, backend.use_backend("triton"):
        for dtype in TOL:
            for m in (2.0, 1.5):
                args = [a.requires_grad_() for a in _inputs(2, (3, 40), dtype,
                                                            device_for("triton"), gen)]
                out = laplacian_terms(*args, m)
                torch.autograd.grad(sum(o.sum() for o in out), args)
    assert len(launches) == 2 * 2 * len(TOL)
    assert_compile_for_sm90(launches)

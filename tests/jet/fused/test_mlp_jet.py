"""The fused MLP-on-jets op (fpkern.jet.fused.mlp_jet): reference against the per-op jet rules and
nested jvp (float64), both implementations (the Triton kernels, interpreted on CPU, and the
CPU one of fpkern.jet.fused.mlp_jet_cpu) against the reference, the Jet dispatch of
fpkern.models.mlp.mlp_forward, and the fused FPE residual end to end."""

import copy

import pytest
import torch
from torch.func import jvp

from fpkern import backend
from fpkern.jet import Jet, Layout
from fpkern.kernels import mlp_jet as mlp_jet_kernels
from fpkern.kernels.offline import recorded_launches
from fpkern.models import MLP, ScoreFn
from fpkern.ops import fpe_residual, projected_residual
from fpkern.jet.fused import mlp_jet as mj
from fpkern.ops.jet_pass import jet_pass
from fpkern.sde import VPSDE
from tests.kernel_checks import assert_compile_for_sm90, needs_nvidia_compiler

F64 = torch.float64

# (n1, pairs, collapse) as the fused residual builds them, plus odd ones
LAYOUTS = {
    "laplacian_k1": Layout(n1=2, collapse=(1,)),                 # x, v, time, collapsed
    "laplacian_k2_jc": Layout(n1=4, collapse=(1, 2)),            # x, v1, v2, c, time, coll.
    "jvp": Layout(n1=1),                                         # x, c
    "div_k2": Layout(n1=3),                                      # x, v1, v2, time
    "collapse_mid": Layout(n1=3, collapse=(2, 3)),
    "projected_k1": Layout(n1=3, pairs=((1, 2),)),               # x, v, u, time, (v, u)
    "projected_k2": Layout(n1=4, pairs=((1, 3), (2, 3))),        # x, v1, v2, u, time, pairs
    "pairs_collapse": Layout(n1=3, pairs=((1, 3), (2, 2)), collapse=(1, 2)),
    "projected_k4": Layout(n1=6, pairs=tuple((k, 5) for k in range(1, 5))),   # 11 rows
}


def _net(dim=3, width=32, depth=3, embed_dim=16, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = MLP(dim, width=width, depth=depth, embed_dim=embed_dim, fourier_scale=2.0).to(dtype)
    with torch.no_grad():          # non-zero biases, so the value-row-only rule is tested
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return m


def _rows(layout, B, dim, gen, dtype, time_row=True):
    """x rows (x, tangents.., 0 for second order) and t rows (t, 0.., 1 on the last first-order
    row when time_row, 0); random t tangents on the other rows too, to test d/dt paths."""
    R = layout.rows
    x = torch.zeros(R, B, dim, dtype=F64)
    t = torch.zeros(R, B, dtype=F64)
    x[:1 + layout.n1] = torch.randn(1 + layout.n1, B, dim, generator=gen, dtype=F64)
    t[0] = torch.rand(B, generator=gen, dtype=F64) * 0.9 + 0.05
    t[1:1 + layout.n1] = 0.3 * torch.randn(layout.n1, B, generator=gen, dtype=F64)
    if time_row:
        x[layout.n1] = 0
        t[layout.n1] = 1
    return x.to(dtype), t.to(dtype)


def _params(m):
    return m.mlp_params()


def _assert_close(got, want, rtol, what):
    scale = want.detach().abs().max().clamp_min(1e-30)
    err = (got.detach() - want.detach()).abs()
    if (err > rtol * scale).any():
        i = tuple((err > rtol * scale).nonzero()[0].tolist())
        raise AssertionError(f"{what}: first mismatch at {i}: {got[i].item()!r} vs "
                             f"{want[i].item()!r} (max |want| {scale.item():.3g})")


# ---- reference -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS) + ["pairs"])
def test_reference_equals_per_op_jet_rules(name, gen):
    layout = LAYOUTS.get(name) or Layout(n1=3, pairs=((1, 3), (2, 2)), collapse=(1, 2))
    m = _net(dtype=F64)
    x, t = _rows(layout, 5, 3, gen, F64)
    with backend.use_backend("torch"):
        want = m(Jet(x, layout), Jet(t, layout)).rows
    got = mj.mlp_jet_ref(x, t, _params(m), layout.kernel_spec)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_equals_jet_pass_on_score_fn(gen):
    """jet_pass(ScoreFn(MLP)) = the reference rows pushed through -out / sigma(t)."""
    sde = VPSDE()
    m = _net(dtype=F64)
    score_fn = ScoreFn(m, sde)
    B, K = 5, 2
    layout = Layout(n1=K + 1, collapse=tuple(range(1, K + 1)))
    x = torch.randn(B, 3, generator=gen, dtype=F64)
    t = torch.rand(B, generator=gen, dtype=F64) * 0.9 + 0.05
    V = torch.randn(K, B, 3, generator=gen, dtype=F64)
    with backend.use_backend("torch"):
        rows = jet_pass(score_fn, x, t, V, time=True, layout=layout)
        x_rows = torch.cat([x[None], V, x.new_zeros(2, B, 3)])
        t_rows = torch.stack([t] + [torch.zeros_like(t)] * K + [torch.ones_like(t),
                                                                torch.zeros_like(t)])
        sigma = sde.sigma(Jet(t_rows, layout))
        want = (-Jet(mj.mlp_jet_ref(x_rows, t_rows, _params(m), layout.kernel_spec), layout)
                / sigma[:, None]).rows
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)


def test_reference_equals_nested_jvp(gen):
    """Rows of the reference = derivatives of net(x + sum e_i v_i, t + sum e_i tau_i)."""
    m = _net(dtype=F64)
    layout = Layout(n1=3, pairs=((1, 2), (3, 3)), collapse=(1, 2))
    x, t = _rows(layout, 4, 3, gen, F64)
    got = mj.mlp_jet_ref(x, t, _params(m), layout.kernel_spec)

    def f(z, s):
        return m(z, s)

    def d1(a):
        return lambda z, s: jvp(f, (z, s), (x[a], t[a]))[1]

    def d2(a, b):
        return jvp(d1(a), (x[0], t[0]), (x[b], t[b]))[1]

    want = [f(x[0], t[0])] + [d1(i)(x[0], t[0]) for i in range(1, 4)]
    want += [d2(a, b) for a, b in layout.pairs]
    want += [torch.stack([d2(k, k) for k in layout.collapse]).mean(0)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=1e-10)


# ---- both implementations against the reference ------------------------------------------
SHAPES = [   # dim, width, depth, embed_dim, B
    (3, 32, 3, 16, 5),
    (2, 20, 1, 6, 17),        # width not a power of two, one block, two programs
]
# (backend, dtype, tolerance of the forward rows; gradients get 2.5x)
IMPLS = {"triton": ("triton", torch.float32, 2e-5), "cpp": ("cpp", torch.float32, 2e-5),
         "cpp64": ("cpp", F64, 1e-12)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ["laplacian_k1", "laplacian_k2_jc", "jvp", "collapse_mid",
                                  "projected_k1", "projected_k2", "pairs_collapse",
                                  "projected_k4"])
def test_kernel_matches_reference_forward_and_gradients(name, shape, impl, gen):
    which, dtype, tol = IMPLS[impl]
    dim, width, depth, embed_dim, B = shape
    layout = LAYOUTS[name]
    m = _net(dim, width, depth, embed_dim, dtype=dtype)
    m.embed.W.requires_grad_(True)          # the kernel differentiates the frequencies too
    params = _params(m)
    x, t = _rows(layout, B, dim, gen, dtype, time_row=name != "jvp")
    x1, t1 = x.clone().requires_grad_(), t.clone().requires_grad_()
    x2, t2 = x.clone().requires_grad_(), t.clone().requires_grad_()
    with backend.use_backend(which):
        got = mj.mlp_jet(x1, t1, params, layout.kernel_spec)
    want = mj.mlp_jet_ref(x2, t2, params, layout.kernel_spec)
    _assert_close(got, want, tol, "forward rows")
    go = torch.randn(got.shape, generator=gen, dtype=dtype)
    names = [n for n, _ in m.named_parameters()]
    with backend.use_backend(which):
        g1 = torch.autograd.grad(got, [x1, t1] + list(m.parameters()), go)
    g2 = torch.autograd.grad(want, [x2, t2] + list(m.parameters()), go)
    for what, a, b in zip(["x rows", "t rows"] + names, g1, g2):
        _assert_close(a, b, 2.5 * tol, f"grad {what}")


@pytest.mark.parametrize("name", ["laplacian_k1", "pairs_collapse"])
def test_cpu_gradcheck_float64(name, gen):
    """The CPU implementation's hand-written backward against finite differences of its own
    forward, in float64: every input, parameters included."""
    layout = LAYOUTS[name]
    m = _net(2, 6, 3, 4, dtype=F64)
    p = _params(m)
    x, t = _rows(layout, 3, 2, gen, F64)
    spec = layout.kernel_spec
    flat = [x, t, p.fourier, p.temb_w, p.temb_b, p.in_w, p.in_b, torch.stack(p.hidden_w),
            torch.stack(p.hidden_b), torch.stack(p.proj_w), torch.stack(p.proj_b), p.out_w,
            p.out_b]
    flat = [a.detach().clone().requires_grad_() for a in flat]

    def f(xr, tr, *params):
        return mj.mlp_jet(xr, tr, mj._params_of(params), spec)

    with backend.use_backend("cpp"):
        assert torch.autograd.gradcheck(f, tuple(flat))


# t rows as the fused passes build them: None is t itself, numbers are constant rows
PASS_T_ROWS = {
    "projected": (LAYOUTS["projected_k1"], [None, 0, 0, 1, 0], [0, 3]),
    "laplacian_transport": (Layout(n1=2, collapse=(1,)), [None, 0, 1, 0], [0, 2]),
    "div_value": (Layout(n1=2), [None, 0, 1], [0, 2]),
    "pairs_collapse": (LAYOUTS["pairs_collapse"], [None, 0, 0, 1, 0, 0, 0], [0, 3]),
    "pair_of_live_rows": (Layout(n1=3, pairs=((3, 3),)), [None, 0, 0, 1, 0], [0, 3, 4]),
    "all_live": (LAYOUTS["laplacian_k1"], [None, 0.5, 1, 0], None),
}


@pytest.mark.parametrize("t_grad", [False, True], ids=["t_const", "t_grad"])
@pytest.mark.parametrize("name", list(PASS_T_ROWS))
def test_cpu_op_skips_the_zero_rows_of_the_time_embedding_exactly(name, t_grad, gen):
    """Where the t rows are zero (the probe rows of every fused pass) the time embedding's
    rows are zero by structure; the CPU op leaves them out of the projection GEMMs. Float64
    values and every gradient (t's too, which those rows do reach) equal the reference's."""
    from fpkern.jet.fused import mlp_jet_cpu
    layout, spec_rows, live = PASS_T_ROWS[name]
    B = 5
    t = torch.stack([torch.rand(B, generator=gen, dtype=F64) * 0.9 + 0.05 if v is None
                     else torch.full((B,), float(v), dtype=F64) for v in spec_rows])
    assert mlp_jet_cpu._live_rows(t, layout.kernel_spec) == live
    m = _net(3, 16, 3, 8, dtype=F64)
    m.embed.W.requires_grad_(True)
    x = torch.randn(layout.rows, B, 3, generator=gen, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    t1, t2 = t.clone().requires_grad_(t_grad), t.clone().requires_grad_(t_grad)
    with backend.use_backend("cpp"):
        got = mj.mlp_jet(x1, t1, _params(m), layout.kernel_spec)
    want = mj.mlp_jet_ref(x2, t2, _params(m), layout.kernel_spec)
    _assert_close(got, want, 1e-12, "rows")
    go = torch.randn(got.shape, generator=gen, dtype=F64)
    extra = [t1] if t_grad else []
    with backend.use_backend("cpp"):
        g1 = torch.autograd.grad(got, [x1] + extra + list(m.parameters()), go)
    g2 = torch.autograd.grad(want, [x2] + ([t2] if t_grad else []) + list(m.parameters()), go)
    names = ["x rows"] + (["t rows"] if t_grad else []) + [n for n, _ in m.named_parameters()]
    for what, a, b in zip(names, g1, g2):
        _assert_close(a, b, 1e-11, f"grad {what}")


@pytest.mark.parametrize("which", ["triton", "cpp"])
def test_reverse_pass_for_x_alone_skips_the_weight_gradients(which, gen, monkeypatch):
    """torch.autograd.grad for x alone (the div form's value pass) runs the backward without
    parameter gradients; asking for one parameter's, or calling backward(), runs them all and
    gets them right."""
    calls = []
    real = mj._impl

    def spy(like):
        impl = real(like)

        class Recorder:
            saved_shapes = staticmethod(impl.saved_shapes)
            mlp_jet_forward = staticmethod(impl.mlp_jet_forward)

            @staticmethod
            def mlp_jet_backward(*a, weights, time):
                calls.append(weights)
                return impl.mlp_jet_backward(*a, weights=weights, time=time)
        return Recorder

    monkeypatch.setattr(mj, "_impl", spy)
    layout = LAYOUTS["projected_k1"]
    m = _net(3, 16, 3, 8)
    x, t = _rows(layout, 5, 3, gen, torch.float32)
    xr = x.clone().requires_grad_()
    with backend.use_backend(which):
        out = mj.mlp_jet(xr, t, _params(m), layout.kernel_spec)
        go = torch.randn(out.shape, generator=gen)
        (gx,) = torch.autograd.grad(out, xr, go, retain_graph=True)
        (gw,) = torch.autograd.grad(out, m.out.weight, go, retain_graph=True)
        out.backward(go)
    assert calls == [False, True, True]
    xr2 = x.clone().requires_grad_()
    want = mj.mlp_jet_ref(xr2, t, _params(m), layout.kernel_spec)
    wx, ww = torch.autograd.grad(want, [xr2, m.out.weight], go)
    _assert_close(gx, wx, 5e-5, "x gradient")
    _assert_close(gw, ww, 5e-5, "out.weight gradient")
    _assert_close(m.out.weight.grad, ww, 5e-5, "out.weight .grad")


@pytest.mark.parametrize("name", ["laplacian_k1", "pairs_collapse"])
def test_kernel_gradcheck_float32(name, gen):
    """The hand-written backward kernel against finite differences of the forward kernel
    itself (float32 only, so loose tolerances; random-projection gradcheck)."""
    layout = LAYOUTS[name]
    m = _net(2, 16, 2, 8)
    params = _params(m)
    x, t = _rows(layout, 3, 2, gen, torch.float32)
    x, t = x.requires_grad_(), t.requires_grad_()
    spec = layout.kernel_spec

    def f(xr, tr, w_in, w_out):
        p = params._replace(in_w=w_in, out_w=w_out)
        return mj.mlp_jet(xr, tr, p, spec)

    w_in = params.in_w.detach().clone().requires_grad_()
    w_out = params.out_w.detach().clone().requires_grad_()
    with backend.use_backend("triton"):
        assert torch.autograd.gradcheck(f, (x, t, w_in, w_out), eps=1e-2, atol=2e-2, rtol=2e-2,
                                        fast_mode=True)


@pytest.mark.parametrize("which", ["triton", "cpp"])
def test_hidden_parameters_may_be_stacked(which, gen):
    """Per-block parameters as [depth - 1, ...] tensors give the same rows."""
    m = _net(3, 16, 3, 8)
    p = _params(m)
    stacked = p._replace(**{k: torch.stack(getattr(p, k)) for k in
                            ("hidden_w", "hidden_b", "proj_w", "proj_b")})
    layout = LAYOUTS["laplacian_k1"]
    x, t = _rows(layout, 5, 3, gen, torch.float32)
    with backend.use_backend(which):
        a = mj.mlp_jet(x, t, p, layout.kernel_spec)
        b = mj.mlp_jet(x, t, stacked, layout.kernel_spec)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(mj.mlp_jet_ref(x, t, stacked, layout.kernel_spec),
                               mj.mlp_jet_ref(x, t, p, layout.kernel_spec))


@pytest.mark.parametrize("which", ["triton", "cpp"])
def test_double_backward_goes_through_the_reference(which, gen):
    """create_graph=True (the div form): gradients of gradients match the reference's."""
    layout = LAYOUTS["div_k2"]
    m = _net(3, 16, 2, 8)
    params = _params(m)
    x, t = _rows(layout, 5, 3, gen, torch.float32)

    def loss(fn):
        xr = x.clone().requires_grad_()
        out = fn(xr, t, params, layout.kernel_spec)
        (gx,) = torch.autograd.grad((out[1:] * out[:1]).sum(), xr, create_graph=True)
        return torch.autograd.grad((gx[0] ** 2).sum(), [p for p in m.parameters() if p.requires_grad])

    with backend.use_backend(which):
        got = loss(mj.mlp_jet)
    want = loss(mj.mlp_jet_ref)
    for a, b in zip(got, want):
        _assert_close(a, b, 2e-5, "double backward")


def test_input_checks(gen):
    m = _net(3, 16, 2, 8)
    layout = LAYOUTS["laplacian_k1"]
    x, t = _rows(layout, 5, 3, gen, torch.float32)
    spec = layout.kernel_spec
    with backend.use_backend("triton"):
        with pytest.raises(ValueError, match=r"t_rows must have shape \[R, B\]"):
            mj.mlp_jet(x, t[:, :4], _params(m), spec)
        with pytest.raises(ValueError, match="float32"):
            mj.mlp_jet(x.double(), t.double(), _params(copy.deepcopy(m).double()), spec)
        with pytest.raises(ValueError, match="params.in_w has shape"):
            mj.mlp_jet(x[..., :2], t, _params(m), spec)
    with backend.use_backend("cpp"):
        with pytest.raises(ValueError, match="float32 or float64"):
            mj.mlp_jet(x.half(), t.half(), _params(copy.deepcopy(m).half()), spec)
        with pytest.raises(ValueError, match="several dtypes"):
            mj.mlp_jet(x.double(), t.double(), _params(m), spec)
    with backend.use_backend("torch"):
        with pytest.raises(ValueError, match="no fused backend"):
            mj.mlp_jet(x, t, _params(m), spec)
    pairs = LAYOUTS["pairs_collapse"]
    x, t = _rows(pairs, 5, 3, gen, torch.float32)
    wide = _net(3, 257, 1, 8)
    big = Layout(n1=15, collapse=(1, 2))
    xb, tb = _rows(big, 2, 3, gen, torch.float32)
    for which in ("triton", "cpp"):
        with backend.use_backend(which):
            assert mj.kernel_unsupported(x, t, _params(m), pairs.kernel_spec) is None
            assert "6 rows" in mj.kernel_unsupported(x[:6], t[:6], _params(m), pairs.kernel_spec)
    with backend.use_backend("triton"):       # the Triton kernel's limits, not the CPU one's
        assert "width 257" in mj.kernel_unsupported(x, t, _params(wide), pairs.kernel_spec)
        assert "17 rows" in mj.kernel_unsupported(xb, tb, _params(m), big.kernel_spec)
    with backend.use_backend("cpp"):
        assert mj.kernel_unsupported(x, t, _params(wide), pairs.kernel_spec) is None
        assert mj.kernel_unsupported(xb, tb, _params(m), big.kernel_spec) is None


@pytest.mark.parametrize("which", ["triton", "cpp"])
@pytest.mark.parametrize("name", ["laplacian_k1", "pairs_collapse"])
def test_opcheck(name, which, gen):
    layout = LAYOUTS[name]
    n1, pair_a, pair_b, c0, nc = layout.kernel_spec
    m = _net(3, 16, 2, 8)
    p = _params(m)
    x, t = _rows(layout, 5, 3, gen, torch.float32)
    args = (x.requires_grad_(), t, p.fourier, p.temb_w, p.temb_b, p.in_w, p.in_b,
            torch.stack(p.hidden_w), torch.stack(p.hidden_b), torch.stack(p.proj_w),
            torch.stack(p.proj_b), p.out_w, p.out_b, n1, list(pair_a), list(pair_b), c0, nc)
    with backend.use_backend("triton"):
        torch.library.opcheck(mj._mlp_jet_op, args)


# ---- dispatch from the model -------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = mj.mlp_jet

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(mj, "mlp_jet", spy)
    return calls


@pytest.mark.parametrize("which, dtype, layout, fused", [
    ("triton", torch.float32, LAYOUTS["laplacian_k1"], True),
    ("torch", torch.float32, LAYOUTS["laplacian_k1"], False),
    ("triton", F64, LAYOUTS["laplacian_k1"], False),
    ("triton", torch.float32, Layout(n1=2, pairs=((1, 2),)), True),
    ("triton", torch.float32, LAYOUTS["projected_k4"], True),
    ("triton", torch.float32, Layout(n1=14, pairs=((1, 2), (3, 4))), False),   # 17 rows
    ("cpp", torch.float32, LAYOUTS["laplacian_k1"], True),
    ("cpp", F64, LAYOUTS["pairs_collapse"], True),
    ("cpp", torch.float32, Layout(n1=14, pairs=((1, 2), (3, 4))), True),
])
def test_jet_dispatch_picks_the_kernel_only_where_it_applies(which, dtype, layout, fused,
                                                              kernel_calls, gen):
    m = _net(3, 16, 2, 8, dtype=dtype)
    x, t = _rows(layout, 5, 3, gen, dtype)
    with backend.use_backend(which):
        out = m(Jet(x, layout), Jet(t, layout))
    assert isinstance(out, Jet) and out.layout == layout
    assert bool(kernel_calls) == fused
    want = mj.mlp_jet_ref(x.double(), t.double(), _params(copy.deepcopy(m).double()),
                          layout.kernel_spec)
    _assert_close(out.rows.double(), want, 1e-5 if dtype == torch.float32 else 1e-12,
                  f"{which} rows")


def test_plain_tensors_and_state_dict_unchanged(kernel_calls):
    m = _net(3, 16, 3, 8)
    keys = {"embed.W", "temb.weight", "temb.bias", "inp.weight", "inp.bias", "out.weight",
            "out.bias"} | {f"{a}.{i}.{b}" for a in ("hidden", "temb_proj") for i in range(2)
                           for b in ("weight", "bias")}
    assert set(m.state_dict()) == keys
    x, t = torch.randn(4, 3), torch.rand(4)
    with backend.use_backend("triton"):
        out = m(x, t)
    temb = m.act(m.temb(m.embed(t)))
    h = m.inp(x) + temb
    for layer, proj in zip(m.hidden, m.temb_proj):
        h = layer(m.act(h)) + proj(temb)
    torch.testing.assert_close(out, m.out(m.act(h)), rtol=0, atol=0)
    assert not kernel_calls


@pytest.mark.parametrize("which", ["triton", "cpp"])
@pytest.mark.parametrize("form", ["laplacian", "div", "projected"])
def test_fused_residual_same_with_the_op_and_the_per_op_rules(form, which, kernel_calls, gen):
    """Same value and parameter gradients. The div form's value runs the op (forward and
    backward), and so does its gradient's recomputed pass, whose rows include the mixed
    pairs (fpkern.ops.fused_div); the projected estimator u . r is one pass with pair rows."""
    sde = VPSDE()
    m = _net(3, 32, 3, 16)
    score_fn = ScoreFn(m, sde)
    B, K = 5, 2
    x = torch.randn(B, 3, generator=gen)
    t = torch.rand(B, generator=gen) * 0.9 + 0.05
    V = torch.randn(K, B, 3, generator=gen)
    U = torch.randn(B, 3, generator=gen)
    names, trained = zip(*[(n, p) for n, p in m.named_parameters() if p.requires_grad])

    def run(which):
        with backend.use_backend(which):
            if form == "projected":
                r = projected_residual(score_fn, x, t, sde, probes=V, directions=U)
            else:
                r = fpe_residual(score_fn, x, t, sde, form=form, method="fused", probes=V)
            grads = torch.autograd.grad((r ** 2).sum(), trained)
        return r.detach(), grads

    r_torch, g_torch = run("torch")
    assert not kernel_calls
    r_op, g_op = run(which)
    # laplacian without a known score: the jet pass and the J c pass
    assert len(kernel_calls) == {"laplacian": 2, "div": 2, "projected": 1}[form]
    _assert_close(r_op, r_torch, 1e-5, "residual")
    for name, a, b in zip(names, g_op, g_torch):
        _assert_close(a, b, 1e-4, f"grad {name}")


# ---- real GPU --------------------------------------------------------------------------
@needs_nvidia_compiler
def test_kernels_compile_for_sm90(gen):
    """The kernels as the op launches them (pairs with a collapsed row, with and without the
    weight gradients; the 11-row projected pass) compile for sm_90 (no GPU needed)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = _net(3, 256, 3, 64).to(dev)                 # the benchmarked MLPs: width 256
    params = [p for p in m.parameters() if p.requires_grad]
    with recorded_launches(mlp_jet_kernels) as launches, backend.use_backend("triton"):
        for name in ("pairs_collapse", "projected_k4"):
            layout = LAYOUTS[name]
            x, t = (a.to(dev).requires_grad_() for a in _rows(layout, 7, 3, gen, torch.float32))
            out = mj.mlp_jet(x, t, _params(m), layout.kernel_spec)
            torch.autograd.grad(out.square().sum(), [x, t] + params)
            torch.autograd.grad(mj.mlp_jet(x, t, _params(m), layout.kernel_spec).sum(), x)
    got = {(s["kernel"][9:12], s["constexprs"]["R"], s["constexprs"].get("WEIGHTS"))
           for s in launches}
    assert got == {("fwd", 7, None), ("bwd", 7, True), ("bwd", 7, False),
                   ("fwd", 11, None), ("bwd", 11, True), ("bwd", 11, False)}
    assert_compile_for_sm90(launches)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["laplacian_k2_jc", "jvp", "projected_k1"])
def test_cuda_kernel_matches_reference(name):
    gen = torch.Generator().manual_seed(0)
    layout = LAYOUTS[name]
    m = _net(3, 256, 3, 64).cuda()
    m64 = copy.deepcopy(m).double()
    x, t = _rows(layout, 1000, 3, gen, torch.float32, time_row=name != "jvp")
    x, t = x.cuda().requires_grad_(), t.cuda().requires_grad_()
    xd, td = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    got = mj.mlp_jet(x, t, _params(m), layout.kernel_spec)
    want = mj.mlp_jet_ref(xd, td, _params(m64), layout.kernel_spec)
    _assert_close(got.double(), want, 1e-4, "forward rows")
    go = torch.randn_like(got)
    g1 = torch.autograd.grad(got, [x, t] + list(m.parameters()), go)
    g2 = torch.autograd.grad(want, [xd, td] + list(m64.parameters()), go.double())
    for a, b in zip(g1, g2):
        _assert_close(a.double(), b, 1e-4, "gradient")

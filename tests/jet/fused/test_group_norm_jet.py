"""The fused GroupNorm jet rule: every backend against the reference and nested jvp."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from fpkern import backend
from fpkern.jet import Jet, Layout
from fpkern.kernels import group_norm_jet as kernels
from fpkern.kernels.offline import recorded_launches
from fpkern.models import layers as L
from fpkern.jet.fused import group_norm_jet as gnj
from fpkern.jet.fused.group_norm_jet import group_norm_jet, group_norm_jet_ref
from tests.jet.nested_jvp import nested_jvp_rows
from tests.kernel_checks import (assert_close, assert_compile_for_sm90, backends, device_for,
                                 needs_nvidia_compiler)

F64 = torch.float64
LAYOUTS = {
    "first": Layout(n1=2),
    "collapsed": Layout(n1=2, collapse=(1, 2)),
    "pairs+collapsed": Layout(n1=3, pairs=((1, 3), (2, 3), (2, 2)), collapse=(2, 3)),
}
# (B, C, G, spatial): odd sizes, 2-D and 1-D spatial, none (a [B, C] input), one group per channel
SHAPES = [(3, 6, 3, (5, 7)), (3, 6, 2, (5,)), (2, 4, 4, ())]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _inputs(shape, layout, gen, dtype=F64, device="cpu"):
    """Rows (x, tangents, zeros for the second-order rows), weight and bias."""
    B, C, G, spatial = shape
    x = torch.randn((B, C) + spatial, generator=gen, dtype=F64)
    V = torch.randn((layout.n1, B, C) + spatial, generator=gen, dtype=F64)
    rest = torch.randn((layout.rows - 1 - layout.n1, B, C) + spatial, generator=gen, dtype=F64)
    rows = torch.cat([x[None], V, rest])
    w = torch.rand(C, generator=gen, dtype=F64) + 0.5
    b = torch.randn(C, generator=gen, dtype=F64)
    return [t.to(device, dtype) for t in (rows, w, b)]


def test_cpp_extension_binds_the_kernels():
    lib = backend.native()
    assert lib is not None, "fpkern._C was not built: run `make setup`"
    assert hasattr(lib, "group_norm_jet_forward") and hasattr(lib, "group_norm_jet_backward")


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_matches_nested_jvp(name, layout, shape, affine, gen):
    rows, w, b = _inputs(shape, layout, gen)
    rows[1 + layout.n1:] = 0                  # a network input: no second-order rows
    w, b = (w, b) if affine else (None, None)
    G = shape[2]
    want = nested_jvp_rows(lambda y: F.group_norm(y, G, w, b, 1e-5), rows, layout)
    spec = layout.kernel_spec
    assert_close(group_norm_jet_ref(rows, G, w, b, 1e-5, spec), want, 1e-12, "reference")
    dev = device_for(name)
    with backend.use_backend(name):
        got = group_norm_jet(rows.to(dev), G, *(None if t is None else t.to(dev) for t in (w, b)),
                             eps=1e-5, spec=spec)
    assert_close(got.cpu(), want, 1e-12, f"{name} forward")


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_and_backward_match_reference(name, layout, dtype, affine, gen):
    shape = (3, 6, 3, (5, 7)) if name != "triton" else (2, 6, 3, (3, 5))
    rows, w, b = _inputs(shape, layout, gen, dtype, device_for(name))   # nonzero second-order rows
    ins = [rows] + ([w, b] if affine else [])
    a1 = [t.clone().requires_grad_() for t in ins]
    a2 = [t.double().requires_grad_() for t in ins]            # the reference, in float64
    G, spec = shape[2], layout.kernel_spec
    with backend.use_backend(name):
        out = group_norm_jet(a1[0], G, *(a1[1:] or [None, None]), eps=1e-5, spec=spec)
    ref = group_norm_jet_ref(a2[0], G, *(a2[1:] or [None, None]), 1e-5, spec)
    assert_close(out, ref.to(dtype), TOL[dtype], f"{name} forward")
    go = torch.randn(out.shape, generator=gen, dtype=F64)
    with backend.use_backend(name):
        grads = torch.autograd.grad(out, a1, go.to(out))
    want = torch.autograd.grad(ref, a2, go)
    for what, g, wnt in zip(["rows", "weight", "bias"], grads, want):
        n = rows[0, 0].numel() if what != "rows" else 1            # reductions over B, R, space
        assert_close(g, wnt.to(dtype), TOL[dtype] * n ** 0.5, f"{name} grad {what}")


@pytest.mark.parametrize("name", backends())
def test_bfloat16_rows_compute_in_float32(name, gen):
    layout = LAYOUTS["pairs+collapsed"]
    rows, w, b = _inputs((2, 4, 2, (3,)), layout, gen, torch.bfloat16, device_for(name))
    with backend.use_backend(name):
        out = group_norm_jet(rows, 2, w, b, 1e-5, layout.kernel_spec)
    ref = group_norm_jet_ref(rows.double(), 2, w.double(), b.double(), 1e-5, layout.kernel_spec)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref.to(torch.bfloat16), 3e-2, f"{name} bfloat16 forward")


@pytest.mark.parametrize("name", backends())
def test_gradcheck(name, gen):
    layout = LAYOUTS["pairs+collapsed"]
    rows, w, b = (t.requires_grad_() for t in _inputs((2, 4, 2, (3,)), layout, gen,
                                                      device=device_for(name)))
    fn = lambda r, w_, b_: group_norm_jet(r, 2, w_, b_, 1e-5, layout.kernel_spec)  # noqa: E731
    with backend.use_backend(name):
        assert torch.autograd.gradcheck(fn, (rows, w, b), fast_mode=name == "triton")


def test_double_backward(gen):
    """create_graph (the div-form residual) takes the reference's gradient: same values, and
    differentiable again."""
    layout = LAYOUTS["pairs+collapsed"]
    spec = layout.kernel_spec
    rows, w, b = (t.requires_grad_() for t in _inputs((2, 4, 2, (3,)), layout, gen))
    fn = lambda r, w_, b_: group_norm_jet(r, 2, w_, b_, 1e-5, spec)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (rows, w, b))
    go = torch.randn(rows.shape, generator=gen, dtype=F64)
    plain = torch.autograd.grad(fn(rows, w, b), (rows, w, b), go)
    graph = torch.autograd.grad(fn(rows, w, b), (rows, w, b), go, create_graph=True)
    for p, g in zip(plain, graph):
        assert_close(p, g.detach(), 1e-12, "kernel vs create_graph gradient")
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in graph), (rows, w))
    ref_graph = torch.autograd.grad(group_norm_jet_ref(rows, 2, w, b, 1e-5, spec), (rows, w, b),
                                    go, create_graph=True)
    want = torch.autograd.grad(sum(g.pow(2).sum() for g in ref_graph), (rows, w))
    for s, wnt in zip(second, want):
        assert_close(s, wnt, 1e-12, "second-order gradient")


def test_double_backward_with_frozen_inputs(gen):
    """Only some inputs need gradients: create_graph asks the reference for those only."""
    layout = LAYOUTS["collapsed"]
    rows, w, b = _inputs((2, 4, 2, (3,)), layout, gen)
    rows.requires_grad_()
    out = group_norm_jet(rows, 2, w, b, 1e-5, layout.kernel_spec)
    (g,) = torch.autograd.grad(out.pow(3).sum(), rows, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), rows)
    ref = group_norm_jet_ref(rows, 2, w, b, 1e-5, layout.kernel_spec)
    (rg,) = torch.autograd.grad(ref.pow(3).sum(), rows, create_graph=True)
    (rgg,) = torch.autograd.grad(rg.sum(), rows)
    assert_close(gg, rgg, 1e-10, "second-order gradient")


@pytest.mark.parametrize("name", backends())
def test_opcheck_registration(name, gen):
    layout = LAYOUTS["pairs+collapsed"]
    n1, pa, pb, c0, nc = layout.kernel_spec
    rows, w, b = _inputs((2, 4, 2, (3,)), layout, gen, device=device_for(name))
    layout_args = (n1, list(pa), list(pb), c0, nc)
    with backend.use_backend(name):
        for wb in ((w, b), (None, None)):
            torch.library.opcheck(torch.ops.fpkern.group_norm_jet.default,
                                  (rows, *wb, 2, 1e-5) + layout_args)
        _, mean, var = torch.ops.fpkern.group_norm_jet.default(rows, w, b, 2, 1e-5, *layout_args)
        torch.library.opcheck(torch.ops.fpkern.group_norm_jet_backward.default,
                              (torch.randn_like(rows), rows, w, mean, var, 2, 1e-5) + layout_args)


def test_bad_inputs_are_named(gen):
    layout = LAYOUTS["collapsed"]
    spec = layout.kernel_spec
    rows, w, b = _inputs((2, 6, 3, (4,)), layout, gen)
    with pytest.raises(ValueError, match="R = 4"):
        group_norm_jet(rows[:3], 3, w, b, 1e-5, spec)
    with pytest.raises(ValueError, match="groups \\(4\\) must divide the 6 channels"):
        group_norm_jet(rows, 4, w, b, 1e-5, spec)
    with pytest.raises(ValueError, match="weight must be a tensor of shape \\(6,\\)"):
        group_norm_jet(rows, 3, w[:5], b, 1e-5, spec)
    with pytest.raises(ValueError, match="bias must be a tensor of shape \\(6,\\)"):
        group_norm_jet(rows, 3, w, b[None], 1e-5, spec)
    with pytest.raises(TypeError, match="rows must be a floating"):
        group_norm_jet(rows.long(), 3, w, b, 1e-5, spec)
    with pytest.raises(TypeError, match="rows must be a floating"):
        group_norm_jet(rows[:, 0, 0], 3, w, b, 1e-5, spec)
    with pytest.raises(ValueError, match="outside the first-order rows"):
        group_norm_jet(rows, 3, w, b, 1e-5, (2, (), (), 2, 2))
    with pytest.raises(ValueError, match="outside the first-order rows"):
        group_norm_jet(torch.cat([rows, rows[:1]]), 3, w, b, 1e-5, (2, (1,), (3,), 1, 2))
    with pytest.raises(ValueError, match="spec"):
        group_norm_jet(rows, 3, w, b, 1e-5)


def test_cpp_binding_checks_shapes(gen):
    lib = backend.native()
    layout = LAYOUTS["collapsed"]
    x = torch.randn(4, 2, 6, 5, dtype=F64)
    y, mean, var = torch.empty_like(x), torch.empty(2, 3, 4, dtype=F64), torch.empty(2, 3, 4,
                                                                               dtype=F64)
    ints = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    args = (2, ints([]), ints([]), 1, 2)
    lib.group_norm_jet_forward(x.numpy(), None, None, 3, 1e-5, *args, y.numpy(), mean.numpy(),
                               var.numpy())
    want = group_norm_jet_ref(x, 3, None, None, 1e-5, layout.kernel_spec)
    assert_close(y, want, 1e-12, "direct call")
    with pytest.raises(ValueError, match="mean: dimension 1 is 3, expected 2"):
        lib.group_norm_jet_forward(x.numpy(), None, None, 2, 1e-5, *args, y.numpy(),
                                   mean.numpy(), var.numpy())
    with pytest.raises(ValueError, match="groups: 4 does not divide"):
        lib.group_norm_jet_forward(x.numpy(), None, None, 4, 1e-5, *args, y.numpy(),
                                   mean.numpy(), var.numpy())
    with pytest.raises(ValueError, match="the layout has 4 rows, got 3"):
        small = mean[..., :3].contiguous()
        lib.group_norm_jet_forward(x[:3].numpy(), None, None, 3, 1e-5, *args, y[:3].numpy(),
                                   small.numpy(), small.clone().numpy())
    with pytest.raises(ValueError, match="weight: dimension 0 is 5, expected 6"):
        lib.group_norm_jet_forward(x.numpy(), np.ones(5), None, 3, 1e-5, *args, y.numpy(),
                                   mean.numpy(), var.numpy())
    with pytest.raises(ValueError, match="expected 4 dimensions"):
        lib.group_norm_jet_forward(x[0].numpy(), None, None, 3, 1e-5, *args, y.numpy(),
                                   mean.numpy(), var.numpy())


# ---- integration: the jet rule and the models' GroupNorm ---------------------------------------
def _count_calls(monkeypatch):
    calls = []
    real = gnj.group_norm_jet_stats

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gnj, "group_norm_jet_stats", counting)
    return calls


@pytest.mark.parametrize("layout", [LAYOUTS["pairs+collapsed"], Layout(n1=3, collapse=(1, 3))],
                         ids=["fused", "non-contiguous-collapse"])
def test_jet_rule_uses_the_fused_op_when_it_can(layout, gen, monkeypatch):
    calls = _count_calls(monkeypatch)
    rows, w, b = _inputs((2, 6, 3, (4,)), layout, gen)
    m = L.GroupNorm(3, 6, eps=1e-6).double()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    got = m(Jet(rows, layout)).rows
    fused = layout.kernel_spec is not None
    assert len(calls) == (1 if fused else 0)
    # against the composite formula run on the same jet (GroupNorm's plain-tensor code)
    xg = Jet(rows, layout).reshape(2, 3, -1)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
    want = ((xg - mean) * torch.rsqrt(var + 1e-6)).reshape(2, 6, 4) * w.reshape(1, -1, 1) \
        + b.reshape(1, -1, 1)
    assert_close(got, want.rows, 1e-12, "module on a Jet")
    x = rows[0]
    assert_close(m(x), F.group_norm(x, 3, w, b, 1e-6), 1e-12, "module on a tensor")


def test_module_keeps_nested_forward_mode_on_plain_tensors(gen):
    """The generic path: jvp of jvp through the module, channels-last input (NIN's output)."""
    m = L.GroupNorm(3, 12, eps=1e-6).double()
    x = torch.randn(2, 12, 5, 3, generator=gen, dtype=F64).to(memory_format=torch.channels_last)
    v, u = torch.randn_like(x), torch.randn_like(x)
    got = jvp(lambda y: jvp(m, (y,), (v,))[1], (x,), (u,))[1]
    ref = lambda y: F.group_norm(y.contiguous(), 3, m.weight, m.bias, 1e-6)  # noqa: E731
    want = jvp(lambda y: jvp(ref, (y,), (v,))[1], (x,), (u,))[1]
    assert_close(got, want, 1e-10, "nested jvp")


def test_module_on_plain_tensors_matches_the_formula_to_third_order(gen):
    """Plain tensors take F.group_norm (outside torch.func): the values and the nested
    reverse-mode derivatives the naive method takes (third order, down to the parameters)
    equal those of the formula, channels-last input included."""
    m = L.GroupNorm(3, 12, eps=1e-6).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(12, generator=gen, dtype=F64))
        m.bias.copy_(torch.randn(12, generator=gen, dtype=F64))
    x = torch.randn(2, 12, 5, 3, generator=gen, dtype=F64).to(memory_format=torch.channels_last)
    probe, u = torch.randn_like(x), torch.randn_like(x)

    def formula(y):
        g = y.reshape(2, 3, -1)
        var, mean = torch.var_mean(g, dim=-1, unbiased=False, keepdim=True)
        z = ((g - mean) * torch.rsqrt(var + 1e-6)).reshape(y.shape)
        return z * m.weight.reshape(1, -1, 1, 1) + m.bias.reshape(1, -1, 1, 1)

    def third_order(fn):
        y = x.clone().requires_grad_(True)
        out = fn(y)
        (g1,) = torch.autograd.grad((out * torch.sin(out)).sum(), y, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * probe).sum(), y, create_graph=True)
        return out.detach(), torch.autograd.grad((g2 * u).sum(), (m.weight, m.bias))

    got_out, got = third_order(m)
    want_out, want = third_order(formula)
    assert_close(got_out, want_out, 1e-12, "module on a tensor")
    for a, b, what in zip(got, want, ("weight", "bias")):
        assert_close(a, b, 1e-9, f"third-order gradient of {what}")


@needs_nvidia_compiler
def test_kernels_compile_for_sm90(gen):
    """Each layout with and without the affine parameters, in every dtype the op takes."""
    with recorded_launches(kernels) as launches, backend.use_backend("triton"):
        for layout in LAYOUTS.values():
            for dtype in (F64, torch.float32, torch.bfloat16):
                rows, w, b = (t.requires_grad_() for t in _inputs(
                    (2, 4, 2, (3,)), layout, gen, dtype, device_for("triton")))
                for affine in (True, False):
                    ins = [rows] + ([w, b] if affine else [])
                    out = group_norm_jet(rows, 2, *(ins[1:] or [None, None]), 1e-5,
                                         layout.kernel_spec)
                    torch.autograd.grad(out.sum(), ins)
    assert len(launches) == 2 * 2 * len(LAYOUTS) * 3
    assert_compile_for_sm90(launches)

"""fpkern.jet.fused.eager: eager calls of the per-layer fused ops skip the custom-op dispatcher
but must compute what the registered op computes (torch.compile and opcheck, which trace the
registered op, are tested beside each op)."""

import torch

from fpkern.jet import Layout
from fpkern.jet.fused.eager import EagerOp
from fpkern.jet.fused.group_norm_jet import group_norm_jet
from fpkern.jet.fused.jet_act import jet_act

LAYOUT = Layout(n1=2, pairs=((1, 2),), collapse=(1, 2))


def _grads(out, inputs, gen):
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def test_jet_act_eager_matches_the_registered_op(gen):
    rows = torch.randn(LAYOUT.rows, 3, 5, generator=gen).requires_grad_(True)
    n1, pa, pb, c0, nc = LAYOUT.kernel_spec
    eager = jet_act(rows, "silu", LAYOUT.kernel_spec)
    op = torch.ops.fpkern.jet_act(rows, "silu", n1, list(pa), list(pb), c0, nc)
    assert torch.equal(eager, op)
    g1 = _grads(eager, [rows], torch.Generator().manual_seed(0))
    g2 = _grads(op, [rows], torch.Generator().manual_seed(0))
    assert torch.equal(g1[0], g2[0])


def test_group_norm_jet_eager_matches_the_registered_op(gen):
    rows = torch.randn(LAYOUT.rows, 2, 4, 3, 3, generator=gen).requires_grad_(True)
    w = torch.randn(4, generator=gen).requires_grad_(True)
    b = torch.randn(4, generator=gen).requires_grad_(True)
    n1, pa, pb, c0, nc = LAYOUT.kernel_spec
    eager = group_norm_jet(rows, 2, w, b, 1e-5, LAYOUT.kernel_spec)
    op = torch.ops.fpkern.group_norm_jet(rows, w, b, 2, 1e-5, n1, list(pa), list(pb), c0, nc)[0]
    assert torch.equal(eager, op)
    g1 = _grads(eager, [rows, w, b], torch.Generator().manual_seed(0))
    g2 = _grads(op, [rows, w, b], torch.Generator().manual_seed(0))
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def test_eager_op_runs_impl_setup_and_backward():
    calls = []

    def impl(x, k):
        calls.append("impl")
        return x * k

    def setup(ctx, inputs, out):
        calls.append("setup")
        ctx.k = inputs[1]

    def backward(ctx, g):
        calls.append("backward")
        return g * ctx.k, None

    def unused_op(*args):
        raise AssertionError("the registered op is for tracers only")

    op = EagerOp(unused_op, impl, setup, backward)
    x = torch.ones(3, requires_grad=True)
    y = op(x, 2.0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert calls == ["impl", "setup", "backward"]
    assert torch.equal(gx, torch.full((3,), 2.0))


def test_make_fx_on_real_tensors_records_the_registered_ops(gen):
    """make_fx on real tensors runs plain tensors under a dispatch mode. The fused jet ops
    must take their registered path there, which the tracer records: the eager path's C++
    calls write the tensors' memory directly, and the graph would keep uninitialised
    outputs. The traced jet pass (GroupNorm -> SiLU -> conv) replays the eager rows and
    parameter gradients."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call

    from fpkern.models.layers import GroupNorm
    from fpkern.ops.jet_pass import jet_pass

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), GroupNorm(2, 8),
                              torch.nn.SiLU(), torch.nn.Conv2d(8, 2, 3, padding=1))
    x = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.rand(3, generator=gen)
    V = torch.randn(2, 3, 2, 4, 4, generator=gen)
    params = dict(net.named_parameters())

    def rows(p, x, t, V):
        score = lambda y, s: functional_call(net, p, (y,)) * (1 + s).reshape(-1, 1, 1, 1)  # noqa: E731
        return jet_pass(score, x, t, V, time=True, layout=Layout(n1=3, collapse=(1, 2)))

    gm = make_fx(rows)(params, x, t, V)
    assert {"fpkern::group_norm_jet", "fpkern::jet_act"} <= {
        getattr(n.target, "name", lambda: "")() for n in gm.graph.nodes
        if n.op == "call_function" and hasattr(n.target, "name")}
    want, got = rows(params, x, t, V), gm(params, x, t, V)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    g1 = _grads(want, list(params.values()), torch.Generator().manual_seed(0))
    g2 = _grads(got, list(params.values()), torch.Generator().manual_seed(0))
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)

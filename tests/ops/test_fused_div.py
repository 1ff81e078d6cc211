"""The fused div-form residual's gradient (fpkern.ops.fused_div): a forward-mode backward
that recomputes the network, against float64 references that differentiate the residual
directly (tests/reference.py: coordinate-wise autograd; fpkern.ops.forward_mode:
torch.func with a create_graph reverse pass)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fpkern.models import MLP, ScoreFn, from_preset
from fpkern.ops import forward_mode, fpe_residual, fused_div
from fpkern.sde import VESDE, VPSDE
from tests import reference

F64 = torch.float64


def _fused(score_fn, x, t, sde, V):
    return fpe_residual(score_fn, x, t, sde, form="div", method="fused", probes=V)


def _assert_grads(got, want, rtol, what):
    scale = max(w.abs().max().item() for w in want)      # some gradients are ~0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None, f"{what}: no gradient for input {i}"
        err = (g - w).abs().max().item()
        assert err <= rtol * scale, f"{what}: input {i} off by {err:.3g} (scale {scale:.3g})"


def _mlp_case(gen, D=3, B=4, K=2):
    sde = VESDE()
    net = ScoreFn(MLP(D, width=32, depth=2), sde).double()
    x = torch.randn(B, D, generator=gen, dtype=F64)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=F64)[:B]
    V = torch.randn(K, B, D, generator=gen, dtype=F64)
    return net, sde, x, t, V


def _ddpmpp_case(gen):
    sde = VPSDE()
    net = ScoreFn(from_preset("small/ddpmpp"), sde).double().eval()
    shape = tuple(net.input_shape)
    x = torch.randn((2,) + shape, generator=gen, dtype=F64)
    t = torch.tensor([0.01, 0.6], dtype=F64)
    V = torch.randn((1, 2) + shape, generator=gen, dtype=F64)
    return net, sde, x, t, V


def test_parameter_gradients_match_the_reference(gen):
    net, sde, x, t, V = _mlp_case(gen)
    params = [p for p in net.parameters() if p.requires_grad]
    w = torch.randn(x.shape, generator=gen, dtype=F64)        # a non-trivial upstream rho
    got = torch.autograd.grad((w * _fused(net, x, t, sde, V)).sum() ** 2, params)
    ref = reference.residual(net, x, t, sde, "div", probes=V)
    want = torch.autograd.grad((w * ref).sum() ** 2, params)
    _assert_grads(got, want, 1e-9, "mlp")


def test_gradients_for_x_and_t_match_central_differences(gen):
    """The references detach x and t; the fused residual's value is tested against them,
    so its derivative in x and t is checked by differencing that value in float64."""
    net, sde, x, t, V = _mlp_case(gen)
    w = torch.randn(x.shape, generator=gen, dtype=F64)

    def loss(xx, tt):
        return (w * _fused(net, xx, tt, sde, V)).sum() ** 2

    xg, tg = x.clone().requires_grad_(), t.clone().requires_grad_()
    gx, gt = torch.autograd.grad(loss(xg, tg), [xg, tg])
    dx = torch.randn(x.shape, generator=gen, dtype=F64)
    dt = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=F64)      # keeps t inside [0, 1]
    eps = 1e-6
    with torch.no_grad():
        fdx = (loss(x + eps * dx, t) - loss(x - eps * dx, t)) / (2 * eps)
        fdt = (loss(x, t + eps * dt) - loss(x, t - eps * dt)) / (2 * eps)
    assert torch.isclose((gx * dx).sum(), fdx, rtol=1e-6), ((gx * dx).sum().item(), fdx.item())
    assert torch.isclose((gt * dt).sum(), fdt, rtol=1e-6), ((gt * dt).sum().item(), fdt.item())


def test_closure_tensors_requiring_grad_get_their_gradient(gen):
    """Leaves the score depends on are found in the forward's graph, not by .parameters()."""
    net, sde, x, t, V = _mlp_case(gen)
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    shift = torch.randn(3, generator=gen, dtype=F64).requires_grad_()

    def score_fn(y, s):
        return net(y, s) * scale + torch.tanh(y) * shift

    got = torch.autograd.grad(_fused(score_fn, x, t, sde, V).pow(2).sum(), [scale, shift])
    want = torch.autograd.grad(reference.residual(score_fn, x, t, sde, "div", probes=V)
                               .pow(2).sum(), [scale, shift])
    _assert_grads(got, want, 1e-9, "closure")


def test_ncsnpp_parameter_gradients_match_the_generic_path(gen):
    net, sde, x, t, V = _ddpmpp_case(gen)
    params = [p for p in net.parameters() if p.requires_grad]
    got = torch.autograd.grad(_fused(net, x, t, sde, V).pow(2).sum(), params)
    want = torch.autograd.grad(forward_mode.residual(net, x, t, sde, "div", V).pow(2).sum(),
                               params)
    _assert_grads(got, want, 1e-9, "ddpm++")


def test_double_backward_matches_the_reference(gen):
    """create_graph through the residual's backward (a Hessian-vector product in the
    parameters) is differentiable: the recomputed pass records its own graph."""
    net, sde, x, t, V = _mlp_case(gen, B=3)
    params = [p for p in net.parameters() if p.requires_grad]
    dirs = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]

    def hvp(r):
        g = torch.autograd.grad(r.pow(2).sum(), params, create_graph=True)
        return torch.autograd.grad(sum((a * d).sum() for a, d in zip(g, dirs)), params)

    got = hvp(_fused(net, x, t, sde, V))
    want = hvp(reference.residual(net, x, t, sde, "div", probes=V))
    _assert_grads(got, want, 1e-8, "hvp")


class _DropoutScore(nn.Module):
    """A small score network with dropout in training mode."""

    def __init__(self, D=3, width=16, p=0.3):
        super().__init__()
        self.inp, self.out, self.p = nn.Linear(D + 1, width), nn.Linear(width, D), p

    def forward(self, x, t):
        h = F.silu(self.inp(torch.cat([x, t[:, None]], 1)))
        return self.out(F.dropout(h, self.p, training=self.training))


def test_dropout_masks_are_replayed_in_the_backward(gen):
    """The backward recomputes the network: its dropout masks must be the forward's. The
    gradient is checked against a central difference of the loss with the same seed."""
    torch.manual_seed(0)
    net = _DropoutScore().double().train()
    sde = VPSDE()
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    t = torch.rand(5, generator=gen, dtype=F64) * 0.9 + 0.05
    V = torch.randn(1, 5, 3, generator=gen, dtype=F64)
    w = net.inp.weight
    d = torch.randn(w.shape, generator=gen, dtype=F64)

    def loss():
        torch.manual_seed(7)
        return _fused(net, x, t, sde, V).pow(2).sum()

    (g,) = torch.autograd.grad(loss(), [w])
    eps = 1e-6
    with torch.no_grad():
        w += eps * d
        up = loss()
        w -= 2 * eps * d
        down = loss()
        w += eps * d
    fd = (up - down) / (2 * eps)
    assert torch.isclose((g * d).sum(), fd, rtol=1e-6), ((g * d).sum().item(), fd.item())
    torch.manual_seed(7)
    first = _fused(net, x, t, sde, V)
    assert not torch.equal(first, _fused(net, x, t, sde, V)), "dropout drew no new masks"


def test_changing_parameters_before_backward_raises(gen):
    net, sde, x, t, V = _mlp_case(gen)
    loss = _fused(net, x, t, sde, V).pow(2).sum()
    with torch.no_grad():
        net.net.inp.weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_no_graph_without_grad_mode(gen):
    net, sde, x, t, V = _mlp_case(gen)
    with torch.no_grad():
        r = _fused(net, x, t, sde, V)
    assert r.grad_fn is None and not r.requires_grad
    want = reference.residual(net, x, t, sde, "div", probes=V)
    assert torch.allclose(r, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def test_the_backward_runs_under_the_forwards_autocast(gen):
    """Mixed precision: the recomputed pass must run the network as the forward did."""
    net, sde, x, t, V = _mlp_case(gen)
    net.float()
    modes = []

    def score_fn(y, s):
        modes.append(torch.is_autocast_enabled("cpu"))
        return net(y, s)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _fused(score_fn, x.float(), t.float(), sde, V.float()).float().pow(2).sum()
    assert modes == [True]
    loss.backward()
    assert modes == [True, True]
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


class _TinyConvScore(nn.Module):
    """conv -> GroupNorm -> SiLU -> conv, time added as a channel bias."""

    def __init__(self, C=2, width=8):
        super().__init__()
        from fpkern.models.layers import GroupNorm
        self.inp, self.out = nn.Conv2d(C, width, 3, padding=1), nn.Conv2d(width, C, 3, padding=1)
        self.norm, self.temb = GroupNorm(2, width), nn.Linear(1, width)

    def forward(self, x, t):
        h = self.inp(x) + self.temb(t[:, None])[:, :, None, None]
        return self.out(F.silu(self.norm(h)))


def test_triton_kernels_give_the_same_value_and_gradients(gen, monkeypatch):
    """The forward's jet pass and the backward's recomputed pass (pair rows) through the
    Triton activation and group-norm kernels (the interpreter on CPU) against torch."""
    from fpkern import backend
    from fpkern.kernels import group_norm_jet as gk, jet_act as ak
    layouts = []
    for mod, name, pairs_at in ((ak, "jet_act_forward", lambda a: a[3]),
                                (gk, "group_norm_jet_forward", lambda a: a[5][1])):
        real = getattr(mod, name)

        def spy(*a, _real=real, _pairs=pairs_at, **k):
            layouts.append(len(_pairs(a)))
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    torch.manual_seed(0)
    net = _TinyConvScore()
    sde = VPSDE()
    x = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0.01, 0.3, 0.9])
    V = torch.randn(1, 3, 2, 4, 4, generator=gen)
    params = list(net.parameters())

    def run(name):
        with backend.use_backend(name):
            r = _fused(net, x, t, sde, V)
            return r.detach(), torch.autograd.grad(r.pow(2).sum(), params)

    r_torch, g_torch = run("torch")
    assert not layouts
    r_triton, g_triton = run("triton")
    assert sorted(set(layouts)) == [0, 1], "forward (no pairs) and backward (a pair) kernels"
    assert torch.allclose(r_triton, r_torch, rtol=1e-4, atol=1e-4 * r_torch.abs().max().item())
    _assert_grads(g_triton, g_torch, 1e-4, "triton")


def _joint(score_fn, x, t, sde, V, z):
    """A training-step-like objective of all three outputs of fused_div.terms: the residual,
    the score (a DSM-like term) and the divergence (the scalar FPE term's)."""
    r, s, div = fused_div.terms(score_fn, x, t, sde, V)
    return r.pow(2).sum() + (s + z).pow(2).sum() + (div * (1 + t)).pow(2).sum()


def _joint_reference(score_fn, x, t, sde, V, z):
    r = reference.residual(score_fn, x, t, sde, "div", probes=V)
    s, jv = forward_mode.directional(score_fn, x, t, V)
    div = (V * jv).flatten(2).sum(2).mean(0)
    return r.pow(2).sum() + (s + z).pow(2).sum() + (div * (1 + t)).pow(2).sum()


def test_score_and_divergence_share_the_residuals_pass_and_gradient(gen):
    """fused_div.terms returns s and div_V s beside r; the cotangents of all three go
    through the one recomputed pass. Values and parameter gradients against references
    that compute each output on its own; x and t against central differences."""
    net, sde, x, t, V = _mlp_case(gen)
    z = torch.randn(x.shape, generator=gen, dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]
    r, s, div = fused_div.terms(net, x, t, sde, V)
    assert torch.allclose(s, net(x, t), rtol=1e-12)
    _, jv = forward_mode.directional(net, x, t, V)
    assert torch.allclose(div, (V * jv).flatten(2).sum(2).mean(0), rtol=1e-10)
    got = torch.autograd.grad(_joint(net, x, t, sde, V, z), params)
    want = torch.autograd.grad(_joint_reference(net, x, t, sde, V, z), params)
    _assert_grads(got, want, 1e-9, "r, s, div")
    for only in ("s", "div"):        # a cotangent for one output alone
        r, s, div = fused_div.terms(net, x, t, sde, V)
        out = s.pow(2).sum() if only == "s" else div.pow(2).sum()
        ref = net(x, t).pow(2).sum() if only == "s" else \
            (V * forward_mode.directional(net, x, t, V)[1]).flatten(2).sum(2).mean(0).pow(2).sum()
        _assert_grads(torch.autograd.grad(out, params), torch.autograd.grad(ref, params), 1e-9,
                      only)

    xg, tg = x.clone().requires_grad_(), t.clone().requires_grad_()
    gx, gt = torch.autograd.grad(_joint(net, xg, tg, sde, V, z), [xg, tg])
    dx = torch.randn(x.shape, generator=gen, dtype=F64)
    dt = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=F64)
    eps = 1e-6
    with torch.no_grad():
        fdx = (_joint(net, x + eps * dx, t, sde, V, z) - _joint(net, x - eps * dx, t, sde, V, z))
        fdt = (_joint(net, x, t + eps * dt, sde, V, z) - _joint(net, x, t - eps * dt, sde, V, z))
    assert torch.isclose((gx * dx).sum(), fdx / (2 * eps), rtol=1e-6)
    assert torch.isclose((gt * dt).sum(), fdt / (2 * eps), rtol=1e-6)


def test_score_and_divergence_gradients_on_a_conv_net_and_under_create_graph(gen):
    """The same on the small DDPM++ (fused GroupNorm and activation kernels), and a
    Hessian-vector product through all three outputs (the create_graph path)."""
    net, sde, x, t, V = _ddpmpp_case(gen)
    z = torch.randn(x.shape, generator=gen, dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]

    def reference_joint():
        r = forward_mode.residual(net, x, t, sde, "div", V)
        s, jv = forward_mode.directional(net, x, t, V)
        div = (V * jv).flatten(2).sum(2).mean(0)
        return r.pow(2).sum() + (s + z).pow(2).sum() + (div * (1 + t)).pow(2).sum()

    got = torch.autograd.grad(_joint(net, x, t, sde, V, z), params)
    _assert_grads(got, torch.autograd.grad(reference_joint(), params), 1e-9, "ddpm++")

    net, sde, x, t, V = _mlp_case(gen, B=3)
    z = torch.randn(x.shape, generator=gen, dtype=F64)
    params = [p for p in net.parameters() if p.requires_grad]
    dirs = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]

    def hvp(loss):
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((a * d).sum() for a, d in zip(g, dirs)), params)

    _assert_grads(hvp(_joint(net, x, t, sde, V, z)),
                  hvp(_joint_reference(net, x, t, sde, V, z)), 1e-8, "hvp")

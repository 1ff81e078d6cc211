"""Jet rules against nested torch.func.jvp in float64: every rule, then whole networks."""

import pytest
import torch
import torch.nn.functional as F

from fpkern.jet import Jet, JetUnsupported, Layout
from tests.jet.nested_jvp import nested_jvp_rows

F64 = torch.float64


def _input_rows(x, V, layout):
    """A network input's rows: the value, the probes, zero second order."""
    zeros = x.new_zeros((layout.rows - 1 - V.shape[0],) + tuple(x.shape))
    return torch.cat([x[None], V, zeros])


def _reference_rows(fn, x, V, layout):
    """Rows of fn's jet computed by nested jvp: first order, mixed pairs, collapsed."""
    return nested_jvp_rows(fn, _input_rows(x, V, layout), layout)


def _jet_rows(fn, x, V, layout):
    return fn(Jet(_input_rows(x, V, layout), layout)).rows


LAYOUTS = [Layout(n1=2, collapse=(1, 2)), Layout(n1=3, pairs=((1, 3), (2, 3)), collapse=(1, 2)),
           Layout(n1=3, pairs=((1, 2), (1, 3))), Layout(n1=2),
           Layout(n1=3, pairs=((2, 2), (3, 3)), collapse=(1,))]   # the log-density FPE's

W = torch.randn(5, 4, dtype=F64)
CONV = torch.randn(3, 2, 3, 3, dtype=F64)
GN_W, GN_B = torch.rand(4, dtype=F64) + 0.5, torch.rand(4, dtype=F64)

UNARY = {
    "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
    "sin": torch.sin, "cos": torch.cos, "softplus": F.softplus, "gelu": F.gelu,
    "elu": lambda x: F.elu(x, 0.7), "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "log": lambda x: torch.log(x * x + 1), "sqrt": lambda x: torch.sqrt(x * x + 1),
    "rsqrt": lambda x: torch.rsqrt(x * x + 1), "reciprocal": lambda x: 1 / (x * x + 1),
    "expm1": torch.expm1, "log1p": lambda x: torch.log1p(x * x),
    "pow3": lambda x: x ** 3, "square": lambda x: x.pow(2), "neg": lambda x: -x,
}

COMPOSITE = {
    "affine": lambda x: 2.0 * x + torch.arange(4, dtype=F64) - 1.0,
    "rsub": lambda x: 1.0 - x * 3,
    "product": lambda x: x * torch.tanh(x) * x.sum(-1, keepdim=True),
    "quotient": lambda x: torch.sin(x) / (x * x + 2),
    "linear": lambda x: F.linear(torch.tanh(x), W, torch.ones(5, dtype=F64)),
    "matmul": lambda x: (x @ W.T) @ W,
    "matmul2": lambda x: torch.matmul(x[:, :, None], torch.sin(x)[:, None, :]).flatten(1),
    "einsum2": lambda x: torch.einsum("bi,bj->bij", x, torch.cos(x)).flatten(1),   # batched
    "einsum2_contract": lambda x: torch.einsum("bi,bi->b", torch.sin(x), x * x)[:, None],
    "einsum2_ellipsis": lambda x: torch.einsum("...i,...j->...ij", x, torch.cos(x)).flatten(1),
    "softmax": lambda x: F.softmax(x * 2, dim=-1),
    "logsumexp": lambda x: torch.logsumexp(x * 2, dim=-1, keepdim=True) * x,
    "logsumexp_dims": lambda x: torch.logsumexp(torch.sin(x).reshape(-1, 2, 2), dim=(1, -1))[:, None],
    "var_mean": lambda x: torch.stack(torch.var_mean(x, dim=-1, unbiased=True), -1),
    "cat_const": lambda x: torch.cat([x, torch.ones_like(x)[:, :1] * 3, torch.sin(x)], dim=1),
    "reshape_reduce": lambda x: x.reshape(x.shape[0], 2, 2).permute(0, 2, 1).flatten(1).mean(-1),
    "to_like": lambda x: x * torch.linspace(0, 1, 4).to(x),
    "jet_to": lambda x: torch.sin(x).to(torch.float64) * x.type_as(x).to("cpu", torch.float64),
    "jet_casts": lambda x: torch.positive(torch.cos(x)).double() - torch.negative(x * x),
    "conv": lambda x: F.conv2d(torch.tanh(x.reshape(-1, 2, 2, 1).expand(-1, 2, 2, 3)), CONV,
                               torch.ones(3, dtype=F64), padding=1).flatten(1),
    "group_norm": lambda x: F.group_norm(torch.cat([x, torch.sin(3 * x)], -1).reshape(-1, 4, 2, 1),
                                         2, GN_W, GN_B).flatten(1),
    "pad_pool": lambda x: F.avg_pool2d(F.pad(x.reshape(-1, 1, 2, 2), (1, 1, 1, 1)), 2).flatten(1),
    "pad_reflect": lambda x: F.pad(torch.sin(x).reshape(-1, 1, 2, 2), (1, 1, 1, 1),
                                   mode="reflect").flatten(1),
    "einsum1": lambda x: torch.einsum("bi,oi->bo", torch.sin(x), W),     # one Jet operand
    "einsum1_right": lambda x: torch.einsum("oi, bi -> ob", W, x * x).T,
    "stack": lambda x: torch.stack([x, torch.sin(x)], dim=-1).flatten(1),
    "cat_neg_dim": lambda x: torch.cat([torch.cos(x), x], dim=-1),
    "jet_minus_jet": lambda x: torch.sin(x) - x * x,
    "add_alpha": lambda x: torch.add(torch.sin(x), x * x, alpha=-0.5),
    "add_broadcast": lambda x: x + torch.sin(x).sum(-1, keepdim=True),
}


@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=["collapsed", "mixed", "pairs", "first", "diagonal_pairs"])
@pytest.mark.parametrize("name", sorted(UNARY) + sorted(COMPOSITE))
def test_rule_matches_nested_jvp(name, layout, gen):
    fn = UNARY.get(name) or COMPOSITE[name]
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    V = torch.randn(layout.n1, 3, 4, generator=gen, dtype=F64)
    got = _jet_rows(fn, x, V, layout)
    want = _reference_rows(fn, x, V, layout)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-10 * (1 + want.abs().max().item()), f"{name}: max error {err}"


def test_dropout_shares_one_mask_over_all_rows(gen):
    x = torch.randn(4, 50, generator=gen, dtype=F64)
    layout = Layout(n1=1)
    rows = torch.stack([x, torch.ones_like(x)])
    out = F.dropout(Jet(rows, layout), p=0.5, training=True).rows
    zero_value, zero_tangent = out[0] == 0, out[1] == 0
    assert torch.equal(zero_value, zero_tangent) and zero_value.any()
    assert torch.allclose(out[1][~zero_tangent], torch.full_like(out[1][~zero_tangent], 2.0))


def test_gradients_flow_through_rows(gen):
    w = torch.randn(4, 4, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    V = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    layout = Layout(n1=2, collapse=(1, 2))
    fn = lambda y: torch.tanh(y @ w) * y  # noqa: E731
    got = torch.autograd.grad(_jet_rows(fn, x, V, layout).pow(2).sum(), w)[0]
    want = torch.autograd.grad(_reference_rows(fn, x, V, layout).pow(2).sum(), w)[0]
    assert torch.allclose(got, want, rtol=1e-10)


def test_unsupported_ops_raise_instead_of_guessing(gen):
    x = Jet(torch.randn(2, 3, 4, generator=gen, dtype=F64), Layout(n1=1))
    for fn in (lambda y: torch.where(y > 0, y, 2 * y), lambda y: y.max(dim=1).values,
               lambda y: torch.floor(y), lambda y: F.pad(y, (1, 1), value=2.0)):
        with pytest.raises(JetUnsupported):
            fn(x)


def test_metadata_reads_the_value(gen):
    rows = torch.randn(3, 2, 5, generator=gen, dtype=F64)
    x = Jet(rows, Layout(n1=2))
    assert x.shape == (2, 5) and x.dtype == F64 and x.dim() == 2 and x.size(1) == 5
    assert bool(torch.isfinite(x).all()) and float(x.min()) == rows[0].min().item()
    assert torch.equal(torch.zeros_like(x), torch.zeros(2, 5, dtype=F64))
    d = x.detach()                                   # a constant: no rows, the value only
    assert not isinstance(d, Jet) and torch.equal(d, rows[0])
    with pytest.raises(ValueError, match="layout has 2 rows"):
        Jet(rows, Layout(n1=1))


def test_composite_rules_switch_the_fused_kernels_off(gen, monkeypatch):
    """Inside composite_rules() the activation and group-norm rules run as torch ops; both
    ways give the same rows. (With kernels, the activation after the GroupNorm runs as the
    fused group_norm_act node.)"""
    import fpkern.jet.fused.group_norm_act as gna
    import fpkern.jet.fused.group_norm_jet as gnj
    import fpkern.jet.fused.jet_act as ja
    from fpkern.jet import composite_rules, kernels_enabled
    calls = []
    for mod, name in ((ja, "jet_act"), (gnj, "group_norm_jet_stats"), (gna, "group_norm_act")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    layout = LAYOUTS[0]
    fn = lambda x: F.silu(F.group_norm(x.reshape(-1, 4, 1), 2, GN_W, GN_B)).flatten(1)  # noqa: E731
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    V = torch.randn(layout.n1, 3, 4, generator=gen, dtype=F64)
    fused = _jet_rows(fn, x, V, layout)
    assert len(calls) == 2 and kernels_enabled()
    with composite_rules():
        assert not kernels_enabled()
        plain = _jet_rows(fn, x, V, layout)
    assert len(calls) == 2 and kernels_enabled()
    assert torch.allclose(fused, plain, rtol=1e-12, atol=1e-12)


def test_locate_names_the_module_that_called_the_unsupported_function(gen):
    """fpkern.jet.locate reads the module path from the raised JetUnsupported's traceback:
    the innermost module, named within the outermost one; no path outside any module."""
    from fpkern.jet import locate

    def raised(fn):
        try:
            fn()
        except JetUnsupported as exc:
            return locate(exc)
        raise AssertionError("no JetUnsupported")

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Tanh(),
                                                                          torch.nn.Mish())).double()
    x = Jet(torch.randn(2, 3, 4, generator=gen, dtype=F64), Layout(n1=1))
    exc = raised(lambda: net(x))
    assert (exc.module, exc.function) == ("1.1 (Mish)", "mish")
    assert str(exc).startswith("1.1 (Mish): mish: no jet rule")
    exc = raised(lambda: net[1][1](x))
    assert exc.module == "Mish"                      # the outermost module itself: its class
    exc = raised(lambda: torch.atan(x))
    assert exc.module is None and str(exc).startswith("atan: no jet rule")

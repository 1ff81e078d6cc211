"""The jet rules that foreign networks (diffusers UNets and DiTs, EDM denoisers) need, each
against nested torch.func.jvp in float64 over every kind of row: first order, mixed pairs,
the collapsed second order. Attention with every mask kind, its hand-written form
(baddbmm), LayerNorm and RMSNorm, tanh-approximate GELU, interpolation and pooling, the
splitting ops, the sinusoidal timestep embedding and adaptive normalisation.

The references run under fpkern.ops.forward_mode.autodiff_backends(): torch's math
attention (its fused CPU kernels have no forward mode) and LayerNorm by its formula, as
torch's nested forward-mode derivative of layer_norm is wrong (pytorch/pytorch#196700,
shown against finite differences below).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fpkern.jet import Jet, JetUnsupported, Layout
from fpkern.ops.forward_mode import autodiff_backends
from tests.jet.nested_jvp import nested_jvp_rows

F64 = torch.float64
LAYOUTS = {"first": Layout(n1=2), "collapsed": Layout(n1=2, collapse=(1, 2)),
           "mixed": Layout(n1=3, pairs=((1, 3), (2, 3), (2, 2)), collapse=(1, 2)),
           "pairs": Layout(n1=3, pairs=((1, 2), (3, 1)))}

_g = torch.Generator().manual_seed(7)
B, N, E, H = 3, 4, 6, 2                    # batch, tokens, features per head, heads
WQ, WK, WV = (torch.randn(N * H * E, N * H * E, generator=_g, dtype=F64) / 8 for _ in range(3))
LN_W, LN_B = torch.rand(H * E, generator=_g, dtype=F64) + 0.5, torch.randn(H * E, generator=_g,
                                                                           dtype=F64)
W_MOD = torch.randn(2 * H * E, N * H * E, generator=_g, dtype=F64) / 8
BOOL_MASK = torch.rand(N, N, generator=_g) > 0.4
BOOL_MASK[:, 0] = True                     # every query sees one key
FLOAT_MASK = torch.randn(B, 1, N, N, generator=_g, dtype=F64)


def _heads(y):
    """[B, N*H*E] -> [B, H, N, E]."""
    return y.reshape(y.shape[0], N, H, E).transpose(1, 2)


def _qkv(x):
    return _heads(torch.tanh(x @ WQ.T)), _heads(x @ WK.T), _heads(torch.sin(x @ WV.T))


def _attn(**kw):
    def fn(x):
        q, k, v = _qkv(x)
        return F.scaled_dot_product_attention(q, k, v, **kw).flatten(1)
    return fn


def _fully_masked(x):
    q, k, v = _qkv(x)
    m = BOOL_MASK.clone()
    m[1] = False                           # query 1 sees nothing: torch gives 0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m).flatten(1)


def _jet_mask(x):
    q, k, v = _qkv(x)
    m = torch.sin(x[:, :N * N]).reshape(-1, 1, N, N)          # an additive mask with rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m).flatten(1)


def _constant_qk(x):
    q, k, _ = _qkv(torch.ones_like(x.rows[0] if isinstance(x, Jet) else x))
    v = _heads(torch.sin(x @ WV.T))
    return F.scaled_dot_product_attention(q, k, v).flatten(1)


def _gqa(x):
    q, k, v = _qkv(x)
    return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True).flatten(1)


def _baddbmm(beta, mask):
    """Attention as diffusers' AttnProcessor writes it: baddbmm scores over torch.empty
    (beta 0: ignored, even if it holds NaN) or a mask (beta 1), softmax, bmm."""
    def fn(x):
        q, k, v = (y.flatten(0, 1) for y in _qkv(x))
        inp = torch.full((q.shape[0], N, N), float("nan"), dtype=F64) if beta == 0 else (
            FLOAT_MASK.expand(B, H, N, N).flatten(0, 1))
        s = torch.baddbmm(inp, q, k.transpose(-1, -2), beta=beta, alpha=1 / math.sqrt(E))
        return torch.bmm(s.softmax(dim=-1), v).flatten(1)
    return fn


def _layer_norm(x):
    y = x.reshape(B, N * H, E * 1).reshape(B, N, H * E)
    return F.layer_norm(torch.sin(y) + y, (H * E,), LN_W, LN_B, eps=1e-3).flatten(1)


def _adaptive_norm(x):
    """DiT's adaLN: LayerNorm without affine, then * (1 + scale) + shift, both chunks of
    a linear map of an embedding of the same input (products of Jets)."""
    y = x.reshape(B, N, H * E)
    shift, scale = F.linear(F.silu(x), W_MOD).chunk(2, dim=1)
    out = F.layer_norm(y, (H * E,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return out.flatten(1)


def _timestep_embedding(x):
    """diffusers' get_timestep_embedding (flipped, freq shift 1) of a time built from x."""
    from diffusers.models.embeddings import get_timestep_embedding
    t = 500 * torch.sigmoid(x[:, 0]) + x[:, 1] ** 2
    return get_timestep_embedding(t, 16, flip_sin_to_cos=True, downscale_freq_shift=1)


def _image(x):
    return torch.sin(x).reshape(B, 2, 4, 6)


def _on_image(op, *args, **kwargs):
    return lambda x: op(_image(x), *args, **kwargs).flatten(1)


def _products(a, b, c=None):
    """Products of the parts of a split: a b + c, or sum(a) b."""
    return a * b + c if c is not None else a.sum(-1, keepdim=True) * b


FUNCS = {
    "sdpa": _attn(),
    "sdpa_scale": _attn(scale=0.3),
    "sdpa_causal": _attn(is_causal=True),
    "sdpa_bool_mask": _attn(attn_mask=BOOL_MASK),
    "sdpa_float_mask": _attn(attn_mask=FLOAT_MASK),
    "sdpa_fully_masked": _fully_masked,
    "sdpa_jet_mask": _jet_mask,
    "sdpa_constant_qk": _constant_qk,
    "sdpa_gqa": _gqa,
    "baddbmm_empty": _baddbmm(0, None),
    "baddbmm_mask": _baddbmm(1, FLOAT_MASK),
    "addmm": lambda x: torch.addmm(torch.sin(x[:, :5]), x[:, :6].reshape(B, 6) * x[:, 6:12],
                                   WQ[:6, :5], beta=0.5, alpha=2.0),
    "addbmm": lambda x: torch.addbmm(torch.cos(x[0, :4]).reshape(2, 2),
                                     x[:, :6].reshape(B, 2, 3), torch.sin(x[:, 6:12]).reshape(
                                         B, 3, 2)).flatten()[None].expand(B, 4),
    "layer_norm": _layer_norm,
    "layer_norm_plain": lambda x: F.layer_norm(x * x, x.shape[1:]),
    "layer_norm_jet_weight": lambda x: F.layer_norm(x.reshape(B, N, H * E), (H * E,),
                                                    torch.cos(x[:, :H * E])[:, None]).flatten(1),
    "rms_norm": lambda x: F.rms_norm(torch.tanh(x).reshape(B, N, H * E), (H * E,),
                                     LN_W).flatten(1),
    "adaptive_norm": _adaptive_norm,
    "gelu_tanh": lambda x: F.gelu(3 * x, approximate="tanh"),
    "timestep_embedding": _timestep_embedding,
    "interp_nearest": _on_image(F.interpolate, scale_factor=2.0, mode="nearest"),
    "interp_nearest_size": _on_image(F.interpolate, size=(9, 5)),
    "interp_bilinear": _on_image(F.interpolate, scale_factor=2, mode="bilinear",
                                 align_corners=False),
    "interp_bicubic": _on_image(F.interpolate, size=(7, 7), mode="bicubic", align_corners=True),
    "interp_area": _on_image(F.interpolate, size=(3, 4), mode="area"),
    "avg_pool2d": _on_image(F.avg_pool2d, kernel_size=2, stride=2),
    "avg_pool2d_pad": _on_image(F.avg_pool2d, 3, 1, 1, count_include_pad=False),
    "adaptive_avg_pool2d": _on_image(F.adaptive_avg_pool2d, (2, 3)),
    "chunk": lambda x: torch.mul(*torch.sin(x).chunk(2, dim=1)),
    "chunk_method": lambda x: _products(*x.reshape(B, 3, -1).chunk(3, 1)).flatten(1),
    "split_sizes": lambda x: _products(*torch.split(x, [10, 38], -1)),
    "split_int_dim0": lambda x: torch.cat(torch.cos(x).split(2), 0) * x,
    "tensor_split": lambda x: torch.cat([p * p for p in torch.tensor_split(x, 3, dim=1)], 1),
    "unbind": lambda x: torch.stack([p * q for p, q in zip(
        x.reshape(B, 2, -1).unbind(1), torch.sin(x).reshape(B, 2, -1).unbind(1))]),
    "repeat_interleave": lambda x: torch.sin(x).repeat_interleave(2, dim=1),
}
#: diffusers computes the timestep embedding in float32 (timesteps.float()), both ways
TOL = {"timestep_embedding": 1e-6}
D_IN = N * H * E


def _reference(fn, rows, layout):
    with autodiff_backends():
        return nested_jvp_rows(fn, rows, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("name", sorted(FUNCS))
def test_rule_matches_nested_jvp(name, layout, gen):
    fn = FUNCS[name]
    x = torch.randn(B, D_IN, generator=gen, dtype=F64)
    rows = torch.cat([x[None], torch.randn((layout.rows - 1, B, D_IN), generator=gen,
                                           dtype=F64)])     # second-order input rows too
    got = fn(Jet(rows, layout))
    assert isinstance(got, Jet), f"{name}: the output has no rows"
    want = _reference(fn, rows, layout)
    assert got.rows.shape == want.shape
    assert torch.isfinite(want).all()
    err = (got.rows - want).abs().max().item()
    assert err <= TOL.get(name, 1e-11) * (1 + want.abs().max().item()), f"{name}: max error {err}"


def test_fully_masked_queries_give_zero_rows_and_finite_gradients(gen):
    layout = LAYOUTS["mixed"]
    w = WQ.clone().requires_grad_(True)
    x = torch.randn(layout.rows, B, D_IN, generator=gen, dtype=F64)
    m = BOOL_MASK.clone()
    m[1] = False

    def fn(y):
        q = _heads(y @ w.T)
        _, k, v = _qkv(y)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    out = fn(Jet(x, layout)).rows
    assert torch.equal(out[:, :, :, 1], torch.zeros_like(out[:, :, :, 1]))
    (g,) = torch.autograd.grad(out.pow(2).sum(), w)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_attention_rules_pass_gradients_like_nested_jvp(gen):
    """Parameter gradients through the attention and LayerNorm rules equal those through
    nested jvp (autograd differentiates the rows the rules build)."""
    layout = LAYOUTS["collapsed"]
    w = WK.clone().requires_grad_(True)
    x = torch.randn(layout.rows, B, D_IN, generator=gen, dtype=F64)

    def fn(y):
        q, _, v = _qkv(y)
        k = _heads(F.layer_norm(y @ w.T, (D_IN,)))
        return F.gelu(F.scaled_dot_product_attention(q, k, v, attn_mask=FLOAT_MASK),
                      approximate="tanh")

    got = torch.autograd.grad(fn(Jet(x, layout)).rows.pow(2).sum(), w)[0]
    want = torch.autograd.grad(_reference(fn, x, layout).pow(2).sum(), w)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


def test_refusals_name_the_call(gen):
    x = Jet(torch.randn(3, B, D_IN, generator=gen, dtype=F64), Layout(n1=2))
    q, k, v = _qkv(x)
    with pytest.raises(JetUnsupported, match=r"scaled_dot_product_attention\(dropout_p=0.1\)"):
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="exclusive"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=BOOL_MASK, is_causal=True)
    with pytest.raises(JetUnsupported, match=r"gelu\(approximate='cubic'\)"):
        F.gelu(x, approximate="cubic")
    with pytest.raises(JetUnsupported, match="max_pool2d") as info:
        F.max_pool2d(x.reshape(B, 2, 4, 6), 2)
    assert info.value.function == "max_pool2d" and info.value.module is None


def test_layer_norm_second_order_matches_finite_differences(gen):
    """The LayerNorm rule's collapsed row against central differences of torch's own
    layer_norm (no autograd at all), where nested jvp of layer_norm is wrong."""
    layout = Layout(n1=1, collapse=(1,))
    x = torch.randn(B, N, H * E, generator=gen, dtype=F64)
    v = torch.randn(B, N, H * E, generator=gen, dtype=F64)
    fn = lambda y: F.layer_norm(y, (H * E,), LN_W, LN_B, eps=1e-3)  # noqa: E731
    rows = fn(Jet(torch.stack([x, v, torch.zeros_like(x)]), layout)).rows
    h = 1e-3
    fd1 = (fn(x + h * v) - fn(x - h * v)) / (2 * h)
    fd2 = (fn(x + h * v) - 2 * fn(x) + fn(x - h * v)) / h ** 2
    assert torch.allclose(rows[1], fd1, atol=1e-5) and torch.allclose(rows[2], fd2, atol=1e-4)

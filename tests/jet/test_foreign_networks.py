"""The fused residual, strict (no fallback), on networks fpkern did not write: a diffusers
UNet2DModel with attention (s = -eps(x, 999 t) / sigma(t), VP), a diffusers DiT (the same
convention, one class label) and an EDM-style denoiser D(x; sigma) = c_skip x +
c_out F(c_in x, c_noise) (s = (D - x) / sigma^2, VE) around a small conv net with adaptive
GroupNorm, pooling, bilinear upsampling and attention. Wrappers are written here, tiny;
the official adapters live in fpkern.models.

method "exact" is the reference (float64, full Jacobians by torch.func), with the score
evaluated under forward_mode.autodiff_backends(): math attention, group_norm on contiguous
inputs, LayerNorm by its formula (torch's own derivative formulas fail or are wrong there).
Fused with the scaled coordinate basis as probes (v_k = sqrt(D) e_k, so that
1/K sum_k v_k v_k^T = I) is exact too: the two must agree to rounding. Inputs are 4x4
images (D = 16) so that the exact Jacobians take seconds.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fpkern.jet import JetUnsupported
from fpkern.jet.rules import HANDLERS
from fpkern.ops import fpe_residual, fpe_terms, forward_mode
from fpkern.ops.forward_mode import autodiff_backends
from fpkern.sde import VESDE, VPSDE

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
SIDE = 4
TIMES = torch.tensor([0.2, 0.5, 0.8], dtype=F64)


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).double().eval()


def _dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
        num_layers=1, sample_size=SIDE, patch_size=2, num_embeds_ada_norm=10,
        norm_num_groups=8).double().eval()


class NoisePrediction(nn.Module):
    """s(x, t) = -eps(x, 999 t) / sigma(t) for an eps-network on diffusers' timesteps."""

    def __init__(self, net, sde, **kwargs):
        super().__init__()
        self.net, self.sde, self.kwargs = net, sde, kwargs

    def forward(self, x, t):
        labels = {"class_labels": torch.zeros(x.shape[0], dtype=torch.long)} if self.kwargs else {}
        eps = self.net(x, 999 * t, **labels).sample
        return -eps / self.sde.sigma(t)[:, None, None, None]


class SelfAttention(nn.Module):
    def __init__(self, ch, heads=2, dropout_p=0.0):
        super().__init__()
        self.qkv, self.heads, self.dropout_p = nn.Conv2d(ch, 3 * ch, 1), heads, dropout_p
        self.norm = nn.LayerNorm(ch)

    def forward(self, h):
        B, C, H, W = h.shape
        qkv = self.qkv(h).flatten(2).transpose(1, 2).reshape(B, H * W, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training
                                           else 0.0)
        a = self.norm(a.transpose(1, 2).reshape(B, H * W, C))
        return h + a.transpose(1, 2).reshape(B, C, H, W)


class TinyNet(nn.Module):
    """F(x, c_noise): sinusoidal noise embedding -> scale/shift of a GroupNorm (adaptive
    normalisation), average pooling, attention at the low resolution, bilinear upsampling."""

    def __init__(self, ch=8, emb=16, attn_dropout=0.0):
        super().__init__()
        self.emb = emb
        self.map = nn.Sequential(nn.Linear(emb, 32), nn.SiLU(), nn.Linear(32, 2 * ch))
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.norm = nn.GroupNorm(4, ch, affine=False)
        self.conv_mid = nn.Conv2d(ch, ch, 3, padding=1)
        self.attn = SelfAttention(ch, dropout_p=attn_dropout)
        self.conv_out = nn.Conv2d(2 * ch, 1, 3, padding=1)

    def forward(self, x, c_noise):
        half = self.emb // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=x.dtype) / half)
        e = c_noise[:, None] * freqs
        scale, shift = self.map(torch.cat([torch.cos(e), torch.sin(e)], 1)).chunk(2, dim=1)
        h = self.conv_in(x)
        h = F.silu(self.norm(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        low = self.attn(F.avg_pool2d(self.conv_mid(h), 2))
        up = F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv_out(torch.cat([up, h], 1))


class EDMScore(nn.Module):
    """s = (D(x; sigma) - x) / sigma^2, D = c_skip x + c_out F(c_in x, log(sigma) / 4)."""

    def __init__(self, net, sde, sigma_data=0.5):
        super().__init__()
        self.net, self.sde, self.sd = net, sde, sigma_data

    def forward(self, x, t):
        sigma = self.sde.sigma(t)[:, None, None, None]
        norm = (sigma ** 2 + self.sd ** 2).sqrt()
        c_skip, c_out, c_in = self.sd ** 2 / norm ** 2, sigma * self.sd / norm, 1 / norm
        D = c_skip * x + c_out * self.net(c_in * x, sigma.flatten().log() / 4)
        return (D - x) / sigma ** 2


def _edm(**kw):
    torch.manual_seed(0)
    return TinyNet(**kw).double().eval()


NETWORKS = {"unet": lambda: NoisePrediction(_unet(), VPSDE()),
            "dit": lambda: NoisePrediction(_dit(), VPSDE(), labels=True),
            "edm": lambda: EDMScore(_edm(), VESDE())}


@pytest.fixture(scope="module")
def nets():
    return {name: make() for name, make in NETWORKS.items()}


def _reference(score):
    def run(x, t):
        with autodiff_backends():
            return score(x, t)
    return run


def _inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, SIDE, SIDE, generator=g, dtype=F64), TIMES[:B]


def _basis_probes(x):
    """v_k = sqrt(D) e_k: the Hutchinson estimates with these probes are exact."""
    D = x[0].numel()
    eye = math.sqrt(D) * torch.eye(D, dtype=x.dtype)
    return eye[:, None, :].expand(D, x.shape[0], D).reshape((D,) + tuple(x.shape)).contiguous()


def _random_probes(x, K=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((K,) + tuple(x.shape), generator=g, dtype=x.dtype)


def _assert_close(got, want, rtol, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert scale > 1e-3, f"{what}: a trivial reference ({scale})"
    assert err <= rtol * scale, f"{what}: max error {err} of {scale}"


@pytest.mark.parametrize("form", ["div", "laplacian"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_fused_strict_matches_the_exact_residual(nets, name, form):
    score = nets[name]
    x, t = _inputs()
    got = fpe_residual(score, x, t, score.sde, form=form, method="fused", strict=True,
                       probes=_basis_probes(x))
    want = fpe_residual(_reference(score), x, t, score.sde, form=form, method="exact")
    _assert_close(got, want, 1e-9, f"{name} {form}")


@pytest.mark.parametrize("name", ["dit", "edm"])
def test_parameter_gradients_match_the_exact_method(nets, name):
    """d|r|^2/dtheta through the fused div form (its forward-mode backward, fpkern.ops.fused_div)
    and the laplacian form against float64 autograd through method "exact"."""
    score = nets[name]
    x, t = _inputs(B=2)
    params = [p for p in score.parameters() if p.requires_grad]
    V = _basis_probes(x)
    for form in ("div", "laplacian"):
        r = fpe_residual(score, x, t, score.sde, form=form, method="fused", strict=True, probes=V)
        got = torch.autograd.grad(r.pow(2).sum(), params, allow_unused=True)
        ref = fpe_residual(_reference(score), x, t, score.sde, form=form, method="exact")
        want = torch.autograd.grad(ref.pow(2).sum(), params, allow_unused=True)
        scale = max(w.abs().max().item() for w in want if w is not None)
        for g, w in zip(got, want):
            if w is None:
                assert g is None or g.abs().max() == 0
                continue
            assert (g - w).abs().max().item() <= 1e-8 * scale, f"{name} {form}"


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fpe_terms_strict_and_the_generic_path_agree(nets, name):
    """fpe_terms (strict) gives fpe_residual's residual and the score itself; the generic
    torch.func path (forward_mode, what the fallback runs) gives the same residual on
    these networks: math attention, contiguous group_norm and LayerNorm by its formula."""
    score = nets[name]
    x, t = _inputs(B=2)
    V = _random_probes(x)
    s = score(x, t)
    for form in ("div", "laplacian"):
        r = fpe_residual(score, x, t, score.sde, form=form, method="fused", strict=True, probes=V)
        terms = fpe_terms(score, x, t, score.sde, form=form, probes=V, strict=True,
                          score=s if form == "laplacian" else None)
        _assert_close(terms.residual, r, 1e-10, f"{name} {form} fpe_terms")
        _assert_close(terms.score, s, 1e-12, f"{name} {form} score")
        generic = forward_mode.residual(score, x, t, score.sde, form, V)
        _assert_close(generic, r, 1e-9, f"{name} {form} generic")


def test_hand_written_attention_runs_the_same_rules(nets, monkeypatch):
    """diffusers' classic AttnProcessor (baddbmm over torch.empty, softmax, bmm) gives the
    residual of its SDPA processor (softmax kept in float64: the UNet's attention blocks
    upcast it to float32 otherwise)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor
    score = nets["unet"]
    x, t = _inputs(B=2)
    V = _random_probes(x)
    fused = fpe_residual(score, x, t, score.sde, form="laplacian", method="fused",
                         strict=True, probes=V)
    classic = NoisePrediction(_unet(), VPSDE())
    for m in classic.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
            m.upcast_softmax = False
    calls = []
    rule = HANDLERS[torch.baddbmm]
    monkeypatch.setitem(HANDLERS, torch.baddbmm, lambda *a: calls.append(1) or rule(*a))
    got = fpe_residual(classic, x, t, score.sde, form="laplacian", method="fused", strict=True,
                       probes=V)
    assert calls, "the classic processor did not reach the baddbmm rule"
    _assert_close(got, fused, 1e-10, "baddbmm attention")


def test_strict_names_the_function_and_the_module(caplog):
    """An op without a jet rule raises under strict=True, naming the function and the module
    path; without strict the op falls back (logging the same) and gives the generic path's
    residual."""
    unet = NoisePrediction(_unet(), VPSDE())
    unet.net.mid_block.resnets[0].nonlinearity = nn.Mish()
    x, t = _inputs(B=2)
    V = _random_probes(x, K=1)
    where = r"net\.mid_block\.resnets\.0\.nonlinearity \(Mish\): mish: no jet rule"
    for form in ("div", "laplacian"):
        with pytest.raises(JetUnsupported, match=where) as info:
            fpe_residual(unet, x, t, unet.sde, form=form, method="fused", strict=True, probes=V)
        assert info.value.function == "mish"
        assert info.value.module == "net.mid_block.resnets.0.nonlinearity (Mish)"
        with pytest.raises(JetUnsupported, match=where):
            fpe_terms(unet, x, t, unet.sde, form=form, probes=V, strict=True)

    edm = EDMScore(_edm(attn_dropout=0.1), VESDE()).train()
    with pytest.raises(JetUnsupported, match=r"^net\.attn \(SelfAttention\): scaled_dot_product"
                                             r"_attention\(dropout_p=0\.1\): dropout"):
        fpe_residual(edm, x, t, edm.sde, method="fused", strict=True, probes=V)

    edm = EDMScore(_edm(), VESDE())
    edm.net.map[1] = nn.Mish()
    with caplog.at_level("WARNING"):
        got = fpe_residual(edm, x, t, edm.sde, form="laplacian", method="fused", probes=V)
    assert "net.map.1 (Mish): mish: no jet rule" in caplog.text
    want = forward_mode.residual(edm, x, t, edm.sde, "laplacian", V)
    _assert_close(got, want, 1e-12, "fallback")


def test_strict_needs_the_fused_method(nets):
    score = nets["edm"]
    x, t = _inputs(B=1)
    with pytest.raises(ValueError, match="strict=True checks the jet rules of method 'fused'"):
        fpe_residual(score, x, t, score.sde, method="exact", strict=True)



@pytest.mark.parametrize("method", ["naive", "exact"])
def test_naive_and_exact_run_on_the_unet_with_attention(nets, method):
    """The public naive and exact methods run on an attention network without the caller
    choosing a backend (CPU flash attention has neither forward mode nor a double
    backward); exact agrees with the fused residual."""
    score = nets["unet"]
    x, t = _inputs()
    got = fpe_residual(score, x, t, score.sde, form="div", method=method,
                       probes=_basis_probes(x))
    assert torch.isfinite(got).all()
    if method == "exact":
        want = fpe_residual(score, x, t, score.sde, form="div", method="fused",
                            probes=_basis_probes(x))
        _assert_close(got, want, 1e-9, "unet exact")

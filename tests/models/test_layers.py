"""Each Score SDE layer against its defining formula, written here with plain tensor ops."""

import math

import pytest
import torch
import torch.nn.functional as F

from fpkern.models import fir, layers as L

from conftest import randomize_

torch.set_default_dtype(torch.float32)
f64 = torch.float64


def gn(x, groups, weight, bias, eps=1e-6):
    """GroupNorm formula: per sample and group, (x - mean) / sqrt(var + eps), then affine."""
    B, C, H, W = x.shape
    xg = x.reshape(B, groups, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    y = ((xg - mu) / torch.sqrt(var + eps)).reshape(B, C, H, W)
    return y * weight[None, :, None, None] + bias[None, :, None, None]


def silu(x):
    return x / (1 + torch.exp(-x))


def conv(x, c, stride=1, padding=1):
    return F.conv2d(x, c.weight, c.bias, stride=stride, padding=padding)


def test_default_init_variance_scaling():
    torch.manual_seed(0)
    shape = (64, 32, 3, 3)                       # fan_in 288, fan_out 576
    w = L.default_init(shape, scale=2.0)
    bound = math.sqrt(3 * 2.0 / ((32 * 9 + 64 * 9) / 2))
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.98 * bound           # uniform on the whole interval
    assert abs(w.var().item() - bound ** 2 / 3) < 0.05 * bound ** 2 / 3
    tiny = L.default_init((8, 8), scale=0.0)      # scale 0 means 1e-10
    assert 0 < tiny.abs().max() <= math.sqrt(3e-10 / 8)


def test_conv_and_dense_init():
    c = L.conv3x3(4, 6, init_scale=0.0)
    assert torch.all(c.bias == 0) and c.weight.abs().max() < 1e-4
    d = L.dense(10, 20)
    assert torch.all(d.bias == 0) and d.weight.abs().max() <= math.sqrt(3 / 15)


def test_group_norm_matches_torch():
    """fpkern's composite GroupNorm agrees with torch's fused kernel, channels-last too."""
    m = L.group_norm(12)
    assert isinstance(m, torch.nn.GroupNorm) and m.num_groups == 3 and m.eps == 1e-6
    randomize_(m)
    x = torch.randn(2, 12, 5, 3).to(memory_format=torch.channels_last)
    ref = F.group_norm(x.contiguous(), 3, m.weight, m.bias, 1e-6)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert L.group_norm(256).num_groups == 32


def test_nin_formula():
    nin = randomize_(L.NIN(3, 5)).double()
    x = torch.randn(2, 3, 4, 6, dtype=f64)
    ref = torch.zeros(2, 5, 4, 6, dtype=f64)
    for o in range(5):
        ref[:, o] = sum(x[:, c] * nin.W[c, o] for c in range(3)) + nin.b[o]
    torch.testing.assert_close(nin(x), ref)
    assert nin.W.shape == (3, 5) and nin.b.shape == (5,)


def test_gaussian_fourier_projection():
    torch.manual_seed(0)
    emb = L.GaussianFourierProjection(embedding_size=6, scale=16.0)
    assert not emb.W.requires_grad and emb.W.shape == (6,)
    assert 16 * 0.1 < emb.W.std() < 16 * 3
    emb = emb.double()
    s = torch.tensor([0.3, -1.2], dtype=f64)
    out = emb(s)
    for b in range(2):
        for i in range(6):
            arg = 2 * math.pi * s[b].item() * emb.W[i].item()
            assert out[b, i].item() == pytest.approx(math.sin(arg), abs=1e-9)
            assert out[b, 6 + i].item() == pytest.approx(math.cos(arg), abs=1e-9)


@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_formula(dim):
    t = torch.tensor([0.0, 1.0, 417.5, 999.0], dtype=f64)
    emb = L.timestep_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (4, dim) and emb.dtype == f64
    for b in range(4):
        for i in range(half):
            w = 10000.0 ** (-i / (half - 1))           # frequencies from 1 to 1/10000
            assert emb[b, i].item() == pytest.approx(math.sin(t[b].item() * w), abs=1e-9)
            assert emb[b, half + i].item() == pytest.approx(math.cos(t[b].item() * w), abs=1e-9)
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)
    assert L.timestep_embedding(torch.tensor([3, 4]), 8).dtype == torch.float32


def attention_ref(x, blk, groups, skip_rescale):
    """softmax(Q^T K / sqrt(C)) V over the H*W positions, as matrices."""
    B, C, H, W = x.shape
    h = gn(x, groups, blk.GroupNorm_0.weight, blk.GroupNorm_0.bias).reshape(B, C, H * W)

    def nin(m, z):
        return m.W.T @ z + m.b[:, None]
    q, k, v = nin(blk.NIN_0, h), nin(blk.NIN_1, h), nin(blk.NIN_2, h)
    a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)       # [B, HW(query), HW(key)]
    out = nin(blk.NIN_3, v @ a.transpose(1, 2)).reshape(B, C, H, W)
    return (x + out) / math.sqrt(2) if skip_rescale else x + out


@pytest.mark.parametrize("skip_rescale,num_groups", [(True, None), (False, None), (False, 32)])
def test_attention_block(skip_rescale, num_groups):
    C = 64 if num_groups else 12
    blk = randomize_(L.AttnBlock(C, skip_rescale=skip_rescale, num_groups=num_groups)).double()
    assert blk.GroupNorm_0.num_groups == (num_groups or min(C // 4, 32))
    x = torch.randn(2, C, 3, 5, dtype=f64)
    torch.testing.assert_close(blk(x), attention_ref(x, blk, blk.GroupNorm_0.num_groups, skip_rescale))


def test_attention_output_is_zero_initialised():
    blk = L.AttnBlock(8, init_scale=0.0)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(blk(x), x, atol=1e-3, rtol=0)


@pytest.mark.parametrize("in_ch,out_ch,skip_rescale", [(8, 8, False), (8, 12, True)])
def test_resnet_block_ddpmpp(in_ch, out_ch, skip_rescale):
    act = torch.nn.SiLU()
    blk = randomize_(L.ResnetBlockDDPMpp(act, in_ch, out_ch, temb_dim=6, dropout=0.0,
                                         skip_rescale=skip_rescale)).double()
    x, temb = torch.randn(2, in_ch, 4, 4, dtype=f64), torch.randn(2, 6, dtype=f64)
    h = conv(silu(gn(x, in_ch // 4, blk.GroupNorm_0.weight, blk.GroupNorm_0.bias)), blk.Conv_0)
    h = h + (silu(temb) @ blk.Dense_0.weight.T + blk.Dense_0.bias)[:, :, None, None]
    h = conv(silu(gn(h, out_ch // 4, blk.GroupNorm_1.weight, blk.GroupNorm_1.bias)), blk.Conv_1)
    skip = x if in_ch == out_ch else torch.einsum("bchw,co->bohw", x, blk.NIN_0.W) + blk.NIN_0.b[:, None, None]
    ref = (skip + h) / math.sqrt(2) if skip_rescale else skip + h
    torch.testing.assert_close(blk(x, temb), ref)


@pytest.mark.parametrize("mode", ["none", "up", "down"])
@pytest.mark.parametrize("use_fir", [True, False])
def test_resnet_block_biggan(mode, use_fir):
    act = torch.nn.SiLU()
    blk = randomize_(L.ResnetBlockBigGAN(act, 8, 8 if mode != "none" else 12, temb_dim=6,
                                         up=mode == "up", down=mode == "down", dropout=0.0,
                                         fir=use_fir)).double()
    x, temb = torch.randn(2, 8, 4, 4, dtype=f64), torch.randn(2, 6, dtype=f64)
    k = fir.setup_kernel([1, 3, 3, 1], dtype=f64)

    def resample(z):
        if mode == "up":   # FIR: the closed form checked in test_fir; naive: nearest
            return fir.upsample_2d(z, k) if use_fir else z.repeat_interleave(2, 2).repeat_interleave(2, 3)
        if mode == "down":
            return fir.downsample_2d(z, k) if use_fir else F.avg_pool2d(z, 2)
        return z
    out_ch = blk.out_ch
    h = resample(silu(gn(x, 2, blk.GroupNorm_0.weight, blk.GroupNorm_0.bias)))
    h = conv(h, blk.Conv_0) + (silu(temb) @ blk.Dense_0.weight.T + blk.Dense_0.bias)[:, :, None, None]
    h = conv(silu(gn(h, out_ch // 4, blk.GroupNorm_1.weight, blk.GroupNorm_1.bias)), blk.Conv_1)
    skip = conv(resample(x), blk.Conv_2, padding=0)
    torch.testing.assert_close(blk(x, temb), (skip + h) / math.sqrt(2))
    # without a time embedding the Dense branch is skipped
    assert blk(x, None).shape == blk(x, temb).shape


def test_resnet_block_ddpm_legacy():
    act = torch.nn.SiLU()
    blk = randomize_(L.ResnetBlockDDPM(act, 32, 64, temb_dim=6, dropout=0.0)).double()
    x, temb = torch.randn(2, 32, 4, 4, dtype=f64), torch.randn(2, 6, dtype=f64)
    h = conv(silu(gn(x, 32, blk.GroupNorm_0.weight, blk.GroupNorm_0.bias)), blk.Conv_0)
    h = h + (silu(temb) @ blk.Dense_0.weight.T + blk.Dense_0.bias)[:, :, None, None]
    h = conv(silu(gn(h, 32, blk.GroupNorm_1.weight, blk.GroupNorm_1.bias)), blk.Conv_1)
    skip = torch.einsum("bchw,co->bohw", x, blk.NIN_0.W) + blk.NIN_0.b[:, None, None]
    torch.testing.assert_close(blk(x, temb), skip + h)


def test_parameter_order_is_score_sde_attribute_order():
    """Score SDE's EMA shadow list follows parameters() order, i.e. attribute order."""
    act = torch.nn.SiLU()
    names = lambda m: [n for n, _ in m.named_parameters()]   # noqa: E731
    assert names(L.ResnetBlockDDPMpp(act, 8, 12, temb_dim=4)) == [
        "GroupNorm_0.weight", "GroupNorm_0.bias", "Conv_0.weight", "Conv_0.bias", "Dense_0.weight",
        "Dense_0.bias", "GroupNorm_1.weight", "GroupNorm_1.bias", "Conv_1.weight", "Conv_1.bias",
        "NIN_0.W", "NIN_0.b"]
    assert names(L.ResnetBlockDDPM(act, 32, 64, temb_dim=4)) == [
        "GroupNorm_0.weight", "GroupNorm_0.bias", "GroupNorm_1.weight", "GroupNorm_1.bias",
        "Conv_0.weight", "Conv_0.bias", "Conv_1.weight", "Conv_1.bias", "Dense_0.weight",
        "Dense_0.bias", "NIN_0.W", "NIN_0.b"]
    assert names(L.ResnetBlockBigGAN(act, 8, 8, temb_dim=4, down=True, fir=True)) == [
        "GroupNorm_0.weight", "GroupNorm_0.bias", "Conv_0.weight", "Conv_0.bias", "Dense_0.weight",
        "Dense_0.bias", "GroupNorm_1.weight", "GroupNorm_1.bias", "Conv_1.weight", "Conv_1.bias",
        "Conv_2.weight", "Conv_2.bias"]
    # the FIR kernel is a buffer that follows .to() but is not in the state_dict
    blk = L.Upsample(4, with_conv=True, fir=True)
    assert set(blk.state_dict()) == {"Conv2d_0.weight", "Conv2d_0.bias"}
    assert blk.double().fir_kernel.dtype == f64


def test_up_and_down_sample_without_fir():
    up = randomize_(L.Upsample(4, with_conv=True)).double()
    x = torch.randn(2, 4, 3, 3, dtype=f64)
    nearest = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(up(x), conv(nearest, up.Conv_0))
    down = randomize_(L.Downsample(4, with_conv=True)).double()
    x = torch.randn(2, 4, 6, 6, dtype=f64)
    padded = torch.zeros(2, 4, 7, 7, dtype=f64)
    padded[..., :6, :6] = x                                    # TF 'SAME': pad bottom/right
    torch.testing.assert_close(down(x), conv(padded, down.Conv_0, stride=2, padding=0))
    torch.testing.assert_close(L.Downsample(4)(x), F.avg_pool2d(x, 2))


def test_fir_resample_modules():
    x = torch.randn(2, 4, 6, 6, dtype=f64)
    k = fir.setup_kernel([1, 3, 3, 1], dtype=f64)
    torch.testing.assert_close(L.Upsample(4, fir=True).double()(x), fir.upsample_2d(x, k))
    torch.testing.assert_close(L.Downsample(4, fir=True).double()(x), fir.downsample_2d(x, k))
    d = randomize_(L.Downsample(4, 6, with_conv=True, fir=True)).double()
    w, b = d.Conv2d_0.weight, d.Conv2d_0.bias
    torch.testing.assert_close(d(x), fir.conv_downsample_2d(x, w, k) + b[None, :, None, None])
    assert d(x).shape == (2, 6, 3, 3)
    u = randomize_(L.Upsample(4, 6, with_conv=True, fir=True)).double()
    assert u(x).shape == (2, 6, 12, 12)


def test_combine():
    c = randomize_(L.Combine(3, 5, method="sum")).double()
    x, y = torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 5, 4, 4, dtype=f64)
    torch.testing.assert_close(c(x, y), conv(x, c.Conv_0, padding=0) + y)
    c.method = "cat"
    torch.testing.assert_close(c(x, y), torch.cat([conv(x, c.Conv_0, padding=0), y], 1))
    with pytest.raises(ValueError, match="valid names"):
        L.Combine(3, 5, method="mean")


def test_get_act():
    assert isinstance(L.get_act("swish"), torch.nn.SiLU)
    assert L.get_act("lrelu").negative_slope == 0.2
    with pytest.raises(ValueError, match="valid names"):
        L.get_act("gelu")

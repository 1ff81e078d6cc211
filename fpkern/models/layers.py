"""Layers of Score SDE's NCSN++ / DDPM++ / DDPM networks, parameter for parameter.

Attribute names and their assignment order are Score SDE's (``GroupNorm_0``, ``Conv_0``,
``Dense_0``, ``NIN_0.W`` ...), so ``state_dict`` keys and the order of ``parameters()``
(which Score SDE's EMA ``shadow_params`` list relies on) are identical. Initialisation is
Score SDE's ``default_init``: variance scaling, fan_avg, uniform; a scale of 0 means 1e-10.

Forward passes use no in-place ops, so ``torch.func.jvp`` and double backward go through
every layer, in any floating dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpkern.models import fir as _fir

__all__ = [
    "ACTIVATIONS", "get_act", "default_init", "conv1x1", "conv3x3", "dense", "NIN",
    "GaussianFourierProjection", "timestep_embedding", "Combine", "AttnBlock", "Upsample",
    "Downsample", "FIRConv2d", "ResnetBlockDDPMpp", "ResnetBlockBigGAN", "ResnetBlockDDPM",
    "group_norm", "GroupNorm",
]

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2), "swish": nn.SiLU}


def get_act(name: str) -> nn.Module:
    """Activation module by Score SDE name: elu, relu, lrelu (slope 0.2), swish (SiLU)."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; valid names: {sorted(ACTIVATIONS)}") from None


# ---- initialisation -------------------------------------------------------------------
def default_init(shape: Sequence[int], scale: float = 1.0, *, in_axis: int = 1,
                 out_axis: int = 0) -> torch.Tensor:
    """Variance scaling, fan_avg, uniform (DDPM's init): U(-a, a), a = sqrt(3 scale / fan_avg).

    fan_in = shape[in_axis] * receptive field, fan_out = shape[out_axis] * receptive field.
    """
    scale = 1e-10 if scale == 0 else float(scale)
    numel = math.prod(shape)
    receptive = numel / shape[in_axis] / shape[out_axis]
    fan_avg = (shape[in_axis] + shape[out_axis]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    return (torch.rand(*shape) * 2 - 1) * bound


def _init_(module: nn.Module, scale: float = 1.0) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(default_init(module.weight.shape, scale))
        if module.bias is not None:
            module.bias.zero_()
    return module


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, bias: bool = True, padding: int = 1,
            init_scale: float = 1.0) -> nn.Conv2d:
    """3x3 convolution with DDPM initialisation (Score SDE ``ddpm_conv3x3``)."""
    return _init_(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, bias=bias), init_scale)


def conv1x1(in_ch: int, out_ch: int, *, bias: bool = True, init_scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution with DDPM initialisation (Score SDE ``ddpm_conv1x1``)."""
    return _init_(nn.Conv2d(in_ch, out_ch, 1, bias=bias), init_scale)


def dense(in_features: int, out_features: int, *, init_scale: float = 1.0) -> nn.Linear:
    """Linear layer with DDPM initialisation and zero bias."""
    return _init_(nn.Linear(in_features, out_features), init_scale)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state_dict) that stays differentiable to any
    order in every mode the engine uses.

    - Plain tensors: ``F.group_norm`` on a contiguous input (channels-last inputs, which the
      einsum in ``NIN`` produces, break the fused kernel's forward-mode derivative). About
      20% of a small-NCSN++ DSM training step on CPU went to the composite below.
    - Under torch.func transforms (the generic path, fpkern/ops/forward_mode.py, and the
      exact method): the formula, (x - mean) / sqrt(var + eps) per sample and group, then
      the per-channel affine map, so that nested jvp and vmap see only elementwise ops and
      reductions on every device and torch version.
    - Jets (fpkern.jet): ``F.group_norm``, whose jet rule is one fused op
      (fpkern/jet/fused/group_norm_jet.py); the composite would expand into ~30 jet ops.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.overrides.has_torch_function_unary(x):          # a Jet (a tensor subclass)
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if not torch._C._are_functorch_transforms_active():
            return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias,
                                self.eps)
        shape = x.shape
        xg = x.reshape(shape[0], self.num_groups, -1)
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.affine:
            view = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(view) + self.bias.reshape(view)
        return y


def group_norm(channels: int, num_groups: int | None = None) -> GroupNorm:
    """GroupNorm with eps 1e-6; NCSN++ uses min(channels // 4, 32) groups, DDPM 32."""
    groups = min(channels // 4, 32) if num_groups is None else num_groups
    return GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """Per-pixel dense layer ("network in network"): y[b,o,h,w] = sum_c x[b,c,h,w] W[c,o] + b[o]."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init((in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[:, None, None]


# ---- time / noise-level embeddings ------------------------------------------------------
class GaussianFourierProjection(nn.Module):
    """[sin(2 pi s W), cos(2 pi s W)] with fixed W ~ N(0, scale^2) (not trained)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        proj = s[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Transformer sinusoidal embedding of DDPM: [sin(t w_i), cos(t w_i)], w_i = M^(-i/(d/2-1)).

    Computed in ``dtype`` (default: t's dtype if floating, else float32); odd dims are
    zero-padded.
    """
    if t.dim() != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(t.shape)}")
    if dtype is None:
        dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    rate = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=t.device) * -rate)
    arg = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


# ---- blocks ---------------------------------------------------------------------------
class Combine(nn.Module):
    """Merge the input pyramid into the main path: 1x1 conv of x, then concat or sum with y."""

    METHODS = ("cat", "sum")

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"unknown progressive_combine {method!r}; valid names: {list(self.METHODS)}")
        self.Conv_0 = conv1x1(dim1, dim2)       # layerspp.Combine's name
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class AttnBlock(nn.Module):
    """Spatial self-attention over H*W positions with a residual connection.

    NCSN++ (``AttnBlockpp``): min(C//4, 32) groups, output NIN scaled by ``init_scale``,
    optional 1/sqrt(2) skip rescale. DDPM (``AttnBlock``): 32 groups, init 0, no rescale.
    """

    def __init__(self, channels: int, *, skip_rescale: bool = False, init_scale: float = 0.0,
                 num_groups: int | None = None):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels, num_groups)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(C) ** -0.5)
        w = F.softmax(w.reshape(B, H, W, H * W), dim=-1).reshape(B, H, W, H, W)
        h = self.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


def _fir_buffer(module: nn.Module, fir_kernel) -> None:
    # Non-persistent: follows .to(dtype/device) but stays out of state_dict, as in Score SDE
    # (where the kernel is a plain tuple attribute).
    module.register_buffer("fir_kernel", _fir.setup_kernel(fir_kernel), persistent=False)


class FIRConv2d(nn.Module):
    """Convolution fused with FIR up- or down-sampling (Score SDE ``up_or_down_sampling.Conv2d``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, *, up: bool = False,
                 down: bool = False, resample_kernel=(1, 3, 3, 1), use_bias: bool = True):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d: up and down are exclusive")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"FIRConv2d: kernel size must be odd and >= 1, got {kernel}")
        self.weight = nn.Parameter(default_init((out_ch, in_ch, kernel, kernel)))
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up, self.down, self.kernel, self.use_bias = up, down, kernel, use_bias
        _fir_buffer(self, resample_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = _fir.upsample_conv_2d(x, self.weight, self.fir_kernel)
        elif self.down:
            x = _fir.conv_downsample_2d(x, self.weight, self.fir_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=self.kernel // 2)
        return x + self.bias.reshape(1, -1, 1, 1) if self.use_bias else x


class Upsample(nn.Module):
    """2x upsampling: nearest (+ 3x3 conv ``Conv_0``) or FIR (+ fused conv ``Conv2d_0``)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, with_conv: bool = False,
                 fir: bool = False, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv and not fir:
            self.Conv_0 = conv3x3(in_ch, out_ch)
        elif with_conv:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, up=True, resample_kernel=fir_kernel)
        elif in_ch != out_ch:
            raise ValueError("Upsample without conv cannot change the channel count")
        if fir:
            _fir_buffer(self, fir_kernel)
        self.fir, self.with_conv, self.out_ch = fir, with_conv, out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            h = _fir.naive_upsample_2d(x, 2)
            return self.Conv_0(h) if self.with_conv else h
        if self.with_conv:
            return self.Conv2d_0(x)
        return _fir.upsample_2d(x, self.fir_kernel, factor=2)


class Downsample(nn.Module):
    """2x downsampling: pad (0,1,0,1) + stride-2 3x3 conv or 2x2 average, or FIR (+ conv)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, with_conv: bool = False,
                 fir: bool = False, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv and not fir:
            self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif with_conv:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, down=True, resample_kernel=fir_kernel)
        elif in_ch != out_ch:
            raise ValueError("Downsample without conv cannot change the channel count")
        if fir:
            _fir_buffer(self, fir_kernel)
        self.fir, self.with_conv, self.out_ch = fir, with_conv, out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            x = F.pad(x, (0, 1, 0, 1))   # emulates TF 'SAME' padding
            return self.Conv_0(x) if self.with_conv else F.avg_pool2d(x, 2, stride=2)
        if self.with_conv:
            return self.Conv2d_0(x)
        return _fir.downsample_2d(x, self.fir_kernel, factor=2)


def _add_temb(block: nn.Module, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    if temb is None:
        return h
    return h + block.Dense_0(block.act(temb))[:, :, None, None]


def _skip(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block as in NCSN++ (``ResnetBlockDDPMpp``): GN-act-conv, +Dense(temb),
    GN-act-dropout-conv, shortcut by NIN (or 3x3 conv) when channels change."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None,
                 temb_dim: int | None = None, conv_shortcut: bool = False, dropout: float = 0.1,
                 skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale, self.act, self.out_ch = skip_rescale, act, out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        h = _add_temb(self, h, temb)
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if x.shape[1] != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return _skip(x, h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN residual block (``ResnetBlockBigGANpp``), optionally resampling both paths
    (FIR or naive) before the first conv; 1x1 conv shortcut when shape changes."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None,
                 temb_dim: int | None = None, up: bool = False, down: bool = False,
                 dropout: float = 0.1, fir: bool = False, fir_kernel=(1, 3, 3, 1),
                 skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.up, self.down, self.fir = up, down, fir
        if fir:
            _fir_buffer(self, fir_kernel)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.skip_rescale, self.act = skip_rescale, act
        self.in_ch, self.out_ch = in_ch, out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return (_fir.upsample_2d(x, self.fir_kernel) if self.fir
                    else _fir.naive_upsample_2d(x, 2))
        if self.down:
            return (_fir.downsample_2d(x, self.fir_kernel) if self.fir
                    else _fir.naive_downsample_2d(x, 2))
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = _add_temb(self, self.Conv_0(h), temb)
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return _skip(x, h, self.skip_rescale)


class ResnetBlockDDPM(nn.Module):
    """The original DDPM residual block (Score SDE ``layers.ResnetBlockDDPM``, used by the
    ``ddpm`` model): 32 groups, zero-init output conv, no skip rescale. Its attributes are
    assigned in a different order from ``ResnetBlockDDPMpp``, kept for ``parameters()`` order."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None,
                 temb_dim: int | None = None, conv_shortcut: bool = False, dropout: float = 0.1):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch, 32)
        self.GroupNorm_1 = group_norm(out_ch, 32)
        self.act = act
        self.Conv_0 = conv3x3(in_ch, out_ch)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=0.0)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.in_ch, self.out_ch, self.conv_shortcut = in_ch, out_ch, conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        h = _add_temb(self, h, temb)
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if x.shape[1] != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return x + h

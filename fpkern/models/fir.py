"""FIR up/down-sampling (StyleGAN2, as used by Score SDE's NCSN++), in plain PyTorch.

``upfirdn2d`` is the one primitive: upsample by inserting zeros, pad (negative pads
crop), convolve each channel with a 2-D FIR filter, keep every ``down``-th sample.
Everything here is a composition of differentiable torch ops (reshape, pad, depthwise
``conv2d``, ``conv_transpose2d``), so it runs on any device and dtype, with no compiled
op, and forward-mode AD (``torch.func.jvp``) goes through it.

Filters follow Score SDE's ``_setup_kernel``: a 1-D filter ``k`` becomes ``outer(k, k)``,
normalised to sum 1, then scaled by ``gain * factor**2`` for upsampling (``gain`` for
downsampling), so a constant image keeps its value.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "setup_kernel", "upfirdn2d", "upsample_2d", "downsample_2d", "upsample_conv_2d",
    "conv_downsample_2d", "naive_upsample_2d", "naive_downsample_2d",
]


def setup_kernel(k: Sequence[float] | torch.Tensor, *, dtype=torch.float32) -> torch.Tensor:
    """2-D FIR filter from a 1-D (separable) or 2-D one, normalised to sum 1."""
    # Computed on the CPU, then created on the default device (so a network built under
    # ``torch.device("meta")`` or ``"cuda"`` gets its buffer there).
    k = torch.as_tensor(k, dtype=torch.float64, device="cpu")
    if k.dim() == 1:
        k = torch.outer(k, k)
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    s = float(k.sum())
    if s == 0:
        raise ValueError("FIR kernel must not sum to zero")
    return torch.tensor((k / s).tolist(), dtype=dtype)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter and downsample each channel of x [N,C,H,W].

    Matches StyleGAN2's ``upfirdn2d`` with ``pad=(p0, p1)`` on both axes: the filter is
    applied as a true convolution (flipped), and the output has size
    ``(H * up + p0 + p1 - kh) // down + 1`` along H (likewise W).
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got {tuple(x.shape)}")
    n, c, h, w = x.shape
    p0, p1 = int(pad[0]), int(pad[1])
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    # F.pad crops on negative values, as upfirdn2d does.
    x = F.pad(x, (p0, p1, p0, p1))
    kh, kw = kernel.shape
    weight = torch.flip(kernel.to(dtype=x.dtype, device=x.device), (0, 1))
    weight = weight.reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, *, factor: int = 2,
                gain: float = 1.0) -> torch.Tensor:
    """[N,C,H,W] -> [N,C,H*factor,W*factor] with the normalised FIR filter ``kernel``."""
    k = kernel * (gain * factor ** 2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, *, factor: int = 2,
                  gain: float = 1.0) -> torch.Tensor:
    """[N,C,H,W] -> [N,C,H//factor,W//factor] with the normalised FIR filter ``kernel``."""
    k = kernel * gain
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, w: torch.Tensor, kernel: torch.Tensor, *,
                     factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Fused ``upsample_2d`` then a 'same' convolution with weight w [out, in, kh, kw].

    The transposed convolution uses the spatially flipped, in/out-swapped weight, then one
    FIR pass with the combined padding (StyleGAN2). (Score SDE's PyTorch port writes the
    flip as ``w[..., ::-1, ::-1]``, which torch rejects; this is the flip it means.)
    """
    out_c, in_c, conv_h, conv_w = w.shape
    if conv_h != conv_w:
        raise ValueError(f"conv weight must be square, got {tuple(w.shape)}")
    k = kernel * (gain * factor ** 2)
    p = (k.shape[0] - factor) - (conv_w - 1)
    wt = torch.flip(w, (2, 3)).transpose(0, 1)          # [in, out, kh, kw]
    x = F.conv_transpose2d(x, wt, stride=factor, padding=0)
    return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, w: torch.Tensor, kernel: torch.Tensor, *,
                       factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Fused FIR ``downsample_2d`` then a stride-``factor`` convolution with w [out,in,k,k]."""
    conv_w = w.shape[3]
    k = kernel * gain
    p = (k.shape[0] - factor) + (conv_w - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=factor, padding=0)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: each pixel becomes a factor x factor block."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1).expand(n, c, h, factor, w, factor)
    return x.reshape(n, c, h * factor, w * factor)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over factor x factor blocks."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // factor, factor, w // factor, factor)
    return x.mean(dim=(3, 5))

"""FIR resampling against its definition and closed forms (StyleGAN2 / Score SDE)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpkern.models import fir


def upfirdn2d_loop(x, k, up, down, p0, p1):
    """upfirdn2d from its definition, with NumPy loops: zero-insert, pad/crop, true 2-D
    convolution with k, keep every down-th sample."""
    x = np.asarray(x, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    n, c, h, w = x.shape
    u = np.zeros((n, c, h * up, w * up))
    u[:, :, ::up, ::up] = x
    H, W = h * up + p0 + p1, w * up + p0 + p1
    padded = np.zeros((n, c, H, W))
    for i in range(H):
        for j in range(W):
            si, sj = i - p0, j - p0
            if 0 <= si < h * up and 0 <= sj < w * up:
                padded[:, :, i, j] = u[:, :, si, sj]
    kh, kw = k.shape
    oh, ow = H - kh + 1, W - kw + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            # convolution: sum_{a,b} k[a,b] p[i + kh-1-a, j + kw-1-b]
            out[:, :, i, j] = np.einsum("ncab,ab->nc", padded[:, :, i:i + kh, j:j + kw], k[::-1, ::-1])
    return out[:, :, ::down, ::down]


def test_setup_kernel_closed_form():
    k = fir.setup_kernel([1, 3, 3, 1])
    expected = torch.tensor([[1, 3, 3, 1], [3, 9, 9, 3], [3, 9, 9, 3], [1, 3, 3, 1]]) / 64.0
    torch.testing.assert_close(k, expected.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="square"):
        fir.setup_kernel(torch.ones(2, 3))


@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (2, 1, (1, 2)), (1, 2, (-1, 2)), (3, 1, (1, 0))])
def test_upfirdn2d_matches_definition(up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    k = torch.randn(3, 3, generator=g, dtype=torch.float64)   # asymmetric: checks the flip
    got = fir.upfirdn2d(x, k, up=up, down=down, pad=pad)
    ref = upfirdn2d_loop(x, k, up, down, *pad)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)


def _interp_1d_up(x):
    """Closed form of FIR [1,3,3,1] 2x upsampling on one axis: y[2i] = (x[i-1] + 3x[i]) / 4,
    y[2i+1] = (3x[i] + x[i+1]) / 4, zero outside the image."""
    xp = F.pad(x, (1, 1))
    even = (xp[..., :-2] + 3 * xp[..., 1:-1]) / 4
    odd = (3 * xp[..., 1:-1] + xp[..., 2:]) / 4
    return torch.stack([even, odd], dim=-1).flatten(-2)


def _interp_1d_down(x):
    """Closed form of FIR [1,3,3,1] 2x downsampling: y[i] = (x[2i-1] + 3x[2i] + 3x[2i+1] + x[2i+2]) / 8."""
    xp = F.pad(x, (1, 1))
    return (xp[..., 0:-2:2] + 3 * xp[..., 1:-1:2] + 3 * xp[..., 2::2] + xp[..., 3::2]) / 8


def test_upsample_2d_closed_form():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    k = fir.setup_kernel([1, 3, 3, 1], dtype=torch.float64)
    got = fir.upsample_2d(x, k)
    ref = _interp_1d_up(_interp_1d_up(x).transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_downsample_2d_closed_form():
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    k = fir.setup_kernel([1, 3, 3, 1], dtype=torch.float64)
    got = fir.downsample_2d(x, k)
    ref = _interp_1d_down(_interp_1d_down(x).transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_constant_image_preserved_in_interior():
    k = fir.setup_kernel([1, 3, 3, 1])
    x = torch.full((1, 1, 8, 8), 2.5)
    assert torch.allclose(fir.upsample_2d(x, k)[..., 2:-2, 2:-2], torch.tensor(2.5))
    assert torch.allclose(fir.downsample_2d(x, k)[..., 1:-1, 1:-1], torch.tensor(2.5))


def test_fused_conv_equals_unfused():
    """The fused ops equal the unfused compositions (StyleGAN2): upsample_conv_2d is
    FIR upsampling (kept one pixel beyond the image, since it pads only once) followed by a
    valid 3x3 cross-correlation; conv_downsample_2d is a 'same' 3x3 cross-correlation then
    FIR downsampling, away from the border."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    k = fir.setup_kernel([1, 3, 3, 1], dtype=torch.float64)
    up = fir.upsample_conv_2d(x, w, k)
    wide = torch.from_numpy(upfirdn2d_loop(x, 4 * k, 2, 1, 3, 2))      # upsample_2d pads (2, 1)
    torch.testing.assert_close(up, F.conv2d(wide, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(up[..., 1:-1, 1:-1],
                               F.conv2d(fir.upsample_2d(x, k), w, padding=1)[..., 1:-1, 1:-1],
                               rtol=1e-12, atol=1e-12)
    down = fir.conv_downsample_2d(x, w, k)
    assert down.shape == (2, 5, 3, 3)
    ref = fir.downsample_2d(F.conv2d(x, w, padding=1), k)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)


def test_naive_resampling():
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(fir.naive_upsample_2d(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(fir.naive_downsample_2d(x), F.avg_pool2d(x, 2))


def test_jvp_through_fir_ops():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    k = fir.setup_kernel([1, 3, 3, 1], dtype=torch.float64)
    for f in (lambda z: fir.upsample_2d(z, k), lambda z: fir.downsample_2d(z, k),
              lambda z: fir.upsample_conv_2d(z, w, k), lambda z: fir.conv_downsample_2d(z, w, k)):
        _, tangent = torch.func.jvp(f, (x,), (v,))
        torch.testing.assert_close(tangent, f(v), rtol=1e-12, atol=1e-12)    # linear maps

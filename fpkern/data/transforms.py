"""Image transforms (Score SDE conventions) and the training ``ImageDataset``.

Pipeline, as Score SDE's ``datasets.py`` / ``datasets.get_data_scaler``: uint8 k in 0..255 ->
optional random horizontal flip -> [0, 1] either as k / 255 or, with uniform dequantisation,
(k + u) / 256 with u ~ U[0, 1) -> optional centering 2 x - 1 into [-1, 1]
(``centered=True``, inverse ``uncenter``). ``quantize`` maps [0, 1] floats back to uint8.

All randomness comes from an explicit ``torch.Generator``. ``ImageDataset`` derives one
generator per (seed, epoch, index), so an item's augmentation does not depend on worker
count, sampler order or rank: it works with ``DistributedSampler`` and reproduces exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "to_unit_interval",
    "dequantize",
    "random_hflip",
    "center",
    "uncenter",
    "quantize",
    "prepare_images",
    "resize_images",
    "convert_channels",
    "ImageDataset",
]


def _check_uint8_images(x: torch.Tensor, name: str = "x", *,
                        ndim: tuple[int, ...] = (3, 4)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 images, got {x.dtype}")
    if x.dim() not in ndim:
        want = " or ".join({3: "[C, H, W]", 4: "[N, C, H, W]"}[d] for d in reversed(ndim))
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(x.shape)}")


def to_unit_interval(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 k -> k / 255 in [0, 1] (``tf.image.convert_image_dtype``)."""
    _check_uint8_images(x)
    return x.to(dtype) / 255


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantisation of uint8 k: (k + u) / 256, u ~ U[0, 1) drawn from ``generator``.

    Values lie in [0, 1] (at most 1 only through float rounding of k + u); the mean over u
    is (k + 0.5) / 256.
    """
    _check_uint8_images(x)
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return (x.to(dtype) + u) / 256


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None,
                 p: float = 0.5) -> torch.Tensor:
    """Flip each image of [N, C, H, W] (or one [C, H, W]) left-right with probability ``p``."""
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape [N, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    if x.dim() == 3:
        return random_hflip(x[None], generator, p)[0]
    flip = torch.rand(x.shape[0], generator=generator) < p
    flip = flip.to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def center(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: 2 x - 1 (Score SDE ``data.centered``)."""
    return x * 2 - 1


def uncenter(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``center``: [-1, 1] -> [0, 1]."""
    return (x + 1) / 2


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 by floor(256 x) clamped to 0..255.

    Inverts both ``dequantize`` (floor((k + u) / 256 * 256) = k) and ``to_unit_interval``
    up to float rounding (k / 255 * 256 lies in [k, k + 1)).
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be floating, got {x.dtype}")
    return torch.floor(x * 256).clamp_(0, 255).to(torch.uint8)


def prepare_images(x: torch.Tensor, *, generator: torch.Generator | None = None,
                   random_flip: bool = False, uniform_dequantization: bool = False,
                   centered: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, C, H, W] or [C, H, W] -> float training data in [0, 1] or, if ``centered``,
    [-1, 1]; flip first, then dequantise, both drawn from ``generator`` in that order."""
    _check_uint8_images(x)
    if random_flip:
        x = random_hflip(x, generator)
    y = dequantize(x, generator, dtype) if uniform_dequantization else to_unit_interval(x, dtype)
    return center(y) if centered else y


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def resize_images(x: torch.Tensor, image_size: int, *, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to [N, C, image_size, image_size].

    Bilinear (``align_corners=False``, antialiased when shrinking, like Pillow's bilinear
    resize), computed in float32 in chunks of ``chunk`` images, rounded and clamped to
    uint8. Non-square inputs are stretched; a same-size resize returns ``x`` unchanged.
    """
    _check_uint8_images(x, ndim=(4,))
    _check_size(image_size)
    if x.shape[-2:] == (image_size, image_size):
        return x
    out = torch.empty((*x.shape[:2], image_size, image_size), dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], chunk):
        y = F.interpolate(x[i:i + chunk].float(), size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] with C in (1, 3) -> ``channels`` (1 or 3) channels.

    1 -> 3 repeats the grey plane; 3 -> 1 is ITU-R 601-2 luma (R 299 + G 587 + B 114) / 1000,
    rounded, as Pillow's ``convert("L")``.
    """
    _check_uint8_images(x, ndim=(4,))
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    c = x.shape[1]
    if c not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if c == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    w = torch.tensor([299, 587, 114], dtype=torch.int32, device=x.device)[None, :, None, None]
    return ((x.to(torch.int32) * w).sum(1, keepdim=True) + 500).div(
        1000, rounding_mode="floor").to(torch.uint8)


def _mix_seed(*values: int) -> int:
    """SplitMix64-style mix of integers into one 63-bit seed (decorrelates nearby indices)."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] served as float training tensors [C, H, W].

    ``dataset[i]`` is ``prepare_images`` of image i with a generator seeded from
    (``seed``, epoch, i): the same item, epoch and seed always give the same tensor, in any
    process. Call ``set_epoch`` each epoch (as with ``DistributedSampler``) for fresh flips
    and dequantisation noise. Items are images only; labels, when given, are kept in
    ``self.labels`` for conditional use.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                 random_flip: bool = False, uniform_dequantization: bool = False,
                 centered: bool = False, seed: int = 0) -> None:
        _check_uint8_images(images, "images", ndim=(4,))
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != images.shape[0]):
            raise ValueError(f"labels must have shape [N]=[{images.shape[0]}] to match images, "
                             f"got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.random_flip = random_flip
        self.uniform_dequantization = uniform_dequantization
        self.centered = centered
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        g = None
        if self.random_flip or self.uniform_dequantization:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, index))
        return prepare_images(self.images[index], generator=g, random_flip=self.random_flip,
                              uniform_dequantization=self.uniform_dequantization,
                              centered=self.centered)

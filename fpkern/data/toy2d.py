"""Embedded 2-D toy distributions (no download), as in FFJORD and the FP-Diffusion toy runs.

Every sampler has the signature ``sample(n, generator=None) -> Tensor[n, 2]`` (float32, CPU)
and draws only from the given ``torch.Generator``, so a seeded generator reproduces the
points exactly; NumPy's global state is never touched. Scales follow FFJORD's ``toy_data``
(most of the mass inside [-4, 4]^2), so one plotting window fits every set:

============  ==============================================================================
name          distribution
============  ==============================================================================
checkerboard  uniform on the 8 "black" cells of a 4x4 board of 2x2 cells covering [-4, 4]^2
              (cell (i, j) = floor(x / 2) is occupied iff i + j is even)
moons         two interleaved half circles (sklearn ``make_moons``, noise 0.1), scaled by 2
              and shifted by (-1, -0.2); roughly [-3, 3] x [-2, 2]
swissroll     sklearn ``make_swiss_roll`` (noise 1.0) projected on (x, z) and divided by 5;
              roughly [-3, 3]^2
8gaussians    equal mixture of 8 isotropic Gaussians, centres on the circle of radius
              4 / sqrt(2) at angles k * pi / 4, standard deviation 0.5 / sqrt(2)
rings         4 concentric rings of radii 0.75, 1.5, 2.25, 3 (equally likely), uniform
              angle, isotropic Gaussian noise of standard deviation 0.08
============  ==============================================================================

``TOY_SETS`` maps each name to its sampler; ``sample_toy(name, n, generator=...)`` looks the
name up and raises ``ValueError`` listing the valid names for an unknown one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "TOY_SETS",
    "sample_toy",
    "sample_checkerboard",
    "sample_moons",
    "sample_swissroll",
    "sample_8gaussians",
    "sample_rings",
    "RING_RADII",
    "EIGHT_GAUSSIANS_CENTRES",
    "EIGHT_GAUSSIANS_STD",
]

ToySampler = Callable[..., torch.Tensor]

RING_RADII = (0.75, 1.5, 2.25, 3.0)
_RING_NOISE = 0.08
_EIGHT_RADIUS = 4.0 / math.sqrt(2.0)
EIGHT_GAUSSIANS_STD = 0.5 / math.sqrt(2.0)
EIGHT_GAUSSIANS_CENTRES = torch.tensor(
    [[_EIGHT_RADIUS * math.cos(k * math.pi / 4), _EIGHT_RADIUS * math.sin(k * math.pi / 4)]
     for k in range(8)], dtype=torch.float32)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _randn(*shape: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def sample_checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the cells (i, j) = floor(x / 2) of [-4, 4]^2 with i + j even."""
    _check_n(n)
    x1 = _rand(n, generator) * 4 - 2                                  # [-2, 2)
    row = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64)
    x2 = _rand(n, generator) - 2 * row + torch.remainder(torch.floor(x1), 2)
    return (torch.stack([x1, x2], dim=1) * 2).float()


def sample_moons(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two interleaved half circles (sklearn ``make_moons(noise=0.1)``), * 2 + (-1, -0.2)."""
    _check_n(n)
    theta = _rand(n, generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x, y], dim=1) + 0.1 * _randn(n, 2, generator=generator)
    return (pts * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)).float()


def sample_swissroll(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """sklearn ``make_swiss_roll(noise=1.0)`` on its (x, z) plane, divided by 5."""
    _check_n(n)
    t = 1.5 * math.pi * (1 + 2 * _rand(n, generator))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    pts = pts + _randn(n, 2, generator=generator)
    return (pts / 5).float()


def sample_8gaussians(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Equal mixture of 8 Gaussians, ``EIGHT_GAUSSIANS_CENTRES``, std ``EIGHT_GAUSSIANS_STD``."""
    _check_n(n)
    idx = torch.randint(0, 8, (n,), generator=generator)
    noise = _randn(n, 2, generator=generator) * EIGHT_GAUSSIANS_STD
    return (EIGHT_GAUSSIANS_CENTRES.double()[idx] + noise).float()


def sample_rings(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """4 rings of radii ``RING_RADII`` (equally likely), uniform angle, noise std 0.08."""
    _check_n(n)
    ring = torch.randint(0, len(RING_RADII), (n,), generator=generator)
    radius = torch.tensor(RING_RADII, dtype=torch.float64)[ring]
    angle = _rand(n, generator) * (2 * math.pi)
    pts = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    pts = pts + _RING_NOISE * _randn(n, 2, generator=generator)
    return pts.float()


TOY_SETS: dict[str, ToySampler] = {
    "checkerboard": sample_checkerboard,
    "moons": sample_moons,
    "swissroll": sample_swissroll,
    "8gaussians": sample_8gaussians,
    "rings": sample_rings,
}


def sample_toy(name: str, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` points of the toy set ``name`` (a key of ``TOY_SETS``) as float32 [n, 2]."""
    try:
        sampler = TOY_SETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown toy data set {name!r}; valid names: "
                         f"{', '.join(sorted(TOY_SETS))}") from None
    return sampler(n, generator=generator)

"""Probe vectors for the Hutchinson estimators (docs/MATH.md section 3)."""

from __future__ import annotations

import torch

from fpkern._checks import check_choice, check_finite

__all__ = ["PROBE_DISTS", "draw_probes", "resolve_probes"]


def _rademacher(shape, generator, dtype, device):
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def _gaussian(shape, generator, dtype, device):
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


PROBE_DISTS = {"rademacher": _rademacher, "gaussian": _gaussian}


def draw_probes(k: int, x: torch.Tensor, dist: str = "rademacher",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """K probes of x's shape, dtype and device: a tensor [K, *x.shape]."""
    check_choice("probe_dist", dist, PROBE_DISTS)
    sampler = PROBE_DISTS[dist]
    device = generator.device if generator is not None else x.device
    v = sampler((k,) + tuple(x.shape), generator, x.dtype, device)
    return v.to(x.device)


def resolve_probes(probes, x: torch.Tensor, dist: str = "rademacher",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Probes as given (a tensor [K, *x.shape]) or K drawn from `dist` (an int)."""
    check_choice("probe_dist", dist, PROBE_DISTS)
    if isinstance(probes, torch.Tensor):
        if not probes.is_floating_point():
            raise TypeError(f"probes must have a floating dtype, got {probes.dtype}")
        if probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
            raise ValueError(f"probes must have shape [K, *x.shape] = [K, "
                             f"{', '.join(map(str, x.shape))}] with K >= 1, got "
                             f"{tuple(probes.shape)}")
        check_finite(probes, "probes")
        return probes.to(device=x.device, dtype=x.dtype)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise TypeError(f"probes must be a positive int or a tensor [K, *x.shape], got {probes!r}")
    return draw_probes(probes, x, dist, generator)

"""Input checks shared by the public API (each raises with a message naming the problem),
and the one per-sample broadcasting helper."""

from __future__ import annotations

import torch

__all__ = ["check_floating", "check_finite", "check_time", "check_batch", "check_choice", "bcast"]


def check_floating(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(f"{name} contains {bad}")


def check_time(t: torch.Tensor, T: float, *, name: str = "t") -> None:
    """t must be a finite floating tensor with values in [0, T]."""
    check_floating(t, name)
    check_finite(t, name)
    lo, hi = float(t.detach().min()), float(t.detach().max())
    if lo < 0 or hi > T:
        raise ValueError(f"{name} must lie in [0, T={T}], got values in [{lo:.6g}, {hi:.6g}]")


def check_batch(x: torch.Tensor, t: torch.Tensor, *, x_name: str = "x", t_name: str = "t") -> None:
    """x is [B, ...] with at least one feature dimension; t is [B] on x's device."""
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape [B, ...] with at least one feature "
                         f"dimension, got shape {tuple(x.shape)}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{t_name} must have shape [B]=[{x.shape[0]}] to match {x_name} of "
                         f"shape {tuple(x.shape)}, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{t_name} is on {t.device} but {x_name} is on {x.device}")


def check_choice(name: str, value, valid) -> None:
    """value must be one of valid (a registry's keys or a tuple of names)."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid names: {sorted(valid)}")


def bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] viewed so it broadcasts against x [B, ...]."""
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))

"""Shared plumbing of the residual ops: argument checks and the per-sample coefficients."""

from __future__ import annotations

import torch

from fpkern._checks import bcast, check_batch, check_finite, check_floating

__all__ = ["check_inputs", "bcast", "sde_coefficients", "flat_dim"]


def check_inputs(score_fn, x: torch.Tensor, t: torch.Tensor, sde=None) -> None:
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}")
    check_floating(x, "x")
    check_floating(t, "t")
    check_batch(x, t)
    check_finite(x, "x")
    if sde is not None:
        sde.check_time(t)
    else:
        check_finite(t, "t")


def sde_coefficients(sde, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(t), g(t)^2) as [B] tensors in x's dtype."""
    return sde.f(t).to(x.dtype), sde.g2(t).to(x.dtype)


def flat_dim(x: torch.Tensor) -> int:
    return x[0].numel()

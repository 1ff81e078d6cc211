"""Shared plumbing of the residual ops: argument checks and the per-sample coefficients."""

from __future__ import annotations

import torch

from fpkern._checks import bcast, check_batch, check_finite, check_floating

__all__ = ["check_inputs", "bcast", "sde_coefficients", "flat_dim", "scalar_fpe_rhs",
           "div_form_residual"]


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


def scalar_fpe_rhs(x: torch.Tensor, s: torch.Tensor, div: torch.Tensor, f: torch.Tensor,
                   g2: torch.Tensor) -> torch.Tensor:
    """1/2 g^2 (div s + |s|^2) - f <x, s> per sample [B]: the scalar score-FPE right-hand side
    without -D f (docs/MATH.md sections 2 and 4)."""
    return 0.5 * g2 * (div + s.flatten(1).pow(2).sum(1)) - f * (x * s).flatten(1).sum(1)


def div_form_residual(xg: torch.Tensor, s: torch.Tensor, div: torch.Tensor, dts: torch.Tensor,
                      f: torch.Tensor, g2: torch.Tensor, *,
                      create_graph: bool = True) -> torch.Tensor:
    """r = d_t s - grad_x [scalar_fpe_rhs] by one reverse pass from the leaf xg (docs/MATH.md 2),
    by default with create_graph so a parameter gradient can differentiate through it."""
    (grad_h,) = torch.autograd.grad(scalar_fpe_rhs(xg, s, div, f, g2).sum(), xg,
                                    create_graph=create_graph)
    return dts - grad_h

"""Shared plumbing of the residual ops: argument checks, the checked score function, the
grad-mode and precision policy, and the per-sample coefficients.

Every public op (fpkern.ops.residual) runs its inputs through `prepare`, calls the network
only through the `CheckedScore` it returns, computes inside `precision_scope`, and is
wrapped in `outside_inference_mode`:

- what score_fn returns is checked at every call against the x it was given (a tensor of
  x's shape, dtype and device), so a wrong output is named instead of broadcast;
- float16 is refused: its range (65504) is too small for intermediate derivative rows
  (GroupNorm's rule differentiates (var + eps)^(-1/2) twice), which overflow to NaN. Under a
  float16 autocast the ops run with autocast off, in x's dtype. Method "naive"
  differentiates in t by finite differences of 1e-3 and needs float32 or float64 likewise
  (bfloat16 refused, a bfloat16 autocast switched off); docs/MATH.md 5 and 8;
- a score that is not finite at t = 0 (sigma(0) = 0: VP, sub-VP) is a ValueError naming
  it, for every method;
- the results carry an autograd graph exactly when the caller records one; under
  torch.inference_mode the work runs outside it on ordinary copies of the inputs.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fpkern._checks import bcast, check_batch, check_finite, check_floating

__all__ = ["check_inputs", "check_precision", "check_score", "CheckedScore", "prepare",
           "precision_scope", "reverse_mode", "outside_inference_mode", "bcast",
           "sde_coefficients", "flat_dim", "scalar_fpe_rhs", "div_form_residual"]


def check_inputs(score_fn, x: torch.Tensor, t: torch.Tensor, sde=None) -> None:
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}")
    check_floating(x, "x")
    check_floating(t, "t")
    check_batch(x, t)
    if x.shape[0] == 0:
        raise ValueError(f"x has batch size 0 (shape {tuple(x.shape)}); the residual ops need "
                         f"at least one sample")
    check_finite(x, "x")
    if sde is not None:
        sde.check_time(t)
    else:
        check_finite(t, "t")


def check_precision(x: torch.Tensor, t: torch.Tensor, method: str | None = None) -> None:
    """Refuse the dtypes the ops cannot compute accurately (module docstring)."""
    for name, v in (("x", x), ("t", t)):
        if v.dtype == torch.float16:
            raise TypeError(f"{name} is float16, whose range (max 65504) the derivatives of the "
                            f"score overflow (NaN results); use bfloat16 or float32")
        if method == "naive" and v.dtype == torch.bfloat16:
            raise TypeError(f"method='naive' differentiates in t by finite differences of 1e-3, "
                            f"which {name} in bfloat16 cannot resolve; use float32 or float64, "
                            f"or method='fused'")


def precision_scope(x: torch.Tensor, method: str | None = None):
    """Autocast switched off where its dtype is one the op cannot compute accurately in
    (float16; bfloat16 for method "naive"): the op then runs in x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        if low == torch.float16 or (method == "naive" and low == torch.bfloat16):
            return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _score_dtype_ok(s: torch.Tensor, x: torch.Tensor) -> bool:
    """x's dtype, or (a network under autocast) the autocast dtype of x's device."""
    if s.dtype == x.dtype:
        return True
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and s.dtype == torch.get_autocast_dtype(dev)


def check_score(s, x: torch.Tensor, name: str = "score_fn(x, t)") -> None:
    """`s` (a score for x) must be a tensor of x's shape, dtype and device."""
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(s).__name__}")
    if s.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(s.shape)} for x of shape {tuple(x.shape)}; "
                         f"the score must have x's shape")
    if not _score_dtype_ok(s, x):
        raise ValueError(f"{name} is {s.dtype} for x of {x.dtype}; the score must have x's "
                         f"dtype")
    if s.device != x.device:
        raise ValueError(f"{name} is on {s.device} for x on {x.device}; the score must be on "
                         f"x's device")


class CheckedScore:
    """score_fn with what it returns checked (check_score) against the x of each call, on
    every path: plain tensors, Jets and torch.func transforms alike. `fn` is score_fn."""

    def __init__(self, fn, t: torch.Tensor, sde=None):
        self.fn = fn
        self.sde = sde
        self.at_zero = bool((t == 0).any())        # one host sync, before any work

    def __call__(self, x, t):
        s = self.fn(x, t)
        check_score(s, x)
        return s

    def check_defined(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> None:
        """Raise if `out` [B, ...] is not finite at a sample with t = 0 because the score
        itself is not (the module docstring); other non-finite values pass through."""
        if not self.at_zero:
            return
        zero = t == 0
        if bool(torch.isfinite(out[zero]).all()):
            return
        with torch.no_grad():
            s0 = self.fn(x[zero], t[zero])
        if bool(torch.isfinite(s0).all()):
            return
        under = f" under {self.sde!r}" if self.sde is not None else ""
        raise ValueError(f"score_fn(x, t) is not finite at t = 0 ({int(zero.sum())} of "
                         f"{t.shape[0]} samples): the score is undefined where sigma(t) = 0"
                         f"{under}, as score networks divide by sigma(t); evaluate at t > 0 "
                         f"(training draws t from [eps, T])")


def prepare(score_fn, x: torch.Tensor, t: torch.Tensor, sde=None,
            method: str | None = None) -> CheckedScore:
    """Check the arguments of a public op and return the score function it calls."""
    check_inputs(score_fn, x, t, sde)
    check_precision(x, t, method)
    return CheckedScore(score_fn, t, sde)


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    parts = [_detach(v) for v in out]
    return type(out)(*parts) if hasattr(out, "_fields") else type(out)(parts)


def reverse_mode(compute):
    """compute() with autograd recording on (the method takes reverse-mode derivatives, or
    nests forward mode in a way that needs it), its results detached when the caller
    records no graph."""
    grad = torch.is_grad_enabled()
    with torch.enable_grad():
        out = compute()
    return out if grad else _detach(out)


def _ordinary(v):
    return v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v


def outside_inference_mode(op):
    """Decorate a public op: under torch.inference_mode, which forbids the autograd the ops
    use internally, run it outside that mode and without grad, on ordinary copies of the
    inference tensors among its arguments."""
    @functools.wraps(op)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return op(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return op(*map(_ordinary, args), **{k: _ordinary(v) for k, v in kwargs.items()})
    return run


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

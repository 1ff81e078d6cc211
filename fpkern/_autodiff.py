"""How torch must run three ops whose derivative formulas fail score networks, shared by the
residual ops (fpkern.ops.forward_mode, exact) and the model adapters (fpkern.models.adapters).

`autodiff_backends()` changes no value, only how torch computes:
- attention, on torch's math backend: the fused CPU kernels have no forward-mode or
  double-backward formula;
- group_norm, on a contiguous input: torch's forward-mode formula of native_group_norm views
  its input, which fails on the transposed activations of attention blocks;
- layer_norm, as its formula (mean, biased variance, rsqrt): torch's nested derivatives of
  native_layer_norm are wrong (pytorch/pytorch#196700: nested JVPs, reverse over forward, and
  reverse mode nested three deep; its first order is right).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["autodiff_backends", "layer_norm_formula"]


def layer_norm_formula(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm as mean, variance and rsqrt, differentiable to any order by autograd."""
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-n, 0))
    c = x - x.mean(dim=dims, keepdim=True)
    y = c * torch.rsqrt(c.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class _DifferentiableOps(TorchFunctionMode):
    """group_norm on a contiguous copy of its input, layer_norm as its formula; every other
    function as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm and args and not args[0].is_contiguous():
            args = (args[0].contiguous(),) + tuple(args[1:])
        elif func is F.layer_norm:
            return layer_norm_formula(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def autodiff_backends():
    """Run torch ops where forward mode and higher derivatives are right for them (the
    module docstring)."""
    with sdpa_kernel(SDPBackend.MATH), _DifferentiableOps():
        yield

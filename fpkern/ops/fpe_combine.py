"""The residual's assembly from its terms as one fused autograd op (fpkern::fpe_combine).

    fpe_combine(dts, second, jc, s, g2, f) = dts - 1/2 g2 second - jc + f s      (docs/MATH.md 2)

dts, second, jc, s are [B, ...]; g2 and f are [B]. The op runs on the backend chosen by
fpkern.backend (Triton on CUDA, C++ on CPU, torch otherwise), with a hand-written backward
on the same backend; the torch reference sits beside it.
"""

from __future__ import annotations

import torch

from fpkern import _native, backend
from fpkern._native import acc_dtype, check_like, rows

__all__ = ["fpe_combine", "fpe_combine_ref"]


# ---- reference ---------------------------------------------------------------------------
def fpe_combine_ref(dts, second, jc, s, g2, f):
    """Plain-torch residual assembly, computed in float32 (float64 for float64 inputs)."""
    a = acc_dtype(dts)
    shape = (-1,) + (1,) * (dts.dim() - 1)
    r = (dts.to(a) - 0.5 * g2.to(a).reshape(shape) * second.to(a) - jc.to(a)
         + f.to(a).reshape(shape) * s.to(a))
    return r.to(dts.dtype)


def _backward_ref(go, second, s, g2, f):
    a = acc_dtype(go)
    shape = (-1,) + (1,) * (go.dim() - 1)
    g = go.to(a)
    d_g2 = (-0.5 * (second.to(a) * g).flatten(1).sum(1)).to(g2.dtype)
    d_f = (s.to(a) * g).flatten(1).sum(1).to(f.dtype)
    return (go.clone(), (-0.5 * g2.to(a).reshape(shape) * g).to(go.dtype), (-g).to(go.dtype),
            (f.to(a).reshape(shape) * g).to(go.dtype), d_g2, d_f)


# ---- backend dispatch --------------------------------------------------------------------
def _fwd_impl(dts, second, jc, s, g2, f):
    which = backend.select(dts)
    if which == "torch":
        return fpe_combine_ref(dts, second, jc, s, g2, f)
    args = [rows(dts), rows(second), rows(jc), rows(s), g2.contiguous(), f.contiguous()]
    if which == "triton":
        from fpkern.kernels import fpe_combine as k
        out = k.fpe_combine_forward(*args)
    else:
        (out,) = _native.call("fpe_combine_forward", args, [args[0]])
    return out.reshape(dts.shape)


def _bwd_impl(go, second, s, g2, f):
    which = backend.select(go)
    if which == "torch":
        return _backward_ref(go, second, s, g2, f)
    args = [rows(go), rows(second), rows(s), g2.contiguous(), f.contiguous()]
    if which == "triton":
        from fpkern.kernels import fpe_combine as k
        outs = k.fpe_combine_backward(*args)
    else:
        r = args[0]
        outs = _native.call("fpe_combine_backward", args, [r, r, r, r, args[3], args[4]])
    return tuple(o.reshape(go.shape) for o in outs[:4]) + tuple(outs[4:])


# ---- torch.library registration ----------------------------------------------------------
@torch.library.custom_op("fpkern::fpe_combine", mutates_args=())
def _fpe_combine_op(dts: torch.Tensor, second: torch.Tensor, jc: torch.Tensor, s: torch.Tensor,
                    g2: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _fwd_impl(dts, second, jc, s, g2, f)


@_fpe_combine_op.register_fake
def _(dts, second, jc, s, g2, f):
    return torch.empty_like(dts)


@torch.library.custom_op("fpkern::fpe_combine_backward", mutates_args=())
def _fpe_combine_bwd_op(go: torch.Tensor, second: torch.Tensor, s: torch.Tensor,
                        g2: torch.Tensor, f: torch.Tensor) -> list[torch.Tensor]:
    return list(_bwd_impl(go, second, s, g2, f))


@_fpe_combine_bwd_op.register_fake
def _(go, second, s, g2, f):
    return [torch.empty_like(go) for _ in range(4)] + [torch.empty_like(g2), torch.empty_like(f)]


def _setup(ctx, inputs, output):
    _, second, _, s, g2, f = inputs
    ctx.save_for_backward(second, s, g2, f)


def _backward(ctx, go):
    return tuple(_fpe_combine_bwd_op(go.contiguous(), *ctx.saved_tensors))


_fpe_combine_op.register_autograd(_backward, setup_context=_setup)


# ---- public function ---------------------------------------------------------------------
def fpe_combine(dts: torch.Tensor, second: torch.Tensor, jc: torch.Tensor, s: torch.Tensor,
                g2: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Residual dts - 1/2 g2 second - jc + f s from its terms (one fused pass).

    dts, second, jc, s: [B, ...] of one dtype; g2, f: [B] per-sample coefficients.
    """
    if not isinstance(dts, torch.Tensor) or not dts.is_floating_point() or dts.dim() < 2:
        raise TypeError("dts must be a floating torch.Tensor of shape [B, ...]")
    for name, x in (("second", second), ("jc", jc), ("s", s)):
        check_like(name, x, "dts", dts)
    per_sample = dts.new_empty(dts.shape[0])
    for name, x in (("g2", g2), ("f", f)):
        check_like(name, x, "a [B] coefficient", per_sample)
    return _fpe_combine_op(dts, second, jc, s, g2, f)

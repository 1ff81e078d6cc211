"""The Hutchinson reduction as one fused autograd op (fpkern::hutchinson_reduce).

    hutchinson_reduce(v, jv) = 1/K sum_k <v_k, jv_k>                             (docs/MATH.md 3)

v and jv are [K, B, ...] (probes and their directional derivatives J v_k); the result is
[B]. The op runs on the backend chosen by fpkern.backend (Triton on CUDA, C++ on CPU, torch
otherwise), with a hand-written backward on the same backend; the torch reference sits
beside it.
"""

from __future__ import annotations

import torch

from fpkern import _native, backend
from fpkern._native import acc_dtype, check_like, planes

__all__ = ["hutchinson_reduce", "hutchinson_reduce_ref"]


# ---- reference ---------------------------------------------------------------------------
def hutchinson_reduce_ref(v, jv):
    """Plain-torch Hutchinson reduction 1/K sum_k <v_k, jv_k>, one value per sample."""
    a = acc_dtype(v)
    return (v.to(a) * jv.to(a)).flatten(2).sum(2).mean(0).to(v.dtype)


def _backward_ref(go, v, jv):
    a = acc_dtype(v)
    w = (go.to(a) / v.shape[0]).reshape((1, -1) + (1,) * (v.dim() - 2))
    return (w * jv.to(a)).to(v.dtype), (w * v.to(a)).to(v.dtype)


# ---- backend dispatch --------------------------------------------------------------------
def _fwd_impl(v, jv):
    which = backend.select(v)
    if which == "torch":
        return hutchinson_reduce_ref(v, jv)
    args = [planes(v), planes(jv)]
    if which == "triton":
        from fpkern.kernels import hutchinson_reduce as k
        return k.hutchinson_reduce_forward(*args)
    out_like = torch.empty(v.shape[1], dtype=v.dtype)
    (out,) = _native.call("hutchinson_reduce_forward", args, [out_like])
    return out


def _bwd_impl(go, v, jv):
    which = backend.select(v)
    if which == "torch":
        return _backward_ref(go, v, jv)
    args = [go.contiguous(), planes(v), planes(jv)]
    if which == "triton":
        from fpkern.kernels import hutchinson_reduce as k
        outs = k.hutchinson_reduce_backward(*args)
    else:
        outs = _native.call("hutchinson_reduce_backward", args, [args[1], args[2]])
    return tuple(o.reshape(v.shape) for o in outs)


# ---- torch.library registration ----------------------------------------------------------
@torch.library.custom_op("fpkern::hutchinson_reduce", mutates_args=())
def _hutchinson_op(v: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    return _fwd_impl(v, jv)


@_hutchinson_op.register_fake
def _(v, jv):
    return v.new_empty(v.shape[1])


@torch.library.custom_op("fpkern::hutchinson_reduce_backward", mutates_args=())
def _hutchinson_bwd_op(go: torch.Tensor, v: torch.Tensor, jv: torch.Tensor) -> list[torch.Tensor]:
    return list(_bwd_impl(go, v, jv))


@_hutchinson_bwd_op.register_fake
def _(go, v, jv):
    return [torch.empty_like(v), torch.empty_like(jv)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, go):
    return tuple(_hutchinson_bwd_op(go.contiguous(), *ctx.saved_tensors))


_hutchinson_op.register_autograd(_backward, setup_context=_setup)


# ---- public function ---------------------------------------------------------------------
def hutchinson_reduce(v: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    """1/K sum_k <v_k, jv_k> per sample: v, jv of shape [K, B, ...] -> [B]."""
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 3:
        raise TypeError("v must be a floating torch.Tensor of shape [K, B, ...]")
    check_like("jv", jv, "v", v)
    return _hutchinson_op(v, jv)

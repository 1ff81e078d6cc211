"""Fused elementwise ops of the FPE residual, as autograd ops registered with torch.library.

    fpe_combine(dts, second, jc, s, g2, f) = dts - 1/2 g2 second - jc + f s      (MATH.md 2)
    hutchinson_reduce(v, jv) = 1/K sum_k <v_k, jv_k>                             (MATH.md 3)

dts, second, jc, s are [B, ...]; g2 and f are [B]; v and jv are [K, B, ...]. Each op runs
on the backend chosen by fpkern.backend (Triton on CUDA, C++ on CPU, torch otherwise), with
a hand-written backward on the same backend; the torch references sit beside them.
"""

from __future__ import annotations

import torch

from fpkern import backend

__all__ = ["fpe_combine", "hutchinson_reduce", "fpe_combine_ref", "hutchinson_reduce_ref"]

_NATIVE_DTYPES = (torch.float32, torch.float64)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- references ------------------------------------------------------------------------
def fpe_combine_ref(dts, second, jc, s, g2, f):
    """Plain-torch residual assembly, computed in float32 (float64 for float64 inputs)."""
    a = _acc(dts)
    shape = (-1,) + (1,) * (dts.dim() - 1)
    r = (dts.to(a) - 0.5 * g2.to(a).reshape(shape) * second.to(a) - jc.to(a)
         + f.to(a).reshape(shape) * s.to(a))
    return r.to(dts.dtype)


def hutchinson_reduce_ref(v, jv):
    """Plain-torch Hutchinson reduction 1/K sum_k <v_k, jv_k>, one value per sample."""
    a = _acc(v)
    return (v.to(a) * jv.to(a)).flatten(2).sum(2).mean(0).to(v.dtype)


def _combine_backward_ref(go, second, s, g2, f):
    a = _acc(go)
    shape = (-1,) + (1,) * (go.dim() - 1)
    g = go.to(a)
    d_g2 = (-0.5 * (second.to(a) * g).flatten(1).sum(1)).to(g2.dtype)
    d_f = (s.to(a) * g).flatten(1).sum(1).to(f.dtype)
    return (go.clone(), (-0.5 * g2.to(a).reshape(shape) * g).to(go.dtype), (-g).to(go.dtype),
            (f.to(a).reshape(shape) * g).to(go.dtype), d_g2, d_f)


def _hutchinson_backward_ref(go, v, jv):
    a = _acc(v)
    w = (go.to(a) / v.shape[0]).reshape((1, -1) + (1,) * (v.dim() - 2))
    return (w * jv.to(a)).to(v.dtype), (w * v.to(a)).to(v.dtype)


# ---- backend dispatch ------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(x.shape[0], -1)


def _planes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(x.shape[0], x.shape[1], -1)


def _np(x: torch.Tensor):
    return x.detach().numpy()


def _native_call(fn_name, inputs, outputs):
    """Run a _C kernel on contiguous float32/float64 buffers, upcasting other dtypes."""
    lib = backend.native()
    work = inputs[0].dtype if inputs[0].dtype in _NATIVE_DTYPES else torch.float32
    ins = [x.to(work).contiguous() for x in inputs]
    outs = [torch.empty(o.shape, dtype=work) for o in outputs]
    getattr(lib, fn_name)(*map(_np, ins), *map(_np, outs))
    return [o.to(t.dtype) for o, t in zip(outs, outputs)]


def _combine_fwd_impl(dts, second, jc, s, g2, f):
    which = backend.select(dts)
    if which == "torch":
        return fpe_combine_ref(dts, second, jc, s, g2, f)
    args = [_rows(dts), _rows(second), _rows(jc), _rows(s), g2.contiguous(), f.contiguous()]
    if which == "triton":
        from fpkern.kernels import fpe_combine as k
        out = k.fpe_combine_forward(*args)
    else:
        (out,) = _native_call("fpe_combine_forward", args, [args[0]])
    return out.reshape(dts.shape)


def _combine_bwd_impl(go, second, s, g2, f):
    which = backend.select(go)
    if which == "torch":
        return _combine_backward_ref(go, second, s, g2, f)
    args = [_rows(go), _rows(second), _rows(s), g2.contiguous(), f.contiguous()]
    if which == "triton":
        from fpkern.kernels import fpe_combine as k
        outs = k.fpe_combine_backward(*args)
    else:
        r = args[0]
        outs = _native_call("fpe_combine_backward", args, [r, r, r, r, args[3], args[4]])
    return tuple(o.reshape(go.shape) for o in outs[:4]) + tuple(outs[4:])


def _hutchinson_fwd_impl(v, jv):
    which = backend.select(v)
    if which == "torch":
        return hutchinson_reduce_ref(v, jv)
    args = [_planes(v), _planes(jv)]
    if which == "triton":
        from fpkern.kernels import fpe_combine as k
        return k.hutchinson_forward(*args)
    out_like = torch.empty(v.shape[1], dtype=v.dtype)
    (out,) = _native_call("hutchinson_forward", args, [out_like])
    return out


def _hutchinson_bwd_impl(go, v, jv):
    which = backend.select(v)
    if which == "torch":
        return _hutchinson_backward_ref(go, v, jv)
    args = [go.contiguous(), _planes(v), _planes(jv)]
    if which == "triton":
        from fpkern.kernels import fpe_combine as k
        outs = k.hutchinson_backward(*args)
    else:
        outs = _native_call("hutchinson_backward", args, [args[1], args[2]])
    return tuple(o.reshape(v.shape) for o in outs)


# ---- torch.library registration --------------------------------------------------------
@torch.library.custom_op("fpkern::fpe_combine", mutates_args=())
def _fpe_combine_op(dts: torch.Tensor, second: torch.Tensor, jc: torch.Tensor, s: torch.Tensor,
                    g2: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _combine_fwd_impl(dts, second, jc, s, g2, f)


@_fpe_combine_op.register_fake
def _(dts, second, jc, s, g2, f):
    return torch.empty_like(dts)


@torch.library.custom_op("fpkern::fpe_combine_backward", mutates_args=())
def _fpe_combine_bwd_op(go: torch.Tensor, second: torch.Tensor, s: torch.Tensor,
                        g2: torch.Tensor, f: torch.Tensor) -> list[torch.Tensor]:
    return list(_combine_bwd_impl(go, second, s, g2, f))


@_fpe_combine_bwd_op.register_fake
def _(go, second, s, g2, f):
    return [torch.empty_like(go) for _ in range(4)] + [torch.empty_like(g2), torch.empty_like(f)]


def _combine_setup(ctx, inputs, output):
    _, second, _, s, g2, f = inputs
    ctx.save_for_backward(second, s, g2, f)


def _combine_backward(ctx, go):
    return tuple(_fpe_combine_bwd_op(go.contiguous(), *ctx.saved_tensors))


_fpe_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("fpkern::hutchinson_reduce", mutates_args=())
def _hutchinson_op(v: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    return _hutchinson_fwd_impl(v, jv)


@_hutchinson_op.register_fake
def _(v, jv):
    return v.new_empty(v.shape[1])


@torch.library.custom_op("fpkern::hutchinson_reduce_backward", mutates_args=())
def _hutchinson_bwd_op(go: torch.Tensor, v: torch.Tensor, jv: torch.Tensor) -> list[torch.Tensor]:
    return list(_hutchinson_bwd_impl(go, v, jv))


@_hutchinson_bwd_op.register_fake
def _(go, v, jv):
    return [torch.empty_like(v), torch.empty_like(jv)]


def _hutchinson_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _hutchinson_backward(ctx, go):
    return tuple(_hutchinson_bwd_op(go.contiguous(), *ctx.saved_tensors))


_hutchinson_op.register_autograd(_hutchinson_backward, setup_context=_hutchinson_setup)


# ---- public functions ------------------------------------------------------------------
def _check_like(name, x, ref_name, ref):
    """x must be a floating tensor with ref's shape, dtype and device."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor")
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} "
                         f"like {ref_name}")
    if x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(f"{name} is {x.dtype} on {x.device}, expected {ref.dtype} on "
                         f"{ref.device} like {ref_name}")


def fpe_combine(dts: torch.Tensor, second: torch.Tensor, jc: torch.Tensor, s: torch.Tensor,
                g2: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Residual dts - 1/2 g2 second - jc + f s from its terms (one fused pass).

    dts, second, jc, s: [B, ...] of one dtype; g2, f: [B] per-sample coefficients.
    """
    if not isinstance(dts, torch.Tensor) or not dts.is_floating_point() or dts.dim() < 2:
        raise TypeError("dts must be a floating torch.Tensor of shape [B, ...]")
    for name, x in (("second", second), ("jc", jc), ("s", s)):
        _check_like(name, x, "dts", dts)
    per_sample = dts.new_empty(dts.shape[0])
    for name, x in (("g2", g2), ("f", f)):
        _check_like(name, x, "a [B] coefficient", per_sample)
    return _fpe_combine_op(dts, second, jc, s, g2, f)


def hutchinson_reduce(v: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    """1/K sum_k <v_k, jv_k> per sample: v, jv of shape [K, B, ...] -> [B]."""
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 3:
        raise TypeError("v must be a floating torch.Tensor of shape [K, B, ...]")
    _check_like("jv", jv, "v", v)
    return _hutchinson_op(v, jv)

"""The laplacian-form FPE terms from the jet outputs in one fused op (fpkern::laplacian_terms).

    laplacian_terms(v, jv, w, lap, s, x, g2, f, weight, m) -> (r, div, loss, h)

    r    = w - 1/2 g2 lap + f s            the residual r_c (w = d_t s - J c)   docs/MATH.md 2
    div  = 1/K sum_k <v_k, jv_k>           Hutchinson divergence of s            docs/MATH.md 3
    loss = weight |r|^m                    the weighted per-sample vector term   docs/MATH.md 4
    h    = 1/2 g2 (div + |s|^2) - f <x, s> the scalar FPE term                   docs/MATH.md 4

v, jv: [K, B, ...] probes and their directional derivatives J v_k; w, lap, s, x: [B, ...];
g2, f, weight: [B]. One kernel reads the jet pass's outputs once and writes all four, so
the FP loss needs neither a separate Hutchinson pass nor torch's chain of small ops. The
backward is hand-written (csrc/laplacian_terms.h); when autograd records it (create_graph) the
torch formulas run instead, so it is itself differentiable. Gradients for v and x (probes
and sample points, constants in training) are computed in torch only when asked for.
"""

from __future__ import annotations

import torch

from fpkern import _native, backend
from fpkern._native import acc_dtype, check_like, planes, rows

__all__ = ["laplacian_terms", "laplacian_terms_ref"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _norm_pow(sumsq: torch.Tensor, m: float) -> torch.Tensor:
    return sumsq if m == 2 else sumsq.pow(0.5 * m)


def laplacian_terms_ref(v, jv, w, lap, s, x, g2, f, weight, m: float = 2.0):
    """Plain-torch (differentiable) reference, in float32 (float64 for float64 inputs)."""
    a = acc_dtype(w)
    v, jv, w, lap, s, x, g2, f, weight = (t.to(a) for t in (v, jv, w, lap, s, x, g2, f, weight))
    view = (-1,) + (1,) * (w.dim() - 1)
    r = w - 0.5 * g2.reshape(view) * lap + f.reshape(view) * s
    div = (v * jv).flatten(2).sum(2).mean(0)
    loss = weight * _norm_pow(r.flatten(1).pow(2).sum(1), m)
    h = 0.5 * g2 * (div + s.flatten(1).pow(2).sum(1)) - f * _dot(x, s)
    return r, div, loss, h


def _backward_torch(gr, gdiv, gloss, gh, v, lap, s, x, r, div, g2, f, weight, m):
    """The vector-Jacobian product as torch formulas (csrc/laplacian_terms.h): dw, dlap, ds, djv,
    dg2, df, dweight. Differentiable: also used for double backward."""
    view = (-1,) + (1,) * (r.dim() - 1)
    sumsq = r.flatten(1).pow(2).sum(1)
    if m == 2:
        slope = torch.full_like(sumsq, 2.0)
    else:
        slope = torch.where(sumsq > 0, m * sumsq.clamp_min(torch.finfo(sumsq.dtype).tiny)
                            .pow(0.5 * m - 1), torch.zeros_like(sumsq))
    dr = gr + (gloss * weight * slope).reshape(view) * r
    g2v, fv, ghv = g2.reshape(view), f.reshape(view), gh.reshape(view)
    ds = fv * dr + ghv * (g2v * s - fv * x)
    djv = _div_coefficient(gdiv, gh, g2, v.shape[0]).reshape((1,) + view) * v
    dg2 = -0.5 * _dot(lap, dr) + 0.5 * gh * (div + s.flatten(1).pow(2).sum(1))
    df = _dot(s, dr) - gh * _dot(x, s)
    return dr, -0.5 * g2v * dr, ds, djv, dg2, df, gloss * _norm_pow(sumsq, m)


def _div_coefficient(gdiv, gh, g2, K):
    """d(loss)/d<v_k, jv_k> per sample: the divergence's own gradient plus the scalar term's."""
    return (gdiv + 0.5 * g2 * gh) / K


# ---- backend dispatch ------------------------------------------------------------------
def _fwd_impl(v, jv, w, lap, s, x, g2, f, weight, m):
    which = backend.select(w)
    if which == "torch":
        outs = laplacian_terms_ref(v, jv, w, lap, s, x, g2, f, weight, m)
        return tuple(o.to(w.dtype) for o in outs)
    args = [planes(v), planes(jv)] + [rows(t) for t in (w, lap, s, x)] + \
        [t.contiguous() for t in (g2, f, weight)]
    if which == "triton":
        from fpkern.kernels import laplacian_terms as k
        r, div, loss, h, _ = k.laplacian_terms_forward(*args, float(m))
    else:          # outputs r [B, n] and div, loss, h, sum |r|^2 [B]
        r, div, loss, h, _ = _native.call("laplacian_terms_forward", args,
                                          [args[2]] + [args[6]] * 4, float(m))
    return r.reshape(w.shape), div, loss, h


def _bwd_impl(gr, gdiv, gloss, gh, v, lap, s, x, r, div, g2, f, weight, m):
    which = backend.select(r)
    if which == "torch":
        a = acc_dtype(r)
        c = [t.to(a) for t in (gr, gdiv, gloss, gh, v, lap, s, x, r, div, g2, f, weight)]
        return tuple(t.to(r.dtype) for t in _backward_torch(*c, m))
    sumsq = r.flatten(1).pow(2).sum(1)
    args = [rows(gr), gdiv.contiguous(), gloss.contiguous(), gh.contiguous(), planes(v),
            rows(lap), rows(s), rows(x), rows(r), div.contiguous(), sumsq.contiguous(),
            g2.contiguous(), f.contiguous(), weight.contiguous()]
    if which == "triton":
        from fpkern.kernels import laplacian_terms as k
        outs = k.laplacian_terms_backward(*args, float(m))
    else:          # outputs dw, dlap, ds [B, n], djv [K, B, n], dg2, df, dweight [B]
        like = [args[0]] * 3 + [args[4]] + [args[1]] * 3
        outs = [o.to(r.dtype) for o in _native.call("laplacian_terms_backward", args, like,
                                                     float(m))]
    dw, dlap, ds, djv = (o.reshape(t.shape) for o, t in zip(outs[:4], (r, r, r, v)))
    return (dw, dlap, ds, djv) + tuple(outs[4:])


# ---- torch.library registration --------------------------------------------------------
@torch.library.custom_op("fpkern::laplacian_terms", mutates_args=())
def _terms_op(v: torch.Tensor, jv: torch.Tensor, w: torch.Tensor, lap: torch.Tensor,
              s: torch.Tensor, x: torch.Tensor, g2: torch.Tensor, f: torch.Tensor,
              weight: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    return _fwd_impl(v, jv, w, lap, s, x, g2, f, weight, m)


@_terms_op.register_fake
def _(v, jv, w, lap, s, x, g2, f, weight, m):
    return torch.empty_like(w), torch.empty_like(g2), torch.empty_like(g2), torch.empty_like(g2)


@torch.library.custom_op("fpkern::laplacian_terms_backward", mutates_args=())
def _terms_bwd_op(gr: torch.Tensor, gdiv: torch.Tensor, gloss: torch.Tensor, gh: torch.Tensor,
                  v: torch.Tensor, lap: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
                  r: torch.Tensor, div: torch.Tensor, g2: torch.Tensor, f: torch.Tensor,
                  weight: torch.Tensor, m: float) -> list[torch.Tensor]:
    return list(_bwd_impl(gr, gdiv, gloss, gh, v, lap, s, x, r, div, g2, f, weight, m))


@_terms_bwd_op.register_fake
def _(gr, gdiv, gloss, gh, v, lap, s, x, r, div, g2, f, weight, m):
    return [torch.empty_like(r) for _ in range(3)] + [torch.empty_like(v)] + \
        [torch.empty_like(g2) for _ in range(3)]


def _setup(ctx, inputs, output):
    v, jv, w, lap, s, x, g2, f, weight, m = inputs
    r, div, _, _ = output
    ctx.save_for_backward(v, jv, lap, s, x, r, div, g2, f, weight)
    ctx.m = m


def _backward(ctx, gr, gdiv, gloss, gh):
    v, jv, lap, s, x, r, div, g2, f, weight = ctx.saved_tensors
    m = ctx.m
    if torch.is_grad_enabled():      # create_graph: differentiable torch formulas
        grads = _backward_torch(gr, gdiv, gloss, gh, v, lap, s, x, r, div, g2, f, weight, m)
    else:
        grads = _terms_bwd_op(gr.contiguous(), gdiv, gloss, gh, v, lap, s, x, r, div, g2, f,
                              weight, m)
    dr, dlap, ds, djv, dg2, df, dwt = grads
    cdiv = _div_coefficient(gdiv, gh, g2, v.shape[0])
    need = ctx.needs_input_grad
    view = (1, -1) + (1,) * (v.dim() - 2)
    dv = cdiv.reshape(view) * jv if need[0] else None
    dx = -(gh * f).reshape(view[1:]) * s if need[5] else None
    return dv, djv, dr, dlap, ds, dx, dg2, df, dwt, None


_terms_op.register_autograd(_backward, setup_context=_setup)


def laplacian_terms(v, jv, w, lap, s, x, g2, f, weight, m: float = 2.0):
    """(r, div, loss, h) of the laplacian form in one fused pass (see the module docstring)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2:
        raise TypeError("w must be a floating torch.Tensor of shape [B, ...]")
    if not isinstance(v, torch.Tensor) or v.dim() != w.dim() + 1:
        raise ValueError(f"v must be [K, *w.shape], got {getattr(v, 'shape', v)}")
    check_like("v", v, "w", w, (v.shape[0],) + tuple(w.shape))
    check_like("jv", jv, "w", w, v.shape)
    for name, t in (("lap", lap), ("s", s), ("x", x)):
        check_like(name, t, "w", w, w.shape)
    for name, t in (("g2", g2), ("f", f), ("weight", weight)):
        check_like(name, t, "w", w, (w.shape[0],))
    if not float(m) > 0:
        raise ValueError(f"m must be > 0, got {m}")
    return _terms_op(v, jv, w, lap, s, x, g2, f, weight, float(m))

"""The GroupNorm jet rule as one fused autograd op (fpkern::group_norm_jet), with its reference.

    group_norm_jet(rows, groups, weight, bias, eps, spec) -> rows of group_norm(Jet)

rows: [R, B, C, *spatial] stacked Taylor rows (fpkern.jet.tensor); spec: Layout.kernel_spec,
i.e. (n1, pair_a, pair_b, c0, nc). Per sample and group (m = mean over its N elements), with
first-order rows i, pair rows q = (a, b) and the collapsed row z over rows k:

    c_r = X_r - m(X_r)
    v_0 = m(c0 c0), v_i = 2 m(c0 c_i), v_q = 2 m(c0 c_q) + 2 m(c_a c_b),
    v_z = 2 m(c0 c_z) + 2 mean_k m(c_k c_k)                  (rows of the variance)
    u = rsqrt(v_0 + eps): u_0, u_i = u' v_i, u_q = u' v_q + u'' v_a v_b,
    u_z = u' v_z + u'' mean_k v_k^2
    yhat_0 = c0 u0, yhat_i = c_i u0 + c0 u_i, yhat_q = c_q u0 + c0 u_q + c_a u_b + c_b u_a,
    yhat_z = c_z u0 + c0 u_z + 2 mean_k c_k u_k
    Y_r = yhat_r weight[ch], plus bias[ch] on row 0.

Three reads of the rows replace the ~30 torch ops of the composite rule (fpkern.jet.rules). The
backward is hand-written (reverse mode through the per-group scalars); when autograd records
the backward itself (create_graph, as the div-form residual's reverse pass does) it is computed
from the differentiable reference instead, so double backward works. Backends: Triton on
CUDA, C++ on CPU, torch otherwise (fpkern.backend); `run_forward` / `run_backward` dispatch
to them, and fpkern.jet.fused.group_norm_act composes them with the activation op's.
"""

from __future__ import annotations

import numpy as np
import torch

from fpkern import _native, backend
from fpkern._native import acc_dtype, np_view
from fpkern.jet.fused.eager import EagerOp, pick

__all__ = ["group_norm_jet_stats", "group_norm_jet", "group_norm_jet_ref", "run_forward",
           "run_backward", "reference_grads", "kernel_grads"]


# ---- reference ---------------------------------------------------------------------------
def _parts_ref(rows, groups, eps, spec):
    """yhat rows [R, B, G, N], row means and variance rows [B, G, R] (differentiable)."""
    n1, pa, pb, c0, nc = spec
    pa, pb, P = list(pa), list(pb), len(pa)
    R, B = rows.shape[:2]
    x = rows.to(acc_dtype(rows)).reshape(R, B, groups, -1)
    mean = x.mean(-1, keepdim=True)
    c = x - mean

    def m(t):
        return t.mean(-1, keepdim=True)

    x0 = c[0]                                              # the centred value row
    v_lin = 2 * m(x0 * c[1:])                              # 2 m(c0 c_r), r >= 1
    v = [m(x0 * x0)[None], v_lin[:n1]]
    if P:
        v.append(v_lin[n1:n1 + P] + 2 * m(c[pa] * c[pb]))
    if nc:
        v.append(v_lin[-1:] + 2 * m(c[c0:c0 + nc].pow(2)).mean(0, keepdim=True))
    v = torch.cat(v)                                       # [R, B, G, 1]

    s = v[0] + eps
    u0 = torch.rsqrt(s)
    u1 = -0.5 * u0 / s
    u2 = 0.75 * u0 / (s * s)
    u = [u0[None], u1 * v[1:1 + n1]]
    if P:
        u.append(u1 * v[1 + n1:1 + n1 + P] + u2 * v[pa] * v[pb])
    if nc:
        u.append((u1 * v[-1] + u2 * v[c0:c0 + nc].pow(2).mean(0))[None])
    u = torch.cat(u)

    y = [(x0 * u0)[None], c[1:1 + n1] * u0 + x0 * u[1:1 + n1]]
    if P:
        q = slice(1 + n1, 1 + n1 + P)
        y.append(c[q] * u0 + x0 * u[q] + c[pa] * u[pb] + c[pb] * u[pa])
    if nc:
        k = slice(c0, c0 + nc)
        y.append((c[-1] * u0 + x0 * u[-1] + 2 * (c[k] * u[k]).mean(0))[None])
    stats = [t.squeeze(-1).permute(1, 2, 0) for t in (mean, v)]
    return torch.cat(y), stats[0], stats[1]


def group_norm_jet_ref(rows: torch.Tensor, groups: int, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, spec) -> torch.Tensor:
    """Plain-torch GroupNorm jet rule (differentiable), computed in float32 (float64 for
    float64 rows): the reference of the fused kernels."""
    return _affine(_parts_ref(rows, groups, eps, spec)[0], rows, weight, bias)


def _affine(yhat, rows, weight, bias):
    """Y_r = yhat_r weight, plus bias on the value row, in the dtype of rows."""
    yhat = yhat.reshape(rows.shape)
    view = (1, 1, -1) + (1,) * (rows.dim() - 3)
    if weight is not None:
        yhat = yhat * weight.to(yhat.dtype).reshape(view)
    if bias is not None:
        yhat = torch.cat([yhat[:1] + bias.to(yhat.dtype).reshape(view), yhat[1:]])
    return yhat.to(rows.dtype)


def _backward_torch(grad, rows, weight, mean, var, groups, eps, spec):
    """The hand-written backward in plain torch: reverse mode through the per-group scalars
    (yhat -> u -> v -> c), then dX_r = dc_r - m(dc_r). Returns d_rows, d_weight, d_bias."""
    n1, pa, pb, c0, nc = spec
    P = len(pa)
    a = acc_dtype(rows)
    R, B, C = rows.shape[:3]
    view = (R, B, groups, -1)
    stats = [t.to(a).permute(2, 0, 1)[..., None] for t in (mean, var)]   # [R, B, G, 1]
    c, v = rows.to(a).reshape(view) - stats[0], stats[1]
    k2 = 2.0 / c.shape[-1]
    gy = grad.to(a).reshape(R, B, C, -1)
    g = (gy if weight is None else gy * weight.to(a).reshape(1, 1, C, 1)).reshape(view)
    q = slice(1 + n1, 1 + n1 + P)
    k = slice(c0, c0 + nc)
    pa_t = torch.tensor(list(pa), dtype=torch.long, device=rows.device)
    pb_t = torch.tensor(list(pb), dtype=torch.long, device=rows.device)

    s = v[0] + eps
    u0 = torch.rsqrt(s)
    u1, u2, u3 = -0.5 * u0 / s, 0.75 * u0 / (s * s), -1.875 * u0 / (s * s * s)
    u = u1 * v
    u[0] = u0
    if P:
        u[q] += u2 * v[pa_t] * v[pb_t]
    if nc:
        u[-1] += u2 * v[k].pow(2).mean(0)

    # dweight and dbias: yhat from u (forward formulas)
    yhat = c * u0 + c[0] * u
    yhat[0] = c[0] * u0
    if P:
        yhat[q] += c[pa_t] * u[pb_t] + c[pb_t] * u[pa_t]
    if nc:
        yhat[-1] += 2 * (c[k] * u[k]).mean(0)
    d_w = (gy * yhat.reshape(gy.shape)).sum((0, 1, 3))
    d_b = gy[0].sum((0, 2))

    def red(t):
        return t.sum(-1, keepdim=True)

    # yhat -> u
    gu = red(g * c[0])
    gu[0] = red(g * c).sum(0)
    if P:
        gu.index_add_(0, pb_t, red(g[q] * c[pa_t]))
        gu.index_add_(0, pa_t, red(g[q] * c[pb_t]))
    if nc:
        gu[k] += (2.0 / nc) * red(g[-1] * c[k])
    # u -> v
    gv = u1 * gu
    gu2 = torch.zeros_like(u0)
    if P:
        gv.index_add_(0, pa_t, gu[q] * u2 * v[pb_t])
        gv.index_add_(0, pb_t, gu[q] * u2 * v[pa_t])
        gu2 += (gu[q] * v[pa_t] * v[pb_t]).sum(0)
    if nc:
        gv[k] += gu[-1] * u2 * (2.0 / nc) * v[k]
        gu2 += gu[-1] * v[k].pow(2).mean(0)
    gv[0] = gu[0] * u1 + (gu[1:] * v[1:]).sum(0) * u2 + gu2 * u3
    # v, yhat -> c
    dc = u0 * g + k2 * gv * c[0]
    dc[0] = u0 * g[0] + (u[1:] * g[1:]).sum(0) + k2 * (gv * c).sum(0)
    if P:
        dc.index_add_(0, pa_t, u[pb_t] * g[q] + k2 * gv[q] * c[pb_t])
        dc.index_add_(0, pb_t, u[pa_t] * g[q] + k2 * gv[q] * c[pa_t])
    if nc:
        dc[k] += (2.0 / nc) * (u[k] * g[-1] + k2 * gv[-1] * c[k])
    d_rows = (dc - dc.mean(-1, keepdim=True)).reshape(rows.shape).to(rows.dtype)
    d_w = d_w if weight is not None else torch.zeros_like(d_w)
    return d_rows, d_w.to(rows.dtype), d_b.to(rows.dtype)


def _check(rows, groups, weight, bias, spec) -> None:
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.dim() < 3:
        raise TypeError("rows must be a floating torch.Tensor of shape [R, B, C, *spatial]")
    if len(spec) != 5:
        raise ValueError(f"spec must be (n1, pair_a, pair_b, c0, nc) (Layout.kernel_spec), "
                         f"got {spec}")
    n1, pa, pb, c0, nc = spec
    if len(pa) != len(pb):
        raise ValueError(f"pair_a and pair_b differ in length: {pa}, {pb}")
    want = 1 + n1 + len(pa) + (1 if nc else 0)
    if rows.shape[0] != want:
        raise ValueError(f"rows must be [R, B, C, *spatial] with R = {want} for layout {spec}, "
                         f"got shape {tuple(rows.shape)}")
    if any(not 1 <= i <= n1 for i in tuple(pa) + tuple(pb)):
        raise ValueError(f"pairs {list(zip(pa, pb))} name rows outside the first-order rows "
                         f"1..{n1}")
    if nc and not (1 <= c0 and c0 + nc - 1 <= n1):
        raise ValueError(f"collapsed rows {c0}..{c0 + nc - 1} lie outside the first-order rows "
                         f"1..{n1}")
    C = rows.shape[2]
    if not isinstance(groups, int) or groups < 1 or C % groups:
        raise ValueError(f"groups ({groups}) must divide the {C} channels of rows "
                         f"{tuple(rows.shape)}")
    if rows[0, 0].numel() == 0:
        raise ValueError(f"rows {tuple(rows.shape)} have no elements per sample")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (C,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape ({C},) like the channels of "
                             f"rows, got {shape}")
        if t.device != rows.device:
            raise ValueError(f"{name} is on {t.device}, rows on {rows.device}")


# ---- backend dispatch --------------------------------------------------------------------
def _as4d(t: torch.Tensor) -> torch.Tensor:
    """Rows [R, B, C, *spatial] as a contiguous (R, B, C, S)."""
    return t.contiguous().reshape(t.shape[0], t.shape[1], t.shape[2], -1)


def _ints(v) -> np.ndarray:
    return np.asarray(list(v), dtype=np.int64)


def run_forward(rows, weight, bias, groups, eps, spec):
    """(y, mean, var) of the op on the backend fpkern.backend selects for `rows`, without
    checks; mean and var [B, G, R] are the per-group statistics the backward takes."""
    which = backend.select(rows)
    if which == "torch":
        yhat, mean, var = _parts_ref(rows, groups, eps, spec)
        return _affine(yhat, rows, weight, bias), mean.contiguous(), var.contiguous()
    x = _as4d(rows)
    if which == "triton":
        from fpkern.kernels import group_norm_jet as k
        w = None if weight is None else weight.contiguous()
        b = None if bias is None else bias.contiguous()
        y, mean, var = k.group_norm_jet_forward(x, w, b, groups, eps, spec)
        return y.reshape(rows.shape), mean, var
    work = _native.work_dtype(rows.dtype)
    x = x.to(work)
    w, b = (None if t is None else t.detach().to(work).contiguous() for t in (weight, bias))
    R, B = x.shape[:2]
    y = torch.empty_like(x)
    mean = torch.empty(B, groups, R, dtype=work)
    var = torch.empty_like(mean)
    n1, pa, pb, c0, nc = spec
    _native.lib().group_norm_jet_forward(np_view(x), np_view(w), np_view(b), groups, float(eps),
                                         n1, _ints(pa), _ints(pb), c0, nc, np_view(y),
                                         np_view(mean), np_view(var))
    return y.to(rows.dtype).reshape(rows.shape), mean, var


def run_backward(grad, rows, weight, mean, var, groups, eps, spec):
    """(d rows, d weight, d bias) of the op on the backend fpkern.backend selects for `rows`,
    without checks."""
    which = backend.select(rows)
    C = rows.shape[2]
    if which == "torch":
        return _backward_torch(grad, rows, weight, mean, var, groups, eps, spec)
    x, gy = _as4d(rows), _as4d(grad)
    if which == "triton":
        from fpkern.kernels import group_norm_jet as k
        w = None if weight is None else weight.contiguous()
        dx, dw, db = k.group_norm_jet_backward(gy, x, w, mean.contiguous(), var.contiguous(),
                                               groups, eps, spec)
        return dx.reshape(rows.shape), dw, db
    work = _native.work_dtype(rows.dtype)
    x, gy = x.to(work), gy.to(work)
    w = None if weight is None else weight.detach().to(work).contiguous()
    dx = torch.empty_like(x)
    dw, db = torch.empty(C, dtype=work), torch.empty(C, dtype=work)
    n1, pa, pb, c0, nc = spec
    stats = [np_view(t.to(work).contiguous()) for t in (mean, var)]
    _native.lib().group_norm_jet_backward(
        np_view(gy), np_view(x), np_view(w), *stats, groups, float(eps), n1, _ints(pa),
        _ints(pb), c0, nc, np_view(dx), np_view(dw), np_view(db))
    return dx.to(rows.dtype).reshape(rows.shape), dw.to(rows.dtype), db.to(rows.dtype)


# ---- torch.library registration ----------------------------------------------------------
def _spec(n1, pair_a, pair_b, c0, nc):
    return int(n1), tuple(pair_a), tuple(pair_b), int(c0), int(nc)


def _forward(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             groups: int, eps: float, n1: int, pair_a: list[int], pair_b: list[int], c0: int,
             nc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_forward(rows, weight, bias, groups, eps, _spec(n1, pair_a, pair_b, c0, nc))


def _backward_kernel(grad: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None,
                     mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, n1: int,
                     pair_a: list[int], pair_b: list[int], c0: int,
                     nc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_backward(grad, rows, weight, mean, var, groups, eps,
                     _spec(n1, pair_a, pair_b, c0, nc))


_gn_jet_op = torch.library.custom_op("fpkern::group_norm_jet", _forward, mutates_args=())
_gn_jet_bwd_op = torch.library.custom_op("fpkern::group_norm_jet_backward", _backward_kernel,
                                         mutates_args=())


@_gn_jet_op.register_fake
def _(rows, weight, bias, groups, eps, n1, pair_a, pair_b, c0, nc):
    stats = rows.new_empty((rows.shape[1], groups, rows.shape[0]), dtype=acc_dtype(rows))
    return torch.empty_like(rows), stats, torch.empty_like(stats)


@_gn_jet_bwd_op.register_fake
def _(grad, rows, weight, mean, var, groups, eps, n1, pair_a, pair_b, c0, nc):
    C = rows.shape[2]
    return torch.empty_like(rows), rows.new_empty(C), rows.new_empty(C)


def _setup(ctx, inputs, output):
    rows, weight, bias, *layout = inputs
    _, mean, var = output
    ctx.save_for_backward(rows, weight, bias, mean, var)
    ctx.layout = layout
    ctx.mark_non_differentiable(mean, var)


def reference_grads(ref, grad, rows, weight, bias, need):
    """[d rows, d weight, d bias] of ref(rows, weight, bias) against grad, with create_graph
    (a backward that is itself differentiable); None where `need` says no or the input is
    None. Shared with fpkern.jet.fused.group_norm_act."""
    with torch.enable_grad():
        ins = [t if t is None or t.requires_grad else t.detach().requires_grad_(True)
               for t in (rows, weight, bias)]
        out = ref(*ins)
        wanted = [t for t, n in zip(ins, need) if n and t is not None]
        got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return [next(got) if n and t is not None else None for t, n in zip(ins, need)]


def kernel_grads(d_rows, d_w, d_b, weight, bias, need):
    """The backward kernel's outputs as autograd wants them: None where not needed, the
    parameters' gradients in the parameters' dtype."""
    return [d_rows if need[0] else None,
            d_w.to(weight.dtype) if need[1] and weight is not None else None,
            d_b.to(bias.dtype) if need[2] and bias is not None else None]


def _backward(ctx, grad, _grad_mean, _grad_var):
    rows, weight, bias, mean, var = ctx.saved_tensors
    groups, eps, n1, pa, pb, c0, nc = ctx.layout
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():      # create_graph: a backward that is itself differentiable
        spec = _spec(n1, pa, pb, c0, nc)
        return tuple(reference_grads(
            lambda r, w, b: group_norm_jet_ref(r, groups, w, b, eps, spec),
            grad, rows, weight, bias, need)) + (None,) * 7
    d_rows, d_w, d_b = pick(_gn_jet_bwd_op, _backward_kernel, grad.contiguous(), rows, weight,
                            mean, var, groups, eps, n1, pa, pb, c0, nc)
    return tuple(kernel_grads(d_rows, d_w, d_b, weight, bias, need)) + (None,) * 7


_gn_jet_op.register_autograd(_backward, setup_context=_setup)
_gn_jet = EagerOp(_gn_jet_op, _forward, _setup, _backward)


# ---- public function ---------------------------------------------------------------------
def group_norm_jet_stats(rows: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5, spec=None):
    """group_norm_jet with what a fused consumer needs (fpkern.jet.fused.group_norm_act):
    (y, weight, bias, mean, var), weight and bias cast to the rows' dtype."""
    if spec is None:
        raise ValueError("spec (Layout.kernel_spec: (n1, pair_a, pair_b, c0, nc)) is required")
    _check(rows, groups, weight, bias, spec)
    # weight and bias in the rows' dtype (autograd casts their gradients back)
    weight, bias = (None if t is None else t.to(rows.dtype) for t in (weight, bias))
    n1, pa, pb, c0, nc = spec
    y, mean, var = _gn_jet(rows, weight, bias, int(groups), float(eps), int(n1),
                           [int(i) for i in pa], [int(i) for i in pb], int(c0), int(nc))
    return y, weight, bias, mean, var


def group_norm_jet(rows: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, spec=None) -> torch.Tensor:
    """The rows of F.group_norm(Jet, groups, weight, bias, eps) for input rows
    [R, B, C, *spatial] with layout spec (n1, pair_a, pair_b, c0, nc) (Layout.kernel_spec)."""
    return group_norm_jet_stats(rows, groups, weight, bias, eps, spec)[0]

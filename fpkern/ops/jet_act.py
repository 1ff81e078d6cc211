"""The activation jet rule as one fused autograd op (fpkern::jet_act), with its reference.

    jet_act(rows, act, spec) -> rows of act applied to the Jet whose rows are `rows`

rows: [R, ...] stacked Taylor rows (fpkern.jet.tensor); spec: Layout.kernel_spec, i.e.
(n1, pair_a, pair_b, c0, nc). With d_j = phi^(j)(x0) (second-order Taylor rule):

    y0 = phi(x0), y_i = d1 x_i, y_(a,b) = d1 x_(a,b) + d2 x_a x_b,
    y_coll = d1 x_coll + d2 mean_k x_k^2                    (k = c0 .. c0+nc-1)

One pass over the rows replaces the ~10 torch ops of the composite rule. The backward is
hand-written (it needs phi'''); when autograd records the backward itself (create_graph, as
the div-form residual's reverse pass does) its torch formulas run instead, which are
differentiable, so double backward works. Backends: Triton on CUDA, C++ on CPU, torch.
"""

from __future__ import annotations

import torch

from fpkern import backend
from fpkern.ops._eager import EagerOp, pick

__all__ = ["ACTS", "jet_act", "jet_act_ref", "jet_rule_vjp"]

#: Activations with a fused jet rule, by the code the kernels take.
ACTS = {"silu": 0, "tanh": 1, "sigmoid": 2}
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _derivs_ref(x: torch.Tensor, act: str):
    """phi, phi', phi'' and phi''' at x (torch, differentiable)."""
    if act == "tanh":
        y = torch.tanh(x)
        e = 1 - y * y
        return y, e, -2 * y * e, e * (6 * y * y - 2)
    s = torch.sigmoid(x)
    p = s * (1 - s)
    if act == "sigmoid":
        return s, p, p * (1 - 2 * s), p - 6 * p * p
    q = 1 - 2 * s
    return x * s, s * (1 + x * (1 - s)), p * (2 + x * q), p * (q * (3 + x * q) - 2 * x * p)


def jet_act_ref(rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """Plain-torch jet rule (differentiable): the reference of the fused kernels."""
    n1, pa, pb, c0, nc = spec
    x0 = rows[0]
    d0, d1, d2, _ = _derivs_ref(x0, act)
    out = [d0[None], d1 * rows[1:1 + n1]]
    if pa:
        r = rows[1 + n1:1 + n1 + len(pa)]
        out.append(d1 * r + d2 * rows[list(pa)] * rows[list(pb)])
    if nc:
        sq = rows[c0:c0 + nc].pow(2).mean(0)
        out.append((d1 * rows[-1] + d2 * sq)[None])
    return torch.cat(out)


def _jet_act_backward_ref(grad: torch.Tensor, rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """The vector-Jacobian product of jet_act_ref, written out (what the kernels compute)."""
    _, d1, d2, d3 = _derivs_ref(rows[0], act)
    return jet_rule_vjp(grad, rows, d1, d2, d3, spec)


def jet_rule_vjp(grad: torch.Tensor, rows: torch.Tensor, d1, d2, d3, spec) -> torch.Tensor:
    """The vector-Jacobian product of the jet rule of any phi, given its first three
    derivatives at the value row: the gradient of the input rows for output-row gradients."""
    n1, pa, pb, c0, nc = spec
    dx = torch.zeros_like(rows)
    first = slice(1, 1 + n1)
    g0 = grad[0] * d1 + (grad[first] * d2 * rows[first]).sum(0)
    dx[first] = grad[first] * d1
    for j, (a, b) in enumerate(zip(pa, pb)):
        r = 1 + n1 + j
        g0 = g0 + grad[r] * (d2 * rows[r] + d3 * rows[a] * rows[b])
        dx[a] += grad[r] * d2 * rows[b]
        dx[b] += grad[r] * d2 * rows[a]
        dx[r] = grad[r] * d1
    if nc:
        ks = slice(c0, c0 + nc)
        g0 = g0 + grad[-1] * (d2 * rows[-1] + d3 * rows[ks].pow(2).mean(0))
        dx[ks] += 2 * grad[-1] * d2 * rows[ks] / nc
        dx[-1] = grad[-1] * d1
    dx[0] = g0
    return dx


def _check_spec(rows: torch.Tensor, act: str, spec) -> None:
    if act not in ACTS:
        raise ValueError(f"act {act!r} has no fused jet rule; valid names: {sorted(ACTS)}")
    n1, pa, pb, c0, nc = spec
    want = 1 + n1 + len(pa) + (1 if nc else 0)
    if rows.dim() < 2 or rows.shape[0] != want:
        raise ValueError(f"rows must be [R, ...] with R = {want} for layout {spec}, got shape "
                         f"{tuple(rows.shape)}")
    if len(pa) != len(pb):
        raise ValueError(f"pair_a and pair_b differ in length: {pa}, {pb}")


# ---- backend dispatch ------------------------------------------------------------------
def _native(name, tensors, act, spec):
    """The C++ kernel `name` on (grad,) rows; it takes sigmoid or tanh of the value row from
    torch, whose exp is vectorised (jet_act.h). Kept lean: it runs ~80 times per jet pass
    of a small NCSN++, and its Python around the kernel once cost as much as the kernel."""
    dtype = tensors[0].dtype
    work = dtype if dtype in _NATIVE_DTYPES else torch.float32
    ins = [t.detach().to(work).contiguous() for t in tensors]     # no copies when already so
    rows = ins[-1]
    base = torch.tanh(rows[0]) if act == "tanh" else torch.sigmoid(rows[0])
    out = torch.empty_like(rows)
    R = rows.shape[0]
    n1, pa, pb, c0, nc = spec
    getattr(backend.native(), name)(*(t.numpy().reshape(R, -1) for t in ins),
                                    base.numpy().reshape(-1), ACTS[act], n1, pa, pb, c0, nc,
                                    out.numpy().reshape(R, -1))
    return out if work == dtype else out.to(dtype)


def _fwd_impl(rows, act, spec):
    which = backend.select(rows)
    if which == "torch":
        return jet_act_ref(rows.to(_acc(rows)), act, spec).to(rows.dtype)
    if which == "triton":
        from fpkern.kernels import jet_act as k
        flat = rows.contiguous().reshape(rows.shape[0], -1)
        return k.jet_act_forward(flat, ACTS[act], *spec).reshape(rows.shape)
    return _native("jet_act_forward", [rows], act, spec)


def _bwd_impl(grad, rows, act, spec):
    which = backend.select(rows)
    if which == "torch":
        a = _acc(rows)
        return _jet_act_backward_ref(grad.to(a), rows.to(a), act, spec).to(rows.dtype)
    if which == "triton":
        from fpkern.kernels import jet_act as k
        shape = rows.shape
        flat = lambda t: t.contiguous().reshape(shape[0], -1)  # noqa: E731
        return k.jet_act_backward(flat(grad), flat(rows), ACTS[act], *spec).reshape(shape)
    return _native("jet_act_backward", [grad, rows], act, spec)


# ---- torch.library registration --------------------------------------------------------
def _forward(rows: torch.Tensor, act: str, n1: int, pair_a: list[int], pair_b: list[int],
             c0: int, nc: int) -> torch.Tensor:
    return _fwd_impl(rows, act, (n1, tuple(pair_a), tuple(pair_b), c0, nc))


def _backward_kernel(grad: torch.Tensor, rows: torch.Tensor, act: str, n1: int,
                     pair_a: list[int], pair_b: list[int], c0: int, nc: int) -> torch.Tensor:
    return _bwd_impl(grad, rows, act, (n1, tuple(pair_a), tuple(pair_b), c0, nc))


_jet_act_op = torch.library.custom_op("fpkern::jet_act", _forward, mutates_args=())
_jet_act_bwd_op = torch.library.custom_op("fpkern::jet_act_backward", _backward_kernel,
                                          mutates_args=())


@_jet_act_op.register_fake
def _(rows, act, n1, pair_a, pair_b, c0, nc):
    return torch.empty_like(rows)


@_jet_act_bwd_op.register_fake
def _(grad, rows, act, n1, pair_a, pair_b, c0, nc):
    return torch.empty_like(rows)


def _setup(ctx, inputs, output):
    rows, *layout = inputs
    ctx.save_for_backward(rows)
    ctx.layout = layout


def _backward(ctx, grad):
    (rows,) = ctx.saved_tensors
    act, n1, pa, pb, c0, nc = ctx.layout
    if torch.is_grad_enabled():      # create_graph: the torch formulas, differentiable
        spec = (n1, tuple(pa), tuple(pb), c0, nc)
        return (_jet_act_backward_ref(grad, rows, act, spec),) + (None,) * 6
    d_rows = pick(_jet_act_bwd_op, _backward_kernel, grad.contiguous(), rows, act, n1, pa, pb,
                  c0, nc)
    return (d_rows,) + (None,) * 6


_jet_act_op.register_autograd(_backward, setup_context=_setup)
_jet_act = EagerOp(_jet_act_op, _forward, _setup, _backward)


def jet_act(rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """The rows of act(Jet) for input rows [R, ...] with layout spec (n1, pair_a, pair_b, c0,
    nc) (see Layout.kernel_spec); act one of ACTS."""
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
        raise TypeError("rows must be a floating torch.Tensor of shape [R, ...]")
    _check_spec(rows, act, spec)
    n1, pa, pb, c0, nc = spec
    return _jet_act(rows, act, int(n1), list(pa), list(pb), int(c0), int(nc))

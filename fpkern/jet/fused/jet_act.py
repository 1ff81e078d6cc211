"""The activation jet rule as one fused autograd op (fpkern::jet_act), with its reference.

    jet_act(rows, act, spec) -> rows of act applied to the Jet whose rows are `rows`

rows: [R, ...] stacked Taylor rows (fpkern.jet.tensor); spec: Layout.kernel_spec, i.e.
(n1, pair_a, pair_b, c0, nc). The rule is that of every elementwise function
(fpkern.jet.elementwise), with d_j = phi^(j)(x0):

    y0 = phi(x0), y_i = d1 x_i, y_(a,b) = d1 x_(a,b) + d2 x_a x_b,
    y_coll = d1 x_coll + d2 mean_k x_k^2                    (k = c0 .. c0+nc-1)

One pass over the rows replaces the ~10 torch ops of the composite rule. The backward is
hand-written (it needs the third derivative); when autograd records the backward itself
(create_graph, as the div-form residual's reverse pass does) its torch formulas run
instead, which are differentiable, so double backward works. Backends: Triton on CUDA, C++
on CPU, torch. `run_forward` / `run_backward` dispatch to them; `native_forward` /
`native_backward` are the C++ path alone (fpkern.jet.fused.mlp_jet_cpu calls them).
"""

from __future__ import annotations

import torch

from fpkern import _native, backend
from fpkern.jet.elementwise import elementwise_rows, elementwise_vjp, spec_layout
from fpkern.jet.fused.eager import EagerOp, pick

__all__ = ["ACTS", "check_act", "jet_act", "jet_act_ref", "jet_act_backward_ref", "run_forward",
           "run_backward", "native_forward", "native_backward"]

#: Activations with a fused jet rule, by the code the kernels take.
ACTS = {"silu": 0, "tanh": 1, "sigmoid": 2}


def check_act(act: str) -> None:
    """Raise ValueError unless `act` names an activation with a fused jet rule."""
    if act not in ACTS:
        raise ValueError(f"act {act!r} has no fused jet rule; valid names: {sorted(ACTS)}")


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
    d0, d1, d2, _ = _derivs_ref(rows[0], act)
    return elementwise_rows(rows, spec_layout(spec), d0, d1, d2)


def jet_act_backward_ref(grad: torch.Tensor, rows: torch.Tensor, act: str,
                         spec) -> torch.Tensor:
    """The vector-Jacobian product of jet_act_ref, written out (what the kernels compute)."""
    _, d1, d2, d3 = _derivs_ref(rows[0], act)
    return elementwise_vjp(grad, rows, d1, d2, d3, spec)


def _check_spec(rows: torch.Tensor, act: str, spec) -> None:
    check_act(act)
    n1, pa, pb, c0, nc = spec
    want = 1 + n1 + len(pa) + (1 if nc else 0)
    if rows.dim() < 2 or rows.shape[0] != want:
        raise ValueError(f"rows must be [R, ...] with R = {want} for layout {spec}, got shape "
                         f"{tuple(rows.shape)}")
    if len(pa) != len(pb):
        raise ValueError(f"pair_a and pair_b differ in length: {pa}, {pb}")


# ---- backend dispatch ------------------------------------------------------------------
def _native_rows(name: str, tensors, act: str, spec) -> torch.Tensor:
    """The C++ kernel `name` on (grad,) rows; it takes sigmoid or tanh of the value row from
    torch, whose exp is vectorised (jet_act.h). Kept to the few calls it needs: it runs some
    80 times per jet pass, so the Python around the kernel counts as much as the kernel."""
    dtype = tensors[0].dtype
    work = _native.work_dtype(dtype)
    ins = [t.detach().to(work).contiguous() for t in tensors]     # no copies when already so
    rows = ins[-1]
    base = torch.tanh(rows[0]) if act == "tanh" else torch.sigmoid(rows[0])
    out = torch.empty_like(rows)
    R = rows.shape[0]
    n1, pa, pb, c0, nc = spec
    getattr(_native.lib(), name)(*(t.numpy().reshape(R, -1) for t in ins),
                                 base.numpy().reshape(-1), ACTS[act], n1, pa, pb, c0, nc,
                                 out.numpy().reshape(R, -1))
    return out if work == dtype else out.to(dtype)


def native_forward(rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """jet_act's forward by the C++ kernel (CPU rows), without checks."""
    return _native_rows("jet_act_forward", [rows], act, spec)


def native_backward(grad: torch.Tensor, rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """jet_act's backward (the rows' gradient) by the C++ kernel (CPU rows), without checks."""
    return _native_rows("jet_act_backward", [grad, rows], act, spec)


def run_forward(rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """jet_act's forward on the backend fpkern.backend selects for `rows`, without checks."""
    which = backend.select(rows)
    if which == "torch":
        return jet_act_ref(rows.to(_native.acc_dtype(rows)), act, spec).to(rows.dtype)
    if which == "triton":
        from fpkern.kernels import jet_act as k
        return k.jet_act_forward(_native.rows(rows), ACTS[act], *spec).reshape(rows.shape)
    return native_forward(rows, act, spec)


def run_backward(grad: torch.Tensor, rows: torch.Tensor, act: str, spec) -> torch.Tensor:
    """jet_act's backward on the backend fpkern.backend selects for `rows`, without checks."""
    which = backend.select(rows)
    if which == "torch":
        a = _native.acc_dtype(rows)
        return jet_act_backward_ref(grad.to(a), rows.to(a), act, spec).to(rows.dtype)
    if which == "triton":
        from fpkern.kernels import jet_act as k
        flat = k.jet_act_backward(_native.rows(grad), _native.rows(rows), ACTS[act], *spec)
        return flat.reshape(rows.shape)
    return native_backward(grad, rows, act, spec)


# ---- torch.library registration --------------------------------------------------------
def _forward(rows: torch.Tensor, act: str, n1: int, pair_a: list[int], pair_b: list[int],
             c0: int, nc: int) -> torch.Tensor:
    return run_forward(rows, act, (n1, tuple(pair_a), tuple(pair_b), c0, nc))


def _backward_kernel(grad: torch.Tensor, rows: torch.Tensor, act: str, n1: int,
                     pair_a: list[int], pair_b: list[int], c0: int, nc: int) -> torch.Tensor:
    return run_backward(grad, rows, act, (n1, tuple(pair_a), tuple(pair_b), c0, nc))


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
        return (jet_act_backward_ref(grad, rows, act, spec),) + (None,) * 6
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

"""The MLP score network (fpkern.models.mlp) on jets as one fused op, `fpkern::mlp_jet`.

    mlp_jet(x_rows [R, B, D], t_rows [R, B], params, spec) -> output rows [R, B, D]

Rows follow fpkern.jet.tensor and spec is Layout.kernel_spec, (n1, pair_a, pair_b, c0, nc).
Every row goes through each layer by the formulas of fpkern.jet.fused.mlp_rows.

`mlp_jet_ref` is the plain-torch reference (any layout, any dtype, differentiable). The op
runs, by fpkern.backend:
  - triton (CUDA, or CPU under TRITON_INTERPRET=1): the whole-network kernels of
    fpkern/kernels/mlp_jet.py, for float32, width <= 256 and at most 16 rows, pair rows
    included (the projected div-form pass for K <= 6 probes);
  - cpp (CPU): fpkern.jet.fused.mlp_jet_cpu, the same algorithm with torch GEMMs over all
    rows and the C++ activation jet kernels, float32 or float64, any width and row count.
`kernel_unsupported` says why a call cannot use it. The backward runs the backend's backward,
except when the graph of the backward itself is recorded (create_graph=True): the gradients
then come from the reference, so double backward works.

`mlp_jet_rule(composite)` is the jet rule of a function computing this network; the model
module registers it (fpkern.models.mlp, through fpkern.jet.register_rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpkern import backend
from fpkern.jet.fused.mlp_rows import MLPParams, fourier_rows, linear_rows, silu_rows
from fpkern.jet.rules import kernels_enabled, layout_of, lift
from fpkern.jet.tensor import Jet

__all__ = ["MLPParams", "mlp_jet", "mlp_jet_ref", "kernel_unsupported", "mlp_jet_rule"]

MAX_WIDTH = 256       # the Triton kernels; wider networks: the per-op jet rules
MAX_ROWS = 16        # the Triton kernels (4-bit row indices)
_N_TENSORS = 13       # x_rows, t_rows and the 11 parameter tensors of the op


# ---- reference -------------------------------------------------------------------------
def mlp_jet_ref(x_rows: torch.Tensor, t_rows: torch.Tensor, params: MLPParams,
                spec) -> torch.Tensor:
    """Output rows of the MLP for input rows, by the per-row formulas in plain torch."""
    feats = fourier_rows(t_rows, params.fourier, spec)
    temb = silu_rows(linear_rows(feats, params.temb_w, params.temb_b), spec)
    h = linear_rows(x_rows, params.in_w, params.in_b) + temb
    for w, b, pw, pb in zip(params.hidden_w, params.hidden_b, params.proj_w, params.proj_b):
        h = linear_rows(silu_rows(h, spec), w, b) + linear_rows(temb, pw, pb)
    return linear_rows(silu_rows(h, spec), params.out_w, params.out_b)


# ---- eligibility and checks ------------------------------------------------------------
def _impl(like: torch.Tensor):
    """The module that runs the op on `like`'s backend: the Triton kernels or the CPU one."""
    if backend.select(like) == "triton":
        from fpkern.kernels import mlp_jet as k     # imports triton: only when a kernel runs
        return k
    from fpkern.jet.fused import mlp_jet_cpu
    return mlp_jet_cpu


def kernel_unsupported(x_rows: torch.Tensor, t_rows: torch.Tensor, params: MLPParams,
                       spec) -> str | None:
    """Why the fused op cannot take these inputs on their backend (fpkern.backend.select),
    or None when it can."""
    which = backend.select(x_rows)
    if which == "torch":
        return "no fused backend here (the torch backend runs the per-op jet rules)"
    if spec is None:
        return "collapsed rows are not contiguous"
    n1, pair_a, _, _, nc = spec
    if x_rows.dim() != 3 or t_rows.dim() != 2:
        return (f"x rows must be [R, B, D] and t rows [R, B], got {tuple(x_rows.shape)}, "
                f"{tuple(t_rows.shape)}")
    R = x_rows.shape[0]
    if x_rows.shape[1] == 0:
        return "no samples"
    if R != 1 + n1 + len(pair_a) + (1 if nc else 0):
        return f"{R} rows for a layout of 1 + n1 + pairs (+ 1 collapsed) rows"
    tensors = (x_rows, t_rows) + params.tensors()
    if any(p.device != x_rows.device for p in tensors):
        return "tensors on several devices"
    if which == "cpp":
        if x_rows.dtype not in (torch.float32, torch.float64):
            return f"the C++ kernels compute in float32 or float64, not {x_rows.dtype}"
        if any(p.dtype != x_rows.dtype for p in tensors):
            return "tensors of several dtypes"
        return None
    if R > MAX_ROWS:
        return f"{R} rows (the Triton kernel takes at most {MAX_ROWS})"
    width = params.in_w.shape[0]
    if width > MAX_WIDTH:
        return f"width {width} > {MAX_WIDTH}"
    if any(p.dtype != torch.float32 for p in tensors):
        return "the Triton kernel computes in float32 only"
    return None


def _check(x_rows, t_rows, params: MLPParams, spec) -> None:
    if not isinstance(x_rows, torch.Tensor) or x_rows.dim() != 3:
        raise ValueError(f"x_rows must be a tensor [R, B, D], got {getattr(x_rows, 'shape', x_rows)}")
    R, B, D = x_rows.shape
    if not isinstance(t_rows, torch.Tensor) or tuple(t_rows.shape) != (R, B):
        raise ValueError(f"t_rows must have shape [R, B] = {(R, B)}, got "
                         f"{tuple(getattr(t_rows, 'shape', ()))}")
    width, E = params.in_w.shape[0], params.fourier.shape[0]
    L = len(params.hidden_w)
    want = {"fourier": (E,), "temb_w": (width, 2 * E), "temb_b": (width,), "in_w": (width, D),
            "in_b": (width,), "out_w": (D, width), "out_b": (D,)}
    for name, shape in want.items():
        got = tuple(getattr(params, name).shape)
        if got != shape:
            raise ValueError(f"params.{name} has shape {got}, expected {shape}")
    for name, shape in (("hidden_w", (width, width)), ("hidden_b", (width,)),
                        ("proj_w", (width, width)), ("proj_b", (width,))):
        seq = getattr(params, name)
        if len(seq) != L or any(tuple(p.shape) != shape for p in seq):
            raise ValueError(f"params.{name} must hold {L} tensors of shape {shape}")
    reason = kernel_unsupported(x_rows, t_rows, params, spec)
    if reason is not None:
        raise ValueError(f"mlp_jet: {reason}; use mlp_jet_ref or the per-op jet rules")


def _stacked(seq, like: torch.Tensor, shape) -> torch.Tensor:
    if isinstance(seq, torch.Tensor):
        return seq
    return torch.stack(list(seq)) if len(seq) else like.new_zeros((0,) + shape)


def _contig(ts):
    return [t.contiguous() for t in ts]


def _edge(t: torch.Tensor) -> torch.Tensor:
    """A leaf requiring grad as a view with an autograd node of its own (_executed)."""
    return t.view_as(t) if t.requires_grad and t.grad_fn is None else t


# ---- torch.library registration --------------------------------------------------------
@torch.library.custom_op("fpkern::mlp_jet", mutates_args=())
def _mlp_jet_op(x_rows: torch.Tensor, t_rows: torch.Tensor, fourier: torch.Tensor,
                temb_w: torch.Tensor, temb_b: torch.Tensor, in_w: torch.Tensor,
                in_b: torch.Tensor, hidden_w: torch.Tensor, hidden_b: torch.Tensor,
                proj_w: torch.Tensor, proj_b: torch.Tensor, out_w: torch.Tensor,
                out_b: torch.Tensor, n1: int, pair_a: list[int], pair_b: list[int], c0: int,
                nc: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = _contig((x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b,
                    proj_w, proj_b, out_w, out_b))
    return _impl(x_rows).mlp_jet_forward(*args, n1, pair_a, pair_b, c0, nc)


def _saved_like(x_rows, in_w, fourier, hidden_w):
    R, B, D = x_rows.shape
    shapes = _impl(x_rows).saved_shapes(R, B, in_w.shape[0], fourier.shape[0], D,
                                        hidden_w.shape[0])
    return [x_rows.new_empty(s) for s in shapes]


@_mlp_jet_op.register_fake
def _(x_rows, t_rows, fourier, temb_w, temb_b, in_w, in_b, hidden_w, hidden_b, proj_w, proj_b,
      out_w, out_b, n1, pair_a, pair_b, c0, nc):
    return (torch.empty_like(x_rows),) + tuple(_saved_like(x_rows, in_w, fourier, hidden_w))


@torch.library.custom_op("fpkern::mlp_jet_backward", mutates_args=())
def _mlp_jet_bwd_op(g_out: torch.Tensor, x_rows: torch.Tensor, t_rows: torch.Tensor,
                    fourier: torch.Tensor, temb_w: torch.Tensor, in_w: torch.Tensor,
                    hidden_w: torch.Tensor, proj_w: torch.Tensor, out_w: torch.Tensor,
                    feats: torch.Tensor, pre_t: torch.Tensor, temb: torch.Tensor,
                    pre: torch.Tensor, n1: int, pair_a: list[int], pair_b: list[int], c0: int,
                    nc: int, weights: bool, time: bool) -> list[torch.Tensor]:
    args = _contig((g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w,
                    feats, pre_t, temb, pre))
    return list(_impl(x_rows).mlp_jet_backward(*args, n1, pair_a, pair_b, c0, nc,
                                               weights=weights, time=time))


@_mlp_jet_bwd_op.register_fake
def _(g_out, x_rows, t_rows, fourier, temb_w, in_w, hidden_w, proj_w, out_w, feats, pre_t,
      temb, pre, n1, pair_a, pair_b, c0, nc, weights, time):
    width = in_w.shape[0]
    like = [x_rows, t_rows, fourier, temb_w, temb_w.new_empty(width), in_w,
            in_w.new_empty(width), hidden_w, hidden_w.new_empty(hidden_w.shape[:2]), proj_w,
            proj_w.new_empty(proj_w.shape[:2]), out_w, out_w.new_empty(out_w.shape[0])]
    return [torch.empty_like(t) for t in like]


def _setup(ctx, inputs, output):
    ctx.spec = tuple(inputs[_N_TENSORS:])
    ctx.save_for_backward(*inputs[:_N_TENSORS], *output[1:])


def _params_of(flat) -> MLPParams:
    f, wt, bt, win, bin_, wh, bh, wp, bp, wo, bo = flat
    return MLPParams(f, wt, bt, win, bin_, wh, bh, wp, bp, wo, bo)


def _ref_backward(ctx, g_out, inputs):
    """Gradients from the differentiable reference (used while recording the backward)."""
    n1, pair_a, pair_b, c0, nc = ctx.spec
    need = [i for i, x in enumerate(inputs) if ctx.needs_input_grad[i]]
    out = mlp_jet_ref(inputs[0], inputs[1], _params_of(inputs[2:]),
                      (n1, tuple(pair_a), tuple(pair_b), c0, nc))
    grads = torch.autograd.grad(out, [inputs[i] for i in need], g_out, create_graph=True,
                                allow_unused=True)
    result = [None] * _N_TENSORS
    for i, g in zip(need, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


def _executed(ctx) -> list[bool]:
    """Which inputs' gradients the running backward uses: needs_input_grad, less the edges
    the engine will not execute (torch.autograd.grad for x alone skips the parameters').
    mlp_jet gives every input requiring grad a node of its own (_edge): the engine cannot
    answer for a leaf's during torch.autograd.grad; where it cannot, the gradient counts."""
    need = list(ctx.needs_input_grad[:_N_TENSORS])
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    edges = getattr(ctx, "next_functions", ())
    if will_run is None or len(edges) != _N_TENSORS:
        return need

    def runs(node) -> bool:
        try:
            return node is None or bool(will_run(node))
        except RuntimeError:
            return True

    return [n and runs(node) for n, (node, _) in zip(need, edges)]


def _backward(ctx, g_out, *unused):
    saved = ctx.saved_tensors
    inputs, kept = saved[:_N_TENSORS], saved[_N_TENSORS:]
    if torch.is_grad_enabled():
        grads = _ref_backward(ctx, g_out, inputs)
    else:
        need = _executed(ctx)
        x_rows, t_rows, f, wt, _, win, _, wh, _, wp, _, wo, _ = inputs
        grads = _mlp_jet_bwd_op(g_out.contiguous(), x_rows, t_rows, f, wt, win, wh, wp, wo,
                                *kept, *ctx.spec, any(need[2:]), need[1])
        grads = [g if n else None for g, n in zip(grads, need)]
    return tuple(grads) + (None,) * 5


_mlp_jet_op.register_autograd(_backward, setup_context=_setup)


# ---- public function -------------------------------------------------------------------
def mlp_jet(x_rows: torch.Tensor, t_rows: torch.Tensor, params: MLPParams, spec) -> torch.Tensor:
    """Output rows [R, B, D] of the MLP for x rows [R, B, D] and t rows [R, B] as one fused
    op (one Triton launch each way on CUDA, fpkern.jet.fused.mlp_jet_cpu on CPU);
    spec = Layout.kernel_spec of the rows."""
    _check(x_rows, t_rows, params, spec)
    n1, pair_a, pair_b, c0, nc = spec
    width = params.in_w.shape[0]
    p = params
    hidden = [_stacked(s, p.in_w, shape) for s, shape in
              ((p.hidden_w, (width, width)), (p.hidden_b, (width,)),
               (p.proj_w, (width, width)), (p.proj_b, (width,)))]
    tensors = [x_rows, t_rows, p.fourier, p.temb_w, p.temb_b, p.in_w, p.in_b, *hidden,
               p.out_w, p.out_b]
    out = _mlp_jet_op(*map(_edge, tensors), int(n1), [int(a) for a in pair_a],
                      [int(b) for b in pair_b], int(c0) if nc else 1, int(nc))
    return out[0]


# ---- the whole-network jet rule ----------------------------------------------------------
def _bind(x, t, params, act):
    return x, t, params, act


def mlp_jet_rule(composite):
    """The jet rule (fpkern.jet.register_rule) of a function f(x, t, params, act) computing
    this MLP: the fused op where a fused backend runs (Triton on CUDA tensors, C++ on CPU
    ones), the activation is SiLU and kernel_unsupported finds nothing; anywhere else
    `composite(x, t, params, act)`, the network as torch functions on the per-op rules."""

    def rule(func, args, kwargs):
        x, t, params, act = _bind(*args, **kwargs)
        jets = [a for a in (x, t) if isinstance(a, Jet)]
        if (jets and not any(isinstance(p, Jet) for p in params.tensors())
                and (isinstance(act, torch.nn.SiLU) or act is F.silu)):
            layout = layout_of(jets)
            like = jets[0].rows
            if kernels_enabled() and backend.select(like) != "torch":
                x_rows = x.rows if isinstance(x, Jet) else lift(x, layout, like)
                t_rows = t.rows if isinstance(t, Jet) else lift(t, layout, like)
                spec = layout.kernel_spec
                if kernel_unsupported(x_rows, t_rows, params, spec) is None:
                    return Jet(mlp_jet(x_rows, t_rows, params, spec), layout)
        return composite(x, t, params, act)

    return rule

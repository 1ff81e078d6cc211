"""Jet rules: how each torch function maps the rows of its Jet inputs (see fpkern.jet.tensor).

Four kinds of rule cover the score networks of fpkern.models:
  - linear maps (reshape, sums, convolutions without bias, einsum with one Jet ...): every
    row maps the same way; per-sample ops fold the R rows into the batch (one GEMM);
  - affine pieces (additive constants, biases, cat with constant parts): only the value
    row receives the constant;
  - elementwise nonlinearities phi: value phi(x0), first order phi'(x0) x_i, second order
    phi'(x0) x_ab + phi''(x0) x_a x_b (collapsed: phi''(x0) mean_k x_k^2);
  - bilinear products p * q, einsum, matmul of two Jets: the Leibniz rule up to order 2.
Composite layers (GroupNorm, LayerNorm, RMSNorm, softmax, var_mean, division) are
expanded into those; attention (scaled_dot_product_attention, baddbmm) is composed the same
way in fpkern.jet.rules_attention, which fills the same registry. Anything else raises
JetUnsupported naming the function (fpkern.jet.tensor), never a wrong answer.

Activations and GroupNorm run as fused ops (fpkern.jet.fused) where a kernel backend runs
them. A whole network may bring a rule of its own: the layer that defines it registers it
with `register_rule` (fpkern.models.mlp does so for the MLP); this package imports no
model and no residual op.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import string

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from fpkern import backend
from fpkern.jet.elementwise import cross_rows, elementwise_rows
from fpkern.jet.tensor import Jet, JetUnsupported, Layout

__all__ = ["dispatch", "HANDLERS", "register_rule", "composite_rules", "kernels_enabled",
           "layout_of", "lift"]

#: The jet rule of each torch function (and of registered whole-network functions):
#: handler(func, args, kwargs) -> the result on Jets.
HANDLERS: dict = {}


def register_rule(fn, handler) -> None:
    """Make `handler(func, args, kwargs)` the jet rule of `fn`, a function that dispatches
    through ``__torch_function__`` (torch.overrides.handle_torch_function). A later
    registration of the same `fn` replaces the earlier one."""
    if not callable(fn) or not callable(handler):
        raise TypeError(f"register_rule needs two callables, got {type(fn).__name__} and "
                        f"{type(handler).__name__}")
    HANDLERS[fn] = handler


def _register(names, modules=(torch, torch.Tensor, F, torch.special)):
    def deco(handler):
        for name in names:
            for mod in modules:
                fn = getattr(mod, name, None)
                if callable(fn) and not isinstance(fn, (torch.dtype, type)):
                    HANDLERS[fn] = handler
        return handler
    return deco


def _wrap(rows: torch.Tensor, layout: Layout) -> Jet:
    return Jet(rows, layout)


def layout_of(objs) -> Layout:
    """The one layout of the Jets among `objs` (JetUnsupported when they differ)."""
    layouts = {o.layout for o in objs if isinstance(o, Jet)}
    if len(layouts) != 1:
        raise JetUnsupported(f"Jets with different layouts meet in one op: {layouts}")
    return layouts.pop()


def _value(x):
    return x.rows[0] if isinstance(x, Jet) else x


def lift(c, layout: Layout, like: torch.Tensor) -> torch.Tensor:
    """A constant as rows: (c, 0, 0, ...), on the device of `like`."""
    c = torch.as_tensor(c, device=like.device)
    if not c.is_floating_point():
        c = c.to(like.dtype)
    return torch.cat([c[None], c.new_zeros((layout.rows - 1,) + tuple(c.shape))])


def dispatch(func, args, kwargs):
    handler = HANDLERS.get(func)
    if handler is not None:
        return handler(func, args, kwargs)
    name = getattr(func, "__name__", repr(func))
    if name == "__get__" or func in _VALUE_ONLY:
        return _value_only(func, args, kwargs)
    raise JetUnsupported(f"no jet rule ({func!r}); the fused path cannot run this score "
                         "network and falls back to the generic one", function=name)


# ---- fused kernels on or off ----------------------------------------------------------
_KERNELS: contextvars.ContextVar[bool] = contextvars.ContextVar("fpkern_jet_kernels",
                                                                default=True)


def kernels_enabled() -> bool:
    """Whether rules with a fused kernel (activations, group norm, the MLP) may use it."""
    return _KERNELS.get()


@contextlib.contextmanager
def composite_rules():
    """Use the composite torch rules in this block, not the fused kernels. The fused ops'
    backward is hand-written; differentiating it again (double backward, as the div-form
    residual's backward does under create_graph, fpkern.ops.fused_div) recomputes their
    torch reference, which costs more than running the composite rules in the first place."""
    token = _KERNELS.set(False)
    try:
        yield
    finally:
        _KERNELS.reset(token)


# ---- value-only functions: metadata and predicates ----------------------------------
_VALUE_ONLY = set()
for _name in ("dim", "size", "numel", "element_size", "is_floating_point", "is_complex",
              "is_contiguous", "isfinite", "isnan", "isinf", "eq", "ne", "lt", "le", "gt", "ge",
              "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "all", "any",
              "__bool__", "item", "tolist", "__len__", "__format__", "__repr__", "data_ptr",
              "get_device", "is_nonzero", "untyped_storage", "stride", "storage_offset",
              "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
              "detach"):   # detach: a constant, so derivatives stop there
    for _mod in (torch, torch.Tensor):
        _f = getattr(_mod, _name, None)
        if _f is not None:
            _VALUE_ONLY.add(_f)


def _value_only(func, args, kwargs):
    if not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args):
        return func(*(a.rows[0] if isinstance(a, Jet) else a for a in args))   # most calls
    flat, spec = tree_flatten((args, kwargs))
    flat = [_value(a) if isinstance(a, Jet) else a for a in flat]
    a, k = tree_unflatten(flat, spec)
    return func(*a, **k)


@_register(["min", "max", "amin", "amax"])
def _extremum(func, args, kwargs):
    if len(args) > 1 or kwargs:
        raise JetUnsupported(f"{func.__name__} over a dimension has no jet rule")
    return _value_only(func, args, kwargs)   # a whole-tensor extremum: used for checks only


# ---- linear maps --------------------------------------------------------------------
def _linear(func, args, kwargs):
    """Apply a map that is linear in its Jet arguments to every row (vmap over rows)."""
    flat, spec = tree_flatten((args, kwargs))
    pos = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    layout = layout_of([flat[i] for i in pos])

    def one(*rows):
        f2 = list(flat)
        for i, r in zip(pos, rows):
            f2[i] = r
        a, k = tree_unflatten(f2, spec)
        return func(*a, **k)

    out = torch.vmap(one)(*[flat[i].rows for i in pos])
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap(o, layout) for o in out)
    return _wrap(out, layout)


# Fast paths for the per-sample shape ops and reductions the networks use all the time:
# the row axis is one more leading axis, so shift the dims instead of vmapping.
def _shifted_dims(dim):
    if isinstance(dim, int):
        return dim + 1 if dim >= 0 else dim
    return tuple(d + 1 if d >= 0 else d for d in dim)


@_register(["reshape", "view"], modules=(torch, torch.Tensor))
def _reshape(func, args, kwargs):
    x, shape = args[0], args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if not kwargs and shape and isinstance(shape[0], int) and shape[0] == x.rows.shape[1]:
        return _wrap(x.rows.reshape((x.rows.shape[0],) + tuple(shape)), x.layout)
    return _linear(func, args, kwargs)


@_register(["sum", "mean"], modules=(torch, torch.Tensor))
def _reduce(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    extra = set(kwargs) - {"dim", "keepdim"}
    if dim is None or extra or len(args) > 3 or (not isinstance(dim, int) and 0 in dim) or dim == 0:
        return _linear(func, args, kwargs)
    return _wrap(func(x.rows, dim=_shifted_dims(dim), keepdim=keepdim), x.layout)


@_register(["__getitem__"], modules=(torch.Tensor,))
def _getitem(func, args, kwargs):
    x, idx = args
    idx = idx if isinstance(idx, tuple) else (idx,)
    if idx and (idx[0] == slice(None) or idx[0] is Ellipsis) and not any(
            isinstance(i, torch.Tensor) for i in idx):
        return _wrap(x.rows[(slice(None),) + idx], x.layout)
    return _linear(func, args, kwargs)


_register(["permute", "transpose", "flatten", "unflatten", "unsqueeze",
           "squeeze", "contiguous", "clone", "expand", "expand_as", "repeat",
           "narrow", "flip", "roll", "movedim", "swapaxes", "t", "diagonal", "trace", "cumsum",
           "tile", "squeeze_", "type", "real", "repeat_interleave"])(_linear)


@_register(["chunk", "split", "tensor_split", "unbind"], modules=(torch, torch.Tensor))
def _split(func, args, kwargs):
    """Splitting along a per-sample dim: the same split of the row stack, one axis further
    in (the adaptive norms' scale/shift chunks of a time embedding)."""
    x = args[0]
    name = func.__name__
    at = 1 if name == "unbind" else 2                    # where dim sits positionally
    dim = kwargs.get("dim", args[at] if len(args) > at else 0)
    if not isinstance(x, Jet) or not isinstance(dim, int) or set(kwargs) - {"dim"}:
        return _linear(func, args, kwargs)
    d = _shifted_dims(dim)
    parts = func(x.rows, *args[1:at], dim=d)
    return tuple(_wrap(p, x.layout) for p in parts)


# Per-sample layers on batched input [B, C, ...], linear in it for fixed options: every
# interpolation mode (nearest, nearest-exact, (bi/tri)linear, bicubic, area, antialiased)
# and every average pooling. The rows fold into the batch: one call over all rows.
_PER_SAMPLE = {"interpolate": 3, "upsample": 3, "upsample_nearest": 3, "upsample_bilinear": 3,
               "avg_pool1d": 3, "avg_pool2d": 4, "avg_pool3d": 5, "adaptive_avg_pool1d": 3,
               "adaptive_avg_pool2d": 4, "adaptive_avg_pool3d": 5, "pixel_shuffle": 4,
               "pixel_unshuffle": 4}


@_register(list(_PER_SAMPLE), modules=(torch, F))
def _per_sample(func, args, kwargs):
    x = args[0]
    flat, _ = tree_flatten((args[1:], kwargs))
    if (isinstance(x, Jet) and x.dim() == _PER_SAMPLE[func.__name__]
            and not any(isinstance(a, Jet) for a in flat)):
        return _wrap(_fold(func, x, *args[1:], **kwargs), x.layout)
    return _linear(func, args, kwargs)


@_register(["neg", "__neg__", "negative", "positive", "float", "double", "half", "bfloat16"],
           modules=(torch, torch.Tensor))
def _elementwise_linear(func, args, kwargs):
    """Linear maps acting on each element alike (negation, dtype casts): on the row stack
    in one call, no vmap (ScoreFn negates the network's output on every pass)."""
    if len(args) != 1 or kwargs:
        return _linear(func, args, kwargs)
    return _wrap(func(args[0].rows), args[0].layout)


# transposing properties: linear maps, not metadata (other properties stay value-only)
for _prop in ("T", "mT", "H", "mH"):
    HANDLERS[getattr(torch.Tensor, _prop).__get__] = _linear


@_register(["to", "type_as", "view_as", "reshape_as", "expand_as"])
def _like(func, args, kwargs):
    """Ops whose later arguments only lend a dtype, device or shape: those never carry rows."""
    flat, spec = tree_flatten((args[1:], kwargs))
    rest, kw = tree_unflatten([_value(a) if isinstance(a, Jet) else a for a in flat], spec)
    x = args[0]
    if not isinstance(x, Jet):
        return func(x, *rest, **kw)           # a constant converted like a Jet: still constant
    if func in (torch.Tensor.to, torch.Tensor.type_as) and "memory_format" not in kw:
        # a dtype or device conversion acts on each element alike: on the row stack at once
        # (ScoreFn converts t and sigma(t) on every pass; vmap would cost several times more)
        return _wrap(func(x.rows, *rest, **kw), x.layout)
    return _linear(func, (x,) + tuple(rest), kw)


@_register(["pad"])
def _pad(func, args, kwargs):
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    if mode == "constant" and value not in (None, 0, 0.0):
        raise JetUnsupported("F.pad with a non-zero constant has no jet rule")
    x, pad = args[0], kwargs.get("pad", args[1] if len(args) > 1 else ())
    if isinstance(x, Jet) and len(pad) // 2 < x.dim():
        # pads trailing per-sample dims only: the rows fold into the batch
        return _wrap(_fold(func, x, *args[1:], **kwargs), x.layout)
    return _linear(func, args, kwargs)


def _fold(func, x: Jet, *rest, **kwargs) -> torch.Tensor:
    """Per-sample op on all rows at once: rows [R, B, ...] folded into the batch."""
    R = x.layout.rows
    r = x.rows
    out = func(r.reshape((R * r.shape[1],) + tuple(r.shape[2:])), *rest, **kwargs)
    return out.reshape((R, r.shape[1]) + tuple(out.shape[1:]))


def _add_bias(rows: torch.Tensor, bias, view) -> torch.Tensor:
    """Bias on the value row only, in place: `rows` is a fresh layer output that no backward
    formula saves, so this avoids copying every row (torch.cat) and autograd stays exact."""
    if bias is None:
        return rows
    rows[0].add_(bias.reshape(view))
    return rows


def _pop(args, kwargs, index, name, default=None):
    if name in kwargs:
        return kwargs.pop(name), args
    if len(args) > index:
        return args[index], args[:index] + (None,) + args[index + 1:]
    return default, args


@_register(["conv2d", "conv1d", "conv_transpose2d", "conv_transpose1d"])
def _conv(func, args, kwargs):
    x, weight = args[0], args[1]
    if isinstance(weight, Jet) or not isinstance(x, Jet):
        raise JetUnsupported(f"{func.__name__} with a Jet weight has no jet rule")
    kwargs = dict(kwargs)
    bias, args = _pop(tuple(args), kwargs, 2, "bias")
    out = _fold(func, x, weight, *args[2:], **kwargs)
    spatial = out.dim() - 3
    return _wrap(_add_bias(out, bias, (-1,) + (1,) * spatial), x.layout)


@_register(["linear"])
def _linear_layer(func, args, kwargs):
    x, weight = args[0], args[1]
    if isinstance(weight, Jet) or not isinstance(x, Jet):
        raise JetUnsupported("linear with a Jet weight has no jet rule")
    kwargs = dict(kwargs)
    bias, _ = _pop(tuple(args), kwargs, 2, "bias")
    out = F.linear(x.rows, weight)
    return _wrap(_add_bias(out, bias, (-1,)), x.layout)


@_register(["dropout"])
def _dropout(func, args, kwargs):
    x = args[0]
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    if not training or p == 0:
        return x
    mask = torch.bernoulli(torch.full_like(x.rows[0], 1 - p)) / (1 - p)
    return _wrap(x.rows * mask, x.layout)   # one mask for all rows: the same network


# ---- additive constants and sums of Jets ------------------------------------------------
def _broadcast_rows(rows: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rows of a lower-rank operand, viewed so they broadcast against per-sample rank ndim."""
    return rows.reshape((rows.shape[0],) + (1,) * (ndim - rows.dim() + 1) + tuple(rows.shape[1:]))


def _sum_rows(a, b, sign: float):
    """a + sign * b where either may be a constant: constants join the value row only."""
    layout = layout_of([a, b])
    if isinstance(b, (int, float)) or isinstance(a, (int, float)):   # x + c: only row 0 moves
        x, c = (a, sign * b) if isinstance(a, Jet) else (b, a)
        r = x.rows if isinstance(a, Jet) else sign * x.rows
        shift = r.new_zeros((layout.rows,) + (1,) * (r.dim() - 1))
        shift[0] = c
        return _wrap(r + shift, layout)                    # one pass, no copy of each row
    if isinstance(a, Jet) and isinstance(b, Jet) and a.rows.shape == b.rows.shape:
        return _wrap(torch.add(a.rows, b.rows, alpha=sign), layout)     # the common case
    like = (a if isinstance(a, Jet) else b).rows
    A = a.rows if isinstance(a, Jet) else lift(a, layout, like)
    B = b.rows if isinstance(b, Jet) else lift(b, layout, like)
    nd = max(A.dim(), B.dim()) - 1
    return _wrap(_broadcast_rows(A, nd) + sign * _broadcast_rows(B, nd), layout)


@_register(["add", "__add__", "__iadd__"])
def _add(func, args, kwargs):
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    return _sum_rows(a, b if alpha == 1 else b * alpha, 1.0)


@_register(["__radd__"])
def _radd(func, args, kwargs):
    return _sum_rows(args[1], args[0], 1.0)


@_register(["sub", "__sub__", "subtract", "__isub__"])
def _sub(func, args, kwargs):
    return _sum_rows(args[0], args[1], -1.0)


@_register(["__rsub__", "rsub"])
def _rsub(func, args, kwargs):
    return _sum_rows(args[1], args[0], -1.0)


@_register(["cat", "concat", "concatenate", "stack"])
def _cat(func, args, kwargs):
    seq = args[0]
    layout = layout_of(seq)
    like = next(a for a in seq if isinstance(a, Jet)).rows
    lifted = [a if isinstance(a, Jet) else _wrap(lift(a, layout, like), layout) for a in seq]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if isinstance(dim, int) and len(args) <= 2 and set(kwargs) <= {"dim"}:
        # the row axis leads: the same op on the row stacks, one axis further in
        rows = func([a.rows for a in lifted], dim=_shifted_dims(dim))
        return _wrap(rows, layout)
    return _linear(func, (lifted,) + tuple(args[1:]), kwargs)


# ---- elementwise nonlinearities ----------------------------------------------------------
def _elementwise(x: Jet, phi, d1, d2) -> Jet:
    """phi applied to a Jet, given phi(x0), phi'(x0) and phi''(x0)."""
    return _wrap(elementwise_rows(x.rows, x.layout, phi, d1, d2), x.layout)


def _act_after_group_norm(x: Jet, act: str):
    """act(GroupNorm(...)) as one node that saves the GroupNorm's input only
    (fpkern.jet.fused.group_norm_act), when x is the fused GroupNorm rule's output; else
    None."""
    src = x._source
    if src is None or src[0] != "group_norm" or not kernels_enabled():
        return None
    from fpkern.jet.fused.group_norm_act import group_norm_act
    _, rows, w, b, groups, eps, spec, mean, var = src
    return group_norm_act(rows, w, b, groups, eps, spec, act, x.rows, mean, var)


def _unary(derivs, fused: str | None = None):
    def handler(func, args, kwargs):
        x = args[0]
        if fused is not None and not kwargs.get("inplace", False):
            rows = _act_after_group_norm(x, fused)
            if rows is None:
                rows = _fused_act(x, fused)
            if rows is not None:
                return _wrap(rows, x.layout)
        phi, d1, d2 = derivs(x.rows[0], *args[1:], **kwargs)
        return _elementwise(x, phi, d1, d2)
    return handler


def _native_backend(rows: torch.Tensor) -> bool:
    """Whether a fused op on `rows` runs a kernel (C++ on CPU, Triton on CUDA): with only
    the torch backend, its reference is no faster than the composite rules."""
    return backend.select(rows) != "torch"


def _fused_act(x: Jet, act: str):
    """The rule as one fused kernel (fpkern.jet.fused.jet_act) where a native backend runs it;
    None elsewhere or where kernels are switched off (composite_rules)."""
    from fpkern.jet.fused.jet_act import jet_act
    spec = x.layout.kernel_spec
    if (spec is None or len(x.rows.shape) < 2 or not kernels_enabled()
            or not _native_backend(x.rows)):
        return None
    return jet_act(x.rows, act, spec)


def _silu(x, *a, **k):
    s = torch.sigmoid(x)
    return x * s, s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


def _sigmoid(x, *a, **k):
    s = torch.sigmoid(x)
    return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)


def _tanh(x, *a, **k):
    y = torch.tanh(x)
    return y, 1 - y * y, -2 * y * (1 - y * y)


def _exp(x, *a, **k):
    y = torch.exp(x)
    return y, y, y


def _expm1(x, *a, **k):
    y = torch.exp(x)
    return torch.expm1(x), y, y


def _log(x, *a, **k):
    return torch.log(x), 1 / x, -1 / (x * x)


def _log1p(x, *a, **k):
    return torch.log1p(x), 1 / (1 + x), -1 / (1 + x) ** 2


def _sin(x, *a, **k):
    s, c = torch.sin(x), torch.cos(x)
    return s, c, -s


def _cos(x, *a, **k):
    s, c = torch.sin(x), torch.cos(x)
    return c, -s, -c


def _sqrt(x, *a, **k):
    y = torch.sqrt(x)
    return y, 0.5 / y, -0.25 / (y * x)


def _rsqrt(x, *a, **k):
    y = torch.rsqrt(x)
    return y, -0.5 * y / x, 0.75 * y / (x * x)


def _reciprocal(x, *a, **k):
    y = 1 / x
    return y, -y * y, 2 * y * y * y


def _relu(x, *a, **k):
    return torch.relu(x), (x > 0).to(x.dtype), torch.zeros_like(x)


def _leaky_relu(x, negative_slope=0.01, *a, **k):
    slope = k.get("negative_slope", negative_slope)
    pos = x > 0
    return (F.leaky_relu(x, slope), torch.where(pos, torch.ones_like(x), torch.full_like(x, slope)),
            torch.zeros_like(x))


def _elu(x, alpha=1.0, *a, **k):
    alpha = k.get("alpha", alpha)
    pos = x > 0
    e = alpha * torch.exp(torch.clamp(x, max=0))
    return F.elu(x, alpha), torch.where(pos, torch.ones_like(x), e), torch.where(pos, 0.0 * x, e)


def _softplus(x, beta=1.0, threshold=20.0, *a, **k):
    if k.get("beta", beta) != 1:
        raise JetUnsupported("softplus with beta != 1 has no jet rule")
    s = torch.sigmoid(x)
    return F.softplus(x), s, s * (1 - s)


_GELU_K, _GELU_C = math.sqrt(2 / math.pi), 0.044715


def _gelu_tanh(x):
    """gelu(x, approximate="tanh") = x/2 (1 + tanh u), u = k (x + c x^3), k = sqrt(2/pi):
    y' = (1 + T)/2 + x/2 (1 - T^2) u', y'' = (1 - T^2) (u' + x/2 (u'' - 2 T u'^2))."""
    u1 = _GELU_K * (1 + 3 * _GELU_C * x * x)
    u2 = _GELU_K * 6 * _GELU_C * x
    T = torch.tanh(_GELU_K * (x + _GELU_C * x * x * x))
    sech2 = 1 - T * T
    return (F.gelu(x, approximate="tanh"), 0.5 * (1 + T) + 0.5 * x * sech2 * u1,
            sech2 * (u1 + 0.5 * x * (u2 - 2 * T * u1 * u1)))


def _gelu(x, *a, **k):
    approximate = k.get("approximate", a[0] if a else "none")
    if approximate == "tanh":
        return _gelu_tanh(x)
    if approximate != "none":
        raise JetUnsupported(f"approximate must be 'none' or 'tanh', got {approximate!r}",
                             function=f"gelu(approximate={approximate!r})")
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return x * cdf, cdf + x * pdf, pdf * (2 - x * x)


def _square(x, *a, **k):
    return x * x, 2 * x, 2 * torch.ones_like(x)


for _names, _fn in [(["silu"], _silu), (["sigmoid", "expit"], _sigmoid), (["tanh"], _tanh),
                    (["exp"], _exp), (["expm1"], _expm1), (["log"], _log), (["log1p"], _log1p),
                    (["sin"], _sin), (["cos"], _cos), (["sqrt"], _sqrt), (["rsqrt"], _rsqrt),
                    (["reciprocal"], _reciprocal), (["relu"], _relu),
                    (["leaky_relu"], _leaky_relu), (["elu"], _elu), (["softplus"], _softplus),
                    (["gelu"], _gelu), (["square"], _square)]:
    _register(_names)(_unary(_fn, _names[0] if _names[0] in ("silu", "sigmoid", "tanh") else None))


@_register(["pow", "__pow__", "float_power"])
def _pow(func, args, kwargs):
    x, p = args[0], args[1]
    if not isinstance(x, Jet) or isinstance(p, torch.Tensor):
        raise JetUnsupported("pow with a tensor exponent has no jet rule")
    v = x.rows[0]
    if p == 2:
        return _mul(None, (x, x), {})
    return _elementwise(x, v ** p, p * v ** (p - 1), p * (p - 1) * v ** (p - 2))


@_register(["__rpow__"])
def _rpow(func, args, kwargs):
    x, base = args[0], args[1]
    return torch.exp(x * math.log(base))


# ---- products --------------------------------------------------------------------------
def _bilinear(op, p, q, layout: Layout) -> torch.Tensor:
    """Rows of op(p, q) for op bilinear, p and q Jets (Leibniz rule to second order)."""
    P, Q = p.rows, q.rows
    v = op(P[0], Q[0])
    first = [op(P[i], Q[0]) + op(P[0], Q[i]) for i in range(1, 1 + layout.n1)]
    second = []
    for j, (a, b) in enumerate(layout.pairs):
        r = layout.pair_row(j)
        second.append(op(P[r], Q[0]) + op(P[0], Q[r]) + op(P[a], Q[b]) + op(P[b], Q[a]))
    if layout.collapse:
        r = layout.collapsed_row
        cross = torch.stack([op(P[k], Q[k]) for k in layout.collapse]).mean(0)
        second.append(op(P[r], Q[0]) + op(P[0], Q[r]) + 2 * cross)
    return torch.stack([v] + first + second)


def _bilinear_rows(eqs, P: torch.Tensor, Q: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The Leibniz rule of _bilinear for an einsum, in a few einsums over row stacks instead
    of one per term: eqs = the einsum with a row axis on q only, on p only, on both
    (_einsum_with_rows). Operands are views of the rows wherever the layout allows (pairs
    sharing one row, contiguous collapsed rows): the einsums save them for the backward."""
    on_q, on_p, on_both = eqs
    p0_q = torch.einsum(on_q, P[0], Q)                  # op(P0, Q_r), every row r
    p_q0 = torch.einsum(on_p, P[1:], Q[0])              # op(P_r, Q0), r >= 1
    rows = torch.cat([p0_q[:1], p0_q[1:] + p_q0])
    if not (layout.pairs or layout.collapse):
        return rows
    parts = []
    if layout.pairs:                                    # op(P_a, Q_b) + op(P_b, Q_a)
        a = [i for i, _ in layout.pairs]
        b = [j for _, j in layout.pairs]
        if len(set(b)) == 1 and a == list(range(a[0], a[0] + len(a))):
            sa, u = slice(a[0], a[0] + len(a)), b[0]    # pairs (a.., u): the projected rows
            parts.append(torch.einsum(on_p, P[sa], Q[u]) + torch.einsum(on_q, P[u], Q[sa]))
        else:
            cross = torch.einsum(on_both, P[a + b], Q[b + a])
            parts.append(cross[:len(a)] + cross[len(a):])
    if layout.collapse:                                 # 2 mean_k op(P_k, Q_k)
        k = layout.collapse_index
        parts.append(2 * torch.einsum(on_both, P[k], Q[k]).mean(0, keepdim=True))
    second = rows[layout.second] + (parts[0] if len(parts) == 1 else torch.cat(parts))
    return torch.cat([rows[:layout.second.start], second])


def _mul_rows(P, Q, layout: Layout):
    """Elementwise product of row stacks (Leibniz rule), vectorised over the rows."""
    nd = max(P.dim(), Q.dim()) - 1
    P, Q = _broadcast_rows(P, nd), _broadcast_rows(Q, nd)
    p0, q0 = P[:1], Q[:1]
    first = P[layout.first] * q0 + p0 * Q[layout.first]
    if not (layout.pairs or layout.collapse):
        return torch.cat([p0 * q0, first])
    S = layout.second
    second = P[S] * q0 + p0 * Q[S] + cross_rows(layout, P, Q) + cross_rows(layout, Q, P)
    return torch.cat([p0 * q0, first, second])


@_register(["mul", "__mul__", "multiply", "__rmul__", "__imul__"])
def _mul(func, args, kwargs):
    a, b = args[0], args[1]
    if isinstance(a, Jet) and isinstance(b, Jet):
        layout = layout_of([a, b])
        return _wrap(_mul_rows(a.rows, b.rows, layout), layout)
    x, c = (a, b) if isinstance(a, Jet) else (b, a)
    return _wrap(x.rows * c, x.layout)       # scaling by a constant: linear


@_register(["div", "__truediv__", "true_divide", "divide", "__itruediv__"])
def _div(func, args, kwargs):
    a, b = args[0], args[1]
    if kwargs.get("rounding_mode") is not None:
        raise JetUnsupported("rounding division has no jet rule")
    if isinstance(b, Jet):
        return a * torch.reciprocal(b)
    return _wrap(a.rows / b, a.layout)


@_register(["__rtruediv__", "__rdiv__"])
def _rdiv(func, args, kwargs):
    x, c = args[0], args[1]
    return c * torch.reciprocal(x)


def _two_operand(fn):
    """The rule of a bilinear fn(a, b) (matmul and kin): Leibniz when both are Jets, else
    linear in the one Jet."""
    def handler(f, args, kwargs):
        a, b = args[0], args[1]
        if isinstance(a, Jet) and isinstance(b, Jet):
            layout = layout_of([a, b])
            return _wrap(_bilinear(fn, a, b, layout), layout)
        return _linear(f, args, kwargs)
    return handler


for _name in ("matmul", "bmm", "mm", "outer"):
    _register([_name, f"__{_name}__"])(_two_operand(getattr(torch, _name)))


def _einsum_with_rows(eq: str, is_jet: list[bool]) -> str | None:
    """eq with the row axis as a new leading letter on the Jet operand and the output, or
    None where that is not simple (no explicit output, or an ellipsis)."""
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    terms = ins.split(",")
    if len(terms) != len(is_jet):
        return None
    free = next((c for c in string.ascii_letters if c not in eq), None)
    if free is None:
        return None
    terms = [free + term if jet else term for term, jet in zip(terms, is_jet)]
    return ",".join(terms) + "->" + free + out


@_register(["einsum"])
def _einsum(func, args, kwargs):
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    jets = [o for o in ops if isinstance(o, Jet)]
    if len(jets) == 1 and not kwargs:
        row_eq = _einsum_with_rows(eq, [isinstance(o, Jet) for o in ops])
        if row_eq is not None:     # one einsum over all rows: a free letter for the row axis
            rows = torch.einsum(row_eq, *[o.rows if isinstance(o, Jet) else o for o in ops])
            return _wrap(rows, jets[0].layout)
    if len(jets) <= 1:
        return _linear(torch.einsum, (eq,) + tuple(ops), kwargs)
    if len(ops) != 2:
        raise JetUnsupported("einsum of more than two operands with several Jets has no jet rule")
    layout = layout_of(jets)
    batched = [_einsum_with_rows(eq, flags) for flags in ([False, True], [True, False],
                                                           [True, True])]
    if None in batched:
        return _wrap(_bilinear(lambda p, q: torch.einsum(eq, p, q), ops[0], ops[1], layout),
                     layout)
    return _wrap(_bilinear_rows(batched, ops[0].rows, ops[1].rows, layout), layout)


# ---- composite layers --------------------------------------------------------------------
@_register(["var_mean"])
def _var_mean(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    unbiased = kwargs.get("unbiased", kwargs.get("correction", 1))
    keepdim = kwargs.get("keepdim", False)
    mean = x.mean(dim=dim, keepdim=True)
    c = x - mean
    n = c[0].numel() if dim is None else math.prod(
        c.shape[d] for d in ((dim,) if isinstance(dim, int) else dim))
    var = (c * c).mean(dim=dim, keepdim=keepdim)
    if unbiased:
        var = var * (n / (n - 1))
    if not keepdim:
        mean = mean.squeeze(dim) if dim is not None else mean.reshape(())
    return var, mean


def _arg(args, kwargs, index, name, default=None):
    return kwargs.get(name, args[index] if len(args) > index else default)


def _affine(y, weight, bias):
    """y * weight + bias, either of them a constant, a Jet or None."""
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


@_register(["layer_norm"], modules=(torch, F))
def _layer_norm(func, args, kwargs):
    """LayerNorm over the trailing `normalized_shape` dims, composed from the rules above:
    (x - mean) (var + eps)^(-1/2) (biased variance), then weight and bias, which may be
    Jets too (adaptive norms pass theirs as products instead: DiT's norm(x) (1 + scale))."""
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    if not isinstance(x, Jet):                # a constant input, a Jet weight or bias
        return _affine(F.layer_norm(x, shape, eps=eps), weight, bias)
    n = 1 if isinstance(shape, int) else len(shape)
    dims = tuple(range(-n, 0))
    c = x - x.mean(dim=dims, keepdim=True)
    y = c * torch.rsqrt((c * c).mean(dim=dims, keepdim=True) + eps)
    return _affine(y, weight, bias)


@_register(["rms_norm"], modules=(torch, F))
def _rms_norm(func, args, kwargs):
    """RMSNorm: x (mean x^2 + eps)^(-1/2) over the trailing `normalized_shape` dims, eps
    defaulting to the dtype's machine epsilon as in torch, times weight."""
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    weight, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "eps")
    if not isinstance(x, Jet):
        return _affine(F.rms_norm(x, shape, eps=eps), weight, None)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    n = 1 if isinstance(shape, int) else len(shape)
    y = x * torch.rsqrt((x * x).mean(dim=tuple(range(-n, 0)), keepdim=True) + eps)
    return _affine(y, weight, None)


@_register(["group_norm"])
def _group_norm(func, args, kwargs):
    x = args[0]
    groups = kwargs.get("num_groups", args[1] if len(args) > 1 else None)
    weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
    bias = kwargs.get("bias", args[3] if len(args) > 3 else None)
    eps = kwargs.get("eps", args[4] if len(args) > 4 else 1e-5)
    spec = x.layout.kernel_spec
    if (spec is not None and x.rows.dtype in (torch.float32, torch.float64) and x.dim() >= 2
            and not isinstance(weight, Jet) and not isinstance(bias, Jet)
            and kernels_enabled() and _native_backend(x.rows)):
        # the fused rule (one op, hand-written backward); imported on first use, which keeps
        # `import fpkern.jet` from registering the fused ops
        from fpkern.jet.fused.eager import tracing
        from fpkern.jet.fused.group_norm_jet import group_norm_jet_stats
        y, w, b, mean, var = group_norm_jet_stats(x.rows, groups, weight, bias, eps, spec)
        out = _wrap(y, x.layout)
        if not tracing(x.rows):     # an activation next fuses with it (_act_after_group_norm)
            out._source = ("group_norm", x.rows, w, b, int(groups), float(eps), spec, mean, var)
        return out
    shape = x.shape
    xg = x.reshape(shape[0], groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    c = xg - mean
    var = (c * c).mean(dim=-1, keepdim=True)
    y = (c * torch.rsqrt(var + eps)).reshape(shape)
    view = (1, -1) + (1,) * (len(shape) - 2)
    if weight is not None:
        y = y * weight.reshape(view)
    if bias is not None:
        y = y + bias.reshape(view)
    return y


@_register(["softmax"])
def _softmax(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise JetUnsupported("softmax without dim has no jet rule", function="softmax")
    dtype = kwargs.get("dtype")            # F.softmax's third positional is _stacklevel
    if dtype is None and len(args) > 2 and isinstance(args[-1], torch.dtype):
        dtype = args[-1]
    rows = x.rows if dtype is None else x.rows.to(dtype)
    return _wrap(softmax_rows(rows, x.layout, dim), x.layout)


def softmax_rows(X: torch.Tensor, L: Layout, dim: int, y: torch.Tensor | None = None):
    """Rows of y = softmax(x) along per-sample `dim` from the rows X of x:
    y_i = y (x_i - <y, x_i>), and to second order
    y_ab = y (x_ab - <y, x_ab>) + y_b (x_a - <y, x_a>) - y <y_b, x_a>.
    `y`: the value row when the caller computes it (attention: fully masked rows are 0)."""
    d = dim if dim < 0 else dim + 1                      # the same axis in the row stack
    if y is None:
        y = torch.softmax(X[0], dim=dim)

    def centred(r):                                      # r - <y, r> along dim
        return r - (y * r).sum(dim=d if r.dim() == X.dim() else dim, keepdim=True)

    first = y * centred(X[L.first])
    out = [y[None], first]
    if L.pairs or L.collapse:
        def cross(a, b):                                 # y_b (x_a - <y, x_a>) - y <y_b, x_a>
            ya = first[b - 1]
            return ya * centred(X[a]) - y * (ya * X[a]).sum(dim=dim, keepdim=True)

        second = y * centred(X[L.second])
        corr = [cross(a, b) for a, b in L.pairs]
        if L.collapse:
            corr.append(torch.stack([cross(k, k) for k in L.collapse]).mean(0))
        out.append(second + torch.stack(corr))
    return torch.cat(out)



@_register(["logsumexp"], modules=(torch, torch.Tensor, torch.special))
def _logsumexp(func, args, kwargs):
    """y = log sum_i exp(x_i) along per-sample dims, p = softmax(x) along them:
    y_a = <p, x_a> and y_ab = <p, x_ab> + <p, x_a x_b> - <p, x_a> <p, x_b> (the log-density
    of a mixture, an energy network's free energy)."""
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if dim is None or set(kwargs) - {"dim", "keepdim"} or len(args) > 3:
        raise JetUnsupported("logsumexp needs dim (and at most keepdim)", function="logsumexp")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or any(d == 0 or d < -(x.dim() - 1) for d in dims):
        raise JetUnsupported("logsumexp over the batch dim has no jet rule", function="logsumexp")
    X, L = x.rows, x.layout
    rd = _shifted_dims(dims)                             # the same dims in the row stack
    y = torch.logsumexp(X[0], dim=dims, keepdim=True)
    p = torch.exp(X[0] - y)

    def mean(r):                                         # <p, r> over dims, kept
        return (p * r).sum(dim=rd if r.dim() == X.dim() else dims, keepdim=True)

    first = mean(X[L.first])
    out = [y[None], first]
    if L.pairs or L.collapse:
        def cross(a, b):                                 # <p, x_a x_b> - <p, x_a> <p, x_b>
            return mean(X[a] * X[b]) - first[a - 1] * first[b - 1]

        corr = [cross(a, b) for a, b in L.pairs]
        if L.collapse:
            corr.append(torch.stack([cross(k, k) for k in L.collapse]).mean(0))
        out.append(mean(X[L.second]) + torch.stack(corr))
    rows = torch.cat(out)
    return _wrap(rows if keepdim else rows.squeeze(rd), L)

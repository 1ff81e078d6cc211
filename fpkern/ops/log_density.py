"""The log-density FPE: the scalar residual of a log-density or energy network (docs/MATH.md 13).

For u(x, t) = log q_t(x) under the linear SDE dX = f(t) X dt + g(t) dW in D dimensions,

    R(x, t) = d_t u - 1/2 g^2 (Lap u + |grad u|^2) + f <x, grad u> + D f,

which is the Fokker-Planck equation divided by q_t: R = 0 for the true log-density. The
score-FPE residual (div form, docs/MATH.md 2) of the model's score s = grad_x u is
grad_x R, so the scalar equation holds exactly when the vector one does and R is a
function of t alone (zero, since q_t integrates to one).

    log_density_fpe(log_density, x, t, sde, *, method="fused", probes=1, ...) -> LogDensityFPE

`log_density`: a callable (x, t) -> [B] returning log q_t(x), or an EnergyScore adapter
(fpkern.models.EnergyScore, its ``log_density``: -E for an energy network).

Estimators (probes v with E[v v^T] = I): Lap u = E[v^T H v] and |grad u|^2 = E[(v . grad u)^2],
so with K probes

    R_hat = w - 1/2 g^2 mean_k (v_k^T H v_k + (v_k . grad u)^2) + D f,
    w = d_t u + f <x, grad u>  (the derivative of u along the (x, t)-tangent (f x, 1)),

is unbiased for R, and the product R_1 R_2 of two estimates from independent probe sets is
unbiased for R^2 (the square of one estimate is not: it adds its variance).

methods (the same R_1, R_2 from the same probes for "fused" and "naive"):
  "fused"  one forward jet pass (fpkern.jet) with rows u, the 2K probes' first order,
           the transport row w, and second order: set 1 collapsed into one row, set 2 as
           K diagonal pairs (v_k, v_k). A network with a torch function lacking a jet rule
           runs "naive" instead (logged once), or raises JetUnsupported under strict=True;
  "naive"  reverse-mode autograd: grad u and d_t u in one backward, then one double
           backward per probe for v_k^T H v_k (the way a log-density residual is usually
           written, Deveney et al. 2023);
  "exact"  grad u by autograd and the exact Laplacian, one double backward per dimension
           (small D; a reference): R_1 = R_2 = R.
Results are differentiable with respect to the network's parameters when the caller
records a graph, plain tensors under torch.no_grad or inference_mode.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from fpkern._checks import check_choice
from fpkern.jet import JetUnsupported, Layout
from fpkern.ops._common import (_score_dtype_ok, bcast, check_inputs, check_precision,
                                outside_inference_mode, precision_scope, reverse_mode,
                                sde_coefficients)
from fpkern.ops.jet_pass import jet_pass
from fpkern.ops.probes import resolve_probes

__all__ = ["LogDensityFPE", "log_density_fpe", "LOG_DENSITY_METHODS"]

log = logging.getLogger(__name__)
_warned: set[str] = set()

LOG_DENSITY_METHODS = ("fused", "naive", "exact")


class LogDensityFPE(NamedTuple):
    """The log-density FPE terms per sample, each [B]."""

    residual: torch.Tensor   # (R_1 + R_2) / 2, an unbiased estimate of R (exact: R)
    square: torch.Tensor     # R_1 R_2, an unbiased estimate of R^2 (exact: R^2)
    value: torch.Tensor      # u = log q_t(x)


class _CheckedLogDensity:
    """log_density with what it returns checked: one value per sample, x's dtype."""

    def __init__(self, fn):
        self.fn = getattr(fn, "log_density", fn)
        self.name = type(fn).__name__

    def __call__(self, x, t):
        u = self.fn(x, t)
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"log_density(x, t) must return a torch.Tensor, got "
                            f"{type(u).__name__}")
        B = x.shape[0]
        if u.shape != (B,):
            hint = ("; a column [B, 1] holds the right values: return out.squeeze(-1)"
                    if u.shape == (B, 1) else "")
            raise ValueError(f"log_density(x, t) ({self.name}) returned shape {tuple(u.shape)} "
                             f"for a batch of {B}; it must return one value per sample, shape "
                             f"[B]{hint}")
        if not _score_dtype_ok(u, x):
            raise ValueError(f"log_density(x, t) ({self.name}) is {u.dtype} for x of {x.dtype}; "
                             f"it must have x's dtype")
        return u


def _probe_sets(probes, x, probe_dist, generator) -> torch.Tensor:
    """2K probes [2K, *x.shape]: K drawn per set for an int K, or the given ones (an even
    number, the first half set 1)."""
    if isinstance(probes, torch.Tensor):
        V = resolve_probes(probes, x, probe_dist, generator)
        if V.shape[0] % 2:
            raise ValueError(f"log_density_fpe needs an even number of probes (two independent "
                             f"sets of K, the first half and the second), got {V.shape[0]}")
        return V
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise TypeError(f"probes must be a positive int (K per set) or a tensor [2K, *x.shape], "
                        f"got {probes!r}")
    return resolve_probes(2 * probes, x, probe_dist, generator)


def _combine(w, d, h1, h2, f, g2, D):
    """(R_1, R_2) from the transport derivative w, the first-order rows d [2K, B] and the
    probe-averaged second orders h1, h2 of the two sets [B]."""
    K = d.shape[0] // 2
    r1 = w - 0.5 * g2 * (h1 + d[:K].square().mean(0)) + D * f
    r2 = w - 0.5 * g2 * (h2 + d[K:].square().mean(0)) + D * f
    return r1, r2


def _fused(u_fn, x, t, sde, V):
    """One jet pass (module docstring)."""
    K2 = V.shape[0]
    K = K2 // 2
    f, g2 = sde_coefficients(sde, t, x)
    tangents = torch.cat([V, (bcast(f, x) * x)[None]])
    t_tan = torch.zeros((K2 + 1,) + tuple(t.shape), dtype=t.dtype, device=t.device)
    t_tan[K2] = 1
    layout = Layout(n1=K2 + 1, pairs=tuple((k, k) for k in range(K + 1, K2 + 1)),
                    collapse=tuple(range(1, K + 1)))
    rows = jet_pass(u_fn, x, t, tangents, time=False, layout=layout, t_tangents=t_tan)
    d, w = rows[1:K2 + 1], rows[K2 + 1]
    h2, h1 = rows[K2 + 2:K2 + 2 + K].mean(0), rows[-1]
    return rows[0], *_combine(w, d, h1, h2, f, g2, x[0].numel())


def _grads(u_fn, x, t):
    """(xg, u, grad_x u, d_t u) by one backward with create_graph, from leaves xg, tg."""
    xg = x.detach().requires_grad_(True)
    tg = t.detach().requires_grad_(True)
    u = u_fn(xg, tg)
    gx, gt = torch.autograd.grad(u.sum(), (xg, tg), create_graph=True, allow_unused=True)
    gx = torch.zeros_like(xg) if gx is None else gx
    gt = torch.zeros_like(tg) if gt is None else gt
    return xg, u, gx, gt


def _hvp_quad(gx, xg, v):
    """v^T H v per sample from grad u (a double backward)."""
    (hv,) = torch.autograd.grad(gx, xg, v, create_graph=True, allow_unused=True)
    return xg.new_zeros(xg.shape[0]) if hv is None else (hv * v).flatten(1).sum(1)


def _naive(u_fn, x, t, sde, V):
    K = V.shape[0] // 2
    f, g2 = sde_coefficients(sde, t, x)
    xg, u, gx, gt = _grads(u_fn, x, t)
    w = gt + f * (x * gx).flatten(1).sum(1)
    d = torch.stack([(v * gx).flatten(1).sum(1) for v in V])
    h = torch.stack([_hvp_quad(gx, xg, v) for v in V])
    return u, *_combine(w, d, h[:K].mean(0), h[K:].mean(0), f, g2, x[0].numel())


def _exact(u_fn, x, t, sde, V=None):
    f, g2 = sde_coefficients(sde, t, x)
    xg, u, gx, gt = _grads(u_fn, x, t)
    flat = gx.flatten(1)
    D = flat.shape[1]
    lap = xg.new_zeros(x.shape[0])
    for i in range(D):
        (col,) = torch.autograd.grad(flat[:, i].sum(), xg, create_graph=True, allow_unused=True)
        if col is not None:
            lap = lap + col.flatten(1)[:, i]
    r = (gt + f * (x * gx).flatten(1).sum(1) - 0.5 * g2 * (lap + flat.square().sum(1))
         + D * f)
    return u, r, r


def _with_jets(u_fn, x, t, sde, V, strict):
    if strict:
        return _fused(u_fn, x, t, sde, V)
    try:
        return _fused(u_fn, x, t, sde, V)
    except JetUnsupported as exc:
        if u_fn.name not in _warned:
            _warned.add(u_fn.name)
            log.warning("log_density_fpe fused: %s; using method 'naive' (reverse mode, "
                        "slower)", exc)
        return _naive(u_fn, x, t, sde, V)


@outside_inference_mode
def log_density_fpe(log_density, x: torch.Tensor, t: torch.Tensor, sde, *,
                    method: str = "fused", probes=1, probe_dist: str = "rademacher",
                    generator: torch.Generator | None = None,
                    strict: bool = False) -> LogDensityFPE:
    """The log-density FPE residual R of `log_density` at (x, t) under `sde`, per sample
    (module docstring): its unbiased estimate, the unbiased estimate R_1 R_2 of R^2, and u.

    `probes`: K per set (2K drawn from `probe_dist` with `generator`), or a tensor
    [2K, *x.shape] (the first K set 1); ignored by method "exact". `strict` (method
    "fused"): raise JetUnsupported, naming the function and module, instead of falling back.
    """
    check_choice("method", method, LOG_DENSITY_METHODS)
    if strict and method != "fused":
        raise ValueError(f"strict=True applies to method 'fused' (it refuses the fallback), "
                         f"got method {method!r}")
    if not callable(log_density):
        raise TypeError(f"log_density must be callable as log_density(x, t) -> [B], got "
                        f"{type(log_density).__name__}")
    check_inputs(log_density, x, t, sde)
    check_precision(x, t)
    u_fn = _CheckedLogDensity(log_density)
    V = None if method == "exact" else _probe_sets(probes, x, probe_dist, generator)
    with precision_scope(x):
        if method == "fused":
            grad = torch.is_grad_enabled()
            with torch.enable_grad():
                u, r1, r2 = _with_jets(u_fn, x, t, sde, V, strict)
            out = LogDensityFPE(0.5 * (r1 + r2), r1 * r2, u)
            return out if grad else LogDensityFPE(*(v.detach() for v in out))
        run = _naive if method == "naive" else _exact
        u, r1, r2 = reverse_mode(lambda: run(u_fn, x, t, sde, V))
        return LogDensityFPE(0.5 * (r1 + r2), r1 * r2, u)

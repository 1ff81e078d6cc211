"""The public residual ops: fpe_residual, hutchinson_divergence and laplacian.

    fpe_residual(score_fn, x, t, sde, *, form="div", method="exact", probes=1,
                 probe_dist="rademacher", generator=None)            -> shape of x
    hutchinson_divergence(score_fn, x, t, *, probes=1, ...)          -> [B]
    laplacian(score_fn, x, t, *, probes=1, ...)                      -> shape of x

form "div" is the paper's residual r, "laplacian" the conservative form r_c (MATH.md 2).
method "exact" uses full Jacobians (probes ignored; small D only), "naive" the paper's
algorithm (MATH.md 5), "fused" exact directional derivatives along the probes (the
probe-conditional value of MATH.md 3, d_t s exact). With given probes [K, *x.shape] the
estimators are deterministic. Results are differentiable with respect to the parameters of
score_fn; the caller's tensors are never modified.
"""

from __future__ import annotations

import torch

from fpkern.ops import exact, forward_mode, naive
from fpkern.ops._common import check_inputs
from fpkern.ops.combine import hutchinson_reduce
from fpkern.ops.probes import resolve_probes

__all__ = ["FORMS", "METHODS", "fpe_residual", "hutchinson_divergence", "laplacian"]

FORMS = ("div", "laplacian")


def _exact(score_fn, x, t, sde, form, probes):
    return exact.residual(score_fn, x, t, sde, form)


def _naive(score_fn, x, t, sde, form, probes):
    with torch.enable_grad():
        return naive.residual(score_fn, x, t, sde, form, probes)


def _fused(score_fn, x, t, sde, form, probes):
    with torch.enable_grad():
        return forward_mode.residual(score_fn, x, t, sde, form, probes)


METHODS = {"exact": _exact, "naive": _naive, "fused": _fused}


def fpe_residual(score_fn, x: torch.Tensor, t: torch.Tensor, sde, *, form: str = "div",
                 method: str = "exact", probes=1, probe_dist: str = "rademacher",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Score-FPE residual of score_fn at (x, t) under `sde`, with x's shape (MATH.md 2)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid names: {list(FORMS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid names: {sorted(METHODS)}")
    check_inputs(score_fn, x, t, sde)
    V = None if method == "exact" else resolve_probes(probes, x, probe_dist, generator)
    if method == "exact":
        resolve_probes(probes, x, probe_dist)  # still validated, then ignored
    return METHODS[method](score_fn, x, t, sde, form, V)


def hutchinson_divergence(score_fn, x: torch.Tensor, t: torch.Tensor, *, probes=1,
                          probe_dist: str = "rademacher",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """1/K sum_k v_k . (J v_k) per sample, shape [B] (MATH.md 3)."""
    check_inputs(score_fn, x, t)
    V = resolve_probes(probes, x, probe_dist, generator)
    _, jv = forward_mode.directional(score_fn, x, t, V)
    return hutchinson_reduce(V, jv)


def laplacian(score_fn, x: torch.Tensor, t: torch.Tensor, *, probes=1,
              probe_dist: str = "rademacher",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """1/K sum_k D^2_{v_k} s, the Hutchinson Laplacian of each score component (MATH.md 3)."""
    check_inputs(score_fn, x, t)
    V = resolve_probes(probes, x, probe_dist, generator)
    _, d2 = forward_mode.second_directional(score_fn, x, t, V)
    return d2.mean(0)

"""The public residual ops: fpe_residual, fpe_terms, projected_residual,
hutchinson_divergence and laplacian.

    fpe_residual(score_fn, x, t, sde, *, form="div", method="exact", probes=1,
                 probe_dist="rademacher", generator=None)            -> shape of x
    fpe_terms(score_fn, x, t, sde, *, form="div", weight=None, ...)  -> FPETerms (one pass)
    projected_residual(score_fn, x, t, sde, *, directions=1, ...)    -> [B], u . r
    hutchinson_divergence(score_fn, x, t, *, probes=1, ...)          -> [B]
    laplacian(score_fn, x, t, *, probes=1, ...)                      -> shape of x

form "div" is the paper's residual r, "laplacian" the conservative form r_c (docs/MATH.md 2).
method "exact" uses full Jacobians (probes ignored; small D only), "naive" the paper's
algorithm (docs/MATH.md 5), "fused" exact directional derivatives along the probes (the
probe-conditional value of docs/MATH.md 3, d_t s exact). With given probes [K, *x.shape] the
estimators are deterministic. Results are differentiable with respect to the parameters of
score_fn when the caller records a graph, and plain tensors under torch.no_grad or
torch.inference_mode; the caller's tensors are never modified.

What score_fn returns is checked at every call (a tensor of x's shape, dtype and device);
a batch needs at least one sample. float16 is refused and a float16 autocast switched off
(its range is too small for the score's derivatives); method "naive" needs float32 or
float64 (docs/MATH.md 5 and 8). Where the score is not finite at t = 0 (VP and sub-VP
networks, sigma(0) = 0), every method raises a ValueError saying so (fpkern.ops._common).

A training step (DSM + the FP term at the DSM's points) costs what FPLoss.with_dsm costs
when the DSM term takes its score from the FP pass, in both forms:

    t, xt, z, std = dsm.perturb(x)
    terms = fpe_terms(score_fn, xt, t, sde, form=form, weight=w)   # one pass; terms.score
    d = dsm.from_score(terms.score, t, xt, z, std)

The div form computes s in its own pass (a DSM forward of its own would be a second
forward and backward of the network); the laplacian form needs s first for its transport
direction and runs one plain forward for it, or none when given `score` (the DSM forward's,
if the caller ran it first).
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fpkern._checks import check_choice
from fpkern.jet import JetUnsupported, Layout
from fpkern.ops import exact, forward_mode, fused_div, fused_laplacian, naive
from fpkern.ops._common import (bcast, check_score, outside_inference_mode, precision_scope,
                                prepare, reverse_mode, scalar_fpe_rhs, sde_coefficients)
from fpkern.ops.hutchinson_reduce import hutchinson_reduce
from fpkern.ops.jet_pass import jet_pass
from fpkern.ops.laplacian_terms import laplacian_terms
from fpkern.ops.probes import resolve_probes

__all__ = ["FORMS", "METHODS", "FPETerms", "fpe_residual", "fpe_terms", "projected_residual",
           "hutchinson_divergence", "laplacian"]

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _with_jets(jet_fn, generic_fn, score_fn, strict: bool = False):
    """Run the Taylor-mode jet path; fall back to the generic torch.func path when the
    score function uses an op without a jet rule (logged once per kind of score_fn; score_fn
    is the CheckedScore the op calls), or with `strict` raise that JetUnsupported, which
    names the function and the module calling it (fpkern.jet.JetUnsupported)."""
    if strict:
        return jet_fn()
    try:
        return jet_fn()
    except JetUnsupported as exc:
        key = type(getattr(score_fn, "fn", score_fn)).__qualname__
        if key not in _warned:
            _warned.add(key)
            log.warning("fused: %s; using the generic torch.func path (slower)", exc)
        with forward_mode.autodiff_backends():
            return generic_fn()


FORMS = ("div", "laplacian")


def _exact(score_fn, x, t, sde, form, probes, score=None):
    with forward_mode.autodiff_backends():      # forward mode: math attention, norms that work
        return reverse_mode(lambda: exact.residual(score_fn, x, t, sde, form))


def _naive(score_fn, x, t, sde, form, probes, score=None):
    # reverse mode twice: only attention needs another backend (CPU flash attention has no
    # double backward); the norms' reverse-mode derivatives are right as they are
    with sdpa_kernel(SDPBackend.MATH):
        return reverse_mode(lambda: naive.residual(score_fn, x, t, sde, form, probes))


def _fused_residual(score_fn, x, t, sde, form, V, score, differentiable):
    """The fused residual of `form` (fpkern.ops.fused_laplacian, fpkern.ops.fused_div)."""
    if form == "laplacian":
        return fused_laplacian.residual(score_fn, x, t, sde, V, score)
    return fused_div.residual(score_fn, x, t, sde, V, differentiable=differentiable)


def _fused(score_fn, x, t, sde, form, probes, score=None, strict=False):
    grad = torch.is_grad_enabled()
    with torch.enable_grad():
        r = _with_jets(lambda: _fused_residual(score_fn, x, t, sde, form, probes, score, grad),
                       lambda: forward_mode.residual(score_fn, x, t, sde, form, probes),
                       score_fn, strict)
    return r if grad else r.detach()


METHODS = {"exact": _exact, "naive": _naive, "fused": _fused}
_UNUSED_SCORE = "fpe_residual(score=...) in the fused div form"


def _note_unused_score(form: str, method: str) -> None:
    """Log once that the fused div form does not use a given score: its own pass computes
    s, so a DSM term on a forward of its own costs a second forward and backward that
    fpe_terms(...).score would save (module docstring)."""
    if form == "div" and method == "fused" and _UNUSED_SCORE not in _warned:
        _warned.add(_UNUSED_SCORE)
        log.warning("fpe_residual: the div form computes the score in its own pass and does "
                    "not use score=; for a training step take the DSM term's score from "
                    "fpe_terms(score_fn, x, t, sde, form='div').score and run no forward of "
                    "its own (the step then costs what FPLoss.with_dsm costs)")


@outside_inference_mode
def fpe_residual(score_fn, x: torch.Tensor, t: torch.Tensor, sde, *, form: str = "div",
                 method: str = "exact", probes=1, probe_dist: str = "rademacher",
                 generator: torch.Generator | None = None,
                 score: torch.Tensor | None = None, strict: bool = False) -> torch.Tensor:
    """Score-FPE residual of score_fn at (x, t) under `sde`, with x's shape (docs/MATH.md 2).

    `score`: score_fn(x, t) if the caller already computed it (the DSM forward at the same
    points); the fused laplacian form then runs one jet pass instead of two. The fused div
    form computes s in its own pass and does not use it (logged once): a training step
    takes its DSM term from fpe_terms(...).score instead, with no forward of its own (the
    module docstring). Methods "exact" and "naive" recompute it.

    `strict` (method "fused" only): raise JetUnsupported where the network calls a torch
    function without a jet rule, naming it and the module calling it, instead of falling
    back to the generic torch.func path; a check that a network gets the fast path.

    float16 inputs are refused (use bfloat16 or float32), and bfloat16 ones for method
    "naive"; the module docstring has the score checks, the grad modes and t = 0.
    """
    check_choice("form", form, FORMS)
    check_choice("method", method, METHODS)
    if strict and method != "fused":
        raise ValueError(f"strict=True checks the jet rules of method 'fused'; got method "
                         f"{method!r}")
    run = functools.partial(_fused, strict=True) if strict else METHODS[method]
    sf = prepare(score_fn, x, t, sde, method)
    if method == "exact":
        resolve_probes(probes, x, probe_dist)     # validated like the others, then ignored
        V = None
    else:
        V = resolve_probes(probes, x, probe_dist, generator)
    if score is not None:
        check_score(score, x, "score")
        _note_unused_score(form, method)
    with precision_scope(x, method):
        r = run(sf, x, t, sde, form, V, score)
    sf.check_defined(x, t, r)
    return r


class FPETerms(NamedTuple):
    """Everything the FP regulariser needs at (x, t), from one pass (fpe_terms)."""

    residual: torch.Tensor     # r (form div) or r_c (laplacian), shape of x; u . r [B] with
                               # directions
    divergence: torch.Tensor   # [B] Hutchinson divergence of s
    loss: torch.Tensor         # [B] weight |r|^m; weight (u . r)^2 with directions
    scalar: torch.Tensor       # [B] 1/2 g^2 (div s + |s|^2) - f <x, s>
    score: torch.Tensor        # s(x, t), shape of x, from the same pass


def _directions(directions, x, generator):
    if isinstance(directions, torch.Tensor):
        if directions.shape != x.shape:
            raise ValueError(f"directions must have x's shape {tuple(x.shape)}, got "
                             f"{tuple(directions.shape)}")
        return directions.to(x)
    return resolve_probes(directions, x, "rademacher", generator)[0]


@outside_inference_mode
def fpe_terms(score_fn, x: torch.Tensor, t: torch.Tensor, sde, *, form: str = "div",
              weight: torch.Tensor | None = None, m: float = 2.0, probes=1,
              probe_dist: str = "rademacher", generator: torch.Generator | None = None,
              score: torch.Tensor | None = None, directions=None,
              strict: bool = False) -> FPETerms:
    """The residual of `form`, the Hutchinson divergence, the weighted loss weight |r|^m, the
    scalar FPE term and the score itself, all from one forward-mode pass of the network
    (docs/MATH.md 2-4; method "fused": exact directional derivatives along the probes).

    - form "laplacian": one jet pass with rows x, v_1..v_K, (-c, 1) and the collapsed second
      order, then one fused kernel (fpkern.ops.laplacian_terms). The direction c = g^2 s - f x needs
      s first: pass `score` = score_fn(x, t) if the caller has it (the DSM forward's),
      otherwise it costs one plain forward; either way the returned s (the pass's value
      row) can serve the DSM term, at no further cost.
    - form "div": the residual's jet pass (fpkern.ops.fused_div); its value and probe rows
      give s and the divergence, so `score` is not needed (and not used). The returned s
      carries the gradient of everything computed from it, so a training step can take its
      DSM term from it and run no forward of its own (fpkern.losses.FPLoss.with_dsm).
    - `directions` (form "div", m = 2): 1 to draw a Rademacher u per sample, or a tensor
      of x's shape: the residual is then u . r [B] and the loss weight (u . r)^2, unbiased
      for weight |r|^2, from one forward-mode pass without a reverse pass
      (projected_residual).

    `weight` [B] multiplies the per-sample loss (default 1). A score_fn without jet rules
    runs the generic torch.func path, or with `strict` raises JetUnsupported naming the
    function and module (as fpe_residual).
    """
    check_choice("form", form, FORMS)
    sf = prepare(score_fn, x, t, sde)
    V = resolve_probes(probes, x, probe_dist, generator)
    if score is not None:
        check_score(score, x, "score")
    if weight is None:
        weight = x.new_ones(x.shape[0])
    elif weight.shape != (x.shape[0],):
        raise ValueError(f"weight must have shape [B] = ({x.shape[0]},), got {tuple(weight.shape)}")
    weight = weight.to(x.dtype)
    if directions is not None and (form != "div" or m != 2):
        raise ValueError(f"directions (the projected estimator) need form 'div' and m 2, got "
                         f"form {form!r}, m {m}")
    with precision_scope(x):
        if form == "laplacian":
            out = _laplacian_terms(sf, x, t, sde, V, weight, m, score, strict)
        else:
            U = None if directions is None else _directions(directions, x, generator)
            out = _div_terms(sf, x, t, sde, V, U, weight, m, strict)
    sf.check_defined(x, t, out.residual)
    return out


def _div_terms(score_fn, x, t, sde, V, U, weight, m, strict=False) -> FPETerms:
    f, g2 = sde_coefficients(sde, t, x)
    grad = torch.is_grad_enabled()

    def generic():
        r = forward_mode.residual(score_fn, x, t, sde, "div", V)
        s, jv = forward_mode.directional(score_fn, x, t, V)
        return r if U is None else (U * r).flatten(1).sum(1), s, hutchinson_reduce(V, jv)

    def jets():
        if U is None:
            return fused_div.terms(score_fn, x, t, sde, V, differentiable=grad)
        s, div, u_r = fused_div.div_pass(score_fn, x, t, sde, V, U)
        return u_r, s, div

    with torch.enable_grad():
        r, s, div = _with_jets(jets, generic, score_fn, strict)
        sq = r.pow(2) if U is not None else r.flatten(1).pow(2).sum(1)
        loss = weight * (sq if m == 2 else sq.pow(m / 2))
        out = FPETerms(r, div, loss, scalar_fpe_rhs(x, s, div, f, g2), s)
    return out if grad else FPETerms(*(v.detach() for v in out))


def _laplacian_terms(score_fn, x, t, sde, V, weight, m, score, strict=False):
    def generic():
        from torch.func import jvp
        f, g2 = sde_coefficients(sde, t, x)
        s, dts = forward_mode.time_derivative(score_fn, x, t)
        jv, d2 = forward_mode.second_directional(score_fn, x, t, V)
        c = bcast(g2, x) * (s if score is None else score) - bcast(f, x) * x
        _, jc = jvp(lambda y: score_fn(y, t), (x,), (c,))
        return (*laplacian_terms(V, jv, dts - jc, d2.mean(0), s, x, g2, f, weight, m), s)

    def run():
        s = score if score is not None else score_fn(x, t)
        return FPETerms(*_with_jets(
            lambda: fused_laplacian.terms(score_fn, x, t, sde, V, s, weight, m), generic,
            score_fn, strict))

    return reverse_mode(run)


@outside_inference_mode
def hutchinson_divergence(score_fn, x: torch.Tensor, t: torch.Tensor, *, probes=1,
                          probe_dist: str = "rademacher",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """1/K sum_k v_k . (J v_k) per sample, shape [B] (docs/MATH.md 3)."""
    sf = prepare(score_fn, x, t)
    V = resolve_probes(probes, x, probe_dist, generator)

    def jets():
        K = V.shape[0]
        rows = jet_pass(sf, x, t, V, time=False, layout=Layout(n1=K))
        return rows[1:]

    with precision_scope(x):
        div = hutchinson_reduce(V, _with_jets(
            jets, lambda: forward_mode.directional(sf, x, t, V)[1], sf))
    sf.check_defined(x, t, div)
    return div


@outside_inference_mode
def laplacian(score_fn, x: torch.Tensor, t: torch.Tensor, *, probes=1,
              probe_dist: str = "rademacher",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """1/K sum_k D^2_{v_k} s, the Hutchinson Laplacian of each score component (docs/MATH.md 3)."""
    sf = prepare(score_fn, x, t)
    V = resolve_probes(probes, x, probe_dist, generator)

    def jets():
        K = V.shape[0]
        layout = Layout(n1=K, collapse=tuple(range(1, K + 1)))
        return jet_pass(sf, x, t, V, time=False, layout=layout)[-1]

    def generic():      # nested forward mode needs autograd recording (silu_backward)
        return reverse_mode(lambda: forward_mode.second_directional(sf, x, t, V)[1].mean(0))

    with precision_scope(x):
        lap = _with_jets(jets, generic, sf)
    sf.check_defined(x, t, lap)
    return lap


@outside_inference_mode
def projected_residual(score_fn, x: torch.Tensor, t: torch.Tensor, sde, *, directions=1,
                       probes=1, probe_dist: str = "rademacher",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """u . r per sample, shape [B]: the div-form residual along a direction u per sample.

    `directions` is a tensor of x's shape (one u per sample) or 1 to draw Rademacher ones;
    `probes` are the Hutchinson probes of the divergence, as in fpe_residual. Forward mode
    only: E_u (u . r)^2 = |r|^2, so (u . r)^2 is an unbiased estimate of the div-form loss
    that needs no reverse pass through the network's derivatives.
    """
    if directions is None:
        raise ValueError("directions must be a tensor of x's shape or 1, got None")
    return fpe_terms(score_fn, x, t, sde, form="div", probes=probes, probe_dist=probe_dist,
                     generator=generator, directions=directions).residual

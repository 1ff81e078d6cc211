"""The FP-Diffusion training objective as small callable loss classes (docs/MATH.md section 4).

    L = DSM + alpha * L_vec + beta * L_scalar

``DSMLoss`` returns the per-sample denoising score-matching values, ``FPLoss`` the
per-sample vector term and the batch-level scalar term; the training loop reduces
(``mean`` over the batch for the per-sample values) and weights them.

    dsm = DSMLoss(sde)                       # likelihood weighting, t ~ U[eps, T]
    fp = FPLoss(sde)                         # preset 'fpkern' (FP_PRESETS): the study's recipe
    fp = FPLoss(sde, preset="paper")         # FP-Diffusion's objective: alpha .15, beta .01
    fp = FPLoss(sde, alpha=4.9e-5, normalize="dim")   # the paper's CIFAR-10 strength in the
                                             # per-dimension scale
    d, f = fp.with_dsm(dsm, score_fn, x, generator=g)   # DSMOutput, FPOutput
    loss = d.loss.mean() + f.loss

``with_dsm`` gives the same values as d = dsm(score_fn, x) then f = fp(score_fn, x, dsm=d),
and shares the passes: the FP terms are evaluated at the DSM term's t and x_t
(fp_points='pert'), and with method 'fused' every FP term (the residual, the divergence of
the scalar term, the score) comes from one pass of the network (fpkern.ops.fpe_terms).
- form 'div' (the default): the DSM term takes its score s from that pass as well, so a
  training step runs a plain forward only on the samples the FP terms leave out (`batch`),
  none with the FP terms on the whole batch.
- form 'laplacian': the DSM forward's s fixes the pass's transport direction, so the DSM
  forward runs first and the pass follows.
With methods 'exact' and 'naive' the residual recomputes s inside its own derivative
passes and the scalar term's Hutchinson divergence costs one more pass.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fpkern._checks import bcast, check_choice

from fpkern.ops import (FORMS, METHODS, PROBE_DISTS, FPETerms, fpe_residual, fpe_terms,
                        hutchinson_divergence, log_density_fpe, scalar_fpe_rhs)
from fpkern.sde import LinearSDE

__all__ = ["DSMLoss", "FPLoss", "DSMOutput", "FPOutput", "sample_time",
           "DSM_WEIGHTINGS", "WEIGHTINGS", "FP_POINTS", "ESTIMATORS", "NORMALIZATIONS",
           "SCALAR_TERMS", "FP_FORMS", "FP_PRESETS"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: DSM weightings: 'll' g(t)^2 (likelihood weighting), 'score_sde' sigma(t)^2 (Score SDE's
#: default lambda(t), i.e. mean_D (sigma s + z)^2).
DSM_WEIGHTINGS = ("ll", "score_sde")
#: FP vector-term weightings w(t): 'constant' 1, 'convention' g(t), 'll' g(t)^2.
WEIGHTINGS = ("constant", "convention", "ll")
#: Where the FP terms are evaluated: the DSM's perturbed samples x_t, the clean data x, or
#: uniform points in the batch's data range.
FP_POINTS = ("pert", "x", "random")
#: How L_vec is computed: 'vector' from the residual r itself; 'projected' from (u . r)^2
#: with a Rademacher u per sample (div form, m = 2, method 'fused'): unbiased for |r|^2 and
#: forward mode only (fpkern.ops.projected_residual), but its parameter gradient is so much
#: noisier than 'vector''s, for a step only somewhat cheaper, that 'vector' gives more per
#: second (measured in experiments/results/estimator_efficiency.md).
ESTIMATORS = ("vector", "projected")
#: How L_vec is normalised by the dimension D (docs/MATH.md 4): 'paper' w |r|^m / D^m
#: (FP-Diffusion's code: against the per-dimension-mean DSM its strength falls as 1/D^(m/2));
#: 'dim' w (|r|^2 / D)^(m/2), the m-th power of the residual's RMS component, so that one
#: alpha has the same strength against DSM at every D. alpha_dim = alpha_paper / D^(m/2).
NORMALIZATIONS = ("paper", "dim")
#: Which scalar term L_scalar is (docs/MATH.md 4): 'paper' the batch L2 norm of the scalar
#: right-hand side h (FP-Diffusion's; not zero at the true score); 'consistent' an unbiased
#: estimate of M^2, M = E[(h - D f(t)) / D] over x_t and t, which is 0 at the true score
#: (E_q[d_t log q_t] = 0). The estimate can be negative and enters the loss as it is.
SCALAR_TERMS = ("paper", "consistent")
#: FPLoss forms: the score-FPE residual r in the div or laplacian form (fpkern.ops FORMS), or
#: 'log_density', the scalar log-density FPE residual R of an energy or log-density network
#: (fpkern.models.EnergyScore; fpkern.ops.log_density_fpe, docs/MATH.md 13), whose vector
#: residual is grad_x R: L_vec = w(t) R_1 R_2 / D^2 ('paper') or / D ('dim'), R_1 R_2 the
#: unbiased estimate of R^2 from two probe sets. It holds the scalar FPE with d_t log q
#: itself, so the paper's scalar term (beta) does not apply.
FP_FORMS = FORMS + ("log_density",)
#: Named settings of the four knobs the FP study calibrates; the options FPLoss (and
#: ``python -m fpkern.train``) leave at None take them from ``preset``:
#: - 'fpkern' (the default): the recipe of README "Which FP term to train with", from
#:   experiments/results/fp_study.md: the per-dimension normalisation, so that one alpha has
#:   one strength against DSM at every D, and no scalar term;
#: - 'paper': FP-Diffusion's own objective (its code's normalisation and scalar term, alpha
#:   0.15, beta 0.01, the values of its CIFAR-10 configs), to reproduce the paper. Against
#:   the per-dimension DSM its alpha weighs 3072 / D times more at dimension D than at
#:   CIFAR-10's 3072 (docs/MATH.md 4), so at small D the regulariser dominates.
FP_PRESETS: dict[str, dict] = {
    "fpkern": dict(alpha=1e-4, beta=0.0, normalize="dim", scalar="consistent"),
    "paper": dict(alpha=0.15, beta=0.01, normalize="paper", scalar="paper"),
}


def sample_time(n: int, *, eps: float, T: float, generator: torch.Generator | None = None,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """n times t ~ U[eps, T] (docs/MATH.md 4), shape [n]."""
    u = torch.rand(n, generator=generator, dtype=dtype,
                   device=generator.device if generator is not None else device)
    return (eps + (T - eps) * u).to(device)


class DSMOutput(NamedTuple):
    """Per-sample DSM values and the quantities the FP term may reuse."""

    loss: torch.Tensor   # [B] weighted mean_D (s + z / sigma)^2
    t: torch.Tensor      # [B] times
    xt: torch.Tensor     # perturbed samples, shape of x
    z: torch.Tensor      # the noise, shape of x
    s: torch.Tensor      # the score s(x_t, t), shape of x (carries the graph)


class FPOutput(NamedTuple):
    """The FP regulariser's terms; ``loss`` = alpha * mean(vec) + beta * scalar."""

    loss: torch.Tensor     # scalar, weighted sum of both terms
    vec: torch.Tensor      # [n] per-sample w(t) |r|_2^m / D^m ('paper'), / D^(m/2) ('dim')
    scalar: torch.Tensor   # scalar: 'paper' the batch L2 norm of the scalar FPE right-hand
                           # side h; 'consistent' the unbiased estimate of E[(h - D f) / D]^2
                           # (can be negative)


class DSMLoss:
    """Denoising score matching, per sample (docs/MATH.md 4):

        lambda(t) * mean_D (s(x_t, t) + z / sigma(t))^2,   x_t = alpha(t) x + sigma(t) z,

    with t ~ U[eps, T] and lambda = g^2 ('ll', likelihood weighting) or sigma^2
    ('score_sde', Score SDE's default with reduce_mean).
    """

    def __init__(self, sde: LinearSDE, *, weighting: str = "ll", eps: float = 1e-5):
        check_choice("DSM weighting", weighting, DSM_WEIGHTINGS)
        if not 0 <= eps < sde.T:
            raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps}")
        self.sde, self.weighting, self.eps = sde, weighting, float(eps)

    def perturb(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        """(t, x_t, z, sigma(t)) for clean data x [B, ...]."""
        t = sample_time(x.shape[0], eps=self.eps, T=self.sde.T, generator=generator,
                        device=x.device, dtype=x.dtype)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else x.device).to(x.device)
        mean, std = self.sde.marginal_prob(x, t)
        return t, mean + bcast(std, x) * z, z, std

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> DSMOutput:
        t, xt, z, std = self.perturb(x, generator=generator)
        return self.from_score(score_fn(xt, t), t, xt, z, std)

    def from_score(self, s: torch.Tensor, t: torch.Tensor, xt: torch.Tensor, z: torch.Tensor,
                   std: torch.Tensor) -> DSMOutput:
        """The DSM values for the score s = s(x_t, t) at perturb()'s points."""
        err = (s + z / bcast(std, s)).pow(2).flatten(1).mean(1)
        lam = self.sde.g2(t) if self.weighting == "ll" else std ** 2
        return DSMOutput(lam.to(err.dtype) * err, t, xt, z, s)

    def __repr__(self) -> str:
        return f"DSMLoss(weighting={self.weighting!r}, eps={self.eps})"


class FPLoss:
    """The score-FPE regulariser alpha * L_vec + beta * L_scalar (docs/MATH.md 4).

    L_vec per sample: w(t) |r(y, t)|_2^m / D^m (``normalize`` 'paper') or
    w(t) (|r(y, t)|_2^2 / D)^(m/2) ('dim': the same alpha means the same strength against
    the per-dimension DSM at every D; alpha_dim = alpha_paper / D^(m/2), see NORMALIZATIONS),
    with r the score-FPE residual (``fpkern.ops.fpe_residual`` with ``form``, ``method``,
    ``probes``) at points y (``fp_points``) and w from ``weighting``. L_scalar, from
    h = 1/2 g^2 (div s + |s|^2) - f <y, s> with div by Hutchinson (``probes`` probes):
    ``scalar`` 'paper', the batch L2 norm of h; 'consistent', mean(e)^2 - var(e) / n with
    e = (h - D f(t)) / D, unbiased for E[e]^2, which is 0 at the true score with fp_points
    'pert' (see SCALAR_TERMS; needs n >= 2 FP samples).
    ``batch``: evaluate on the first ``batch`` samples only (None: all), a cost knob.
    ``data_range``: (lo, hi) for fp_points 'random' (None: the batch's min and max).
    ``estimator``: 'vector' (|r|^2 from r) or 'projected' ((u . r)^2, see ESTIMATORS).
    ``form`` 'log_density' (an EnergyScore network): L_vec = w R_1 R_2 / D^2 ('paper') or
    / D ('dim'), the unbiased R^2 of the scalar log-density FPE (FP_FORMS), K = ``probes``
    per set; ``beta`` must be 0 for it (its default there whatever the preset).
    ``alpha``, ``beta``, ``normalize`` and ``scalar`` left at None come from ``preset``
    (FP_PRESETS): 'fpkern', the study's recipe, or 'paper', FP-Diffusion's objective.
    With form 'div', method 'fused' and estimator 'vector', the backward reruns the network
    (fpkern.ops.fused_div, like activation checkpointing): call backward before changing the
    parameters.
    """

    def __init__(self, sde: LinearSDE, *, alpha: float | None = None,
                 beta: float | None = None, m: float = 2,
                 weighting: str = "ll", fp_points: str = "pert", form: str = "div",
                 method: str = "fused", probes: int = 1, probe_dist: str = "rademacher",
                 batch: int | None = None, data_range: tuple[float, float] | None = None,
                 eps: float = 1e-5, estimator: str = "vector", normalize: str | None = None,
                 scalar: str | None = None, preset: str = "fpkern"):
        check_choice("preset", preset, sorted(FP_PRESETS))
        knobs = FP_PRESETS[preset]
        alpha = knobs["alpha"] if alpha is None else alpha
        normalize = knobs["normalize"] if normalize is None else normalize
        scalar = knobs["scalar"] if scalar is None else scalar
        if beta is None:
            beta = 0.0 if form == "log_density" else knobs["beta"]
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("normalize", normalize, NORMALIZATIONS)
        check_choice("scalar", scalar, SCALAR_TERMS)
        check_choice("estimator", estimator, ESTIMATORS)
        if estimator == "projected" and (form != "div" or m != 2 or method != "fused"):
            raise ValueError("estimator 'projected' needs form 'div', m 2 and method 'fused', "
                             f"got form {form!r}, m {m}, method {method!r}")
        check_choice("fp_points", fp_points, FP_POINTS)
        check_choice("form", form, FP_FORMS)
        check_choice("method", method, sorted(METHODS))
        if form == "log_density" and (m != 2 or beta > 0 or estimator != "vector"):
            raise ValueError(f"form 'log_density' trains with w R_1 R_2, the unbiased R^2 of the "
                             f"scalar log-density FPE (which holds the scalar term itself): it "
                             f"needs m 2, beta 0 and estimator 'vector', got m {m}, beta {beta}, "
                             f"estimator {estimator!r}")
        check_choice("probe_dist", probe_dist, sorted(PROBE_DISTS))
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if m <= 0:
            raise ValueError(f"m must be > 0, got {m}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        if batch is not None and (isinstance(batch, bool) or int(batch) < 1):
            raise ValueError(f"batch must be a positive int or None, got {batch!r}")
        if scalar == "consistent" and beta > 0 and batch is not None and int(batch) < 2:
            raise ValueError(f"scalar 'consistent' needs batch >= 2 FP samples (its estimate "
                             f"pairs distinct samples), got batch {batch}")
        if not 0 <= eps < sde.T:
            raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps}")
        self.sde = sde
        self.alpha, self.beta, self.m = float(alpha), float(beta), float(m)
        self.weighting, self.fp_points, self.form, self.method = weighting, fp_points, form, method
        self.probes, self.probe_dist = int(probes), probe_dist
        self.batch = None if batch is None else int(batch)
        self.data_range = data_range
        self.eps = float(eps)
        self.estimator = estimator
        self.normalize, self.scalar = normalize, scalar

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t): 1, g(t) or g(t)^2."""
        if self.weighting == "constant":
            return torch.ones_like(t)
        return self.sde.g2(t) if self.weighting == "ll" else self.sde.g(t)

    def vec_scale(self, D: int) -> float:
        """The divisor of w |r|^m in L_vec: D^m ('paper') or D^(m/2) ('dim')."""
        return D ** self.m if self.normalize == "paper" else D ** (self.m / 2)

    def scalar_term(self, h: torch.Tensor, t: torch.Tensor, D: int) -> torch.Tensor:
        """L_scalar from the per-sample scalar right-hand side h [n] at times t [n] in D
        dimensions: 'paper' |h|_2 over the batch; 'consistent' mean(e)^2 - var(e) / n,
        e = (h - D f(t)) / D, the squared batch mean less its estimated variance (the mean
        over pairs of distinct samples of e_i e_j): unbiased for E[e]^2 (docs/MATH.md 4)."""
        if self.scalar == "paper":
            return torch.linalg.vector_norm(h)
        n = h.shape[0]
        if n < 2:
            raise ValueError(f"scalar 'consistent' needs at least 2 FP samples, got {n}")
        dtype = torch.promote_types(h.dtype, torch.float32)
        e = (h.to(dtype) - D * self.sde.f(t).to(dtype)) / D
        return e.mean().square() - e.var() / n

    def points(self, x: torch.Tensor, dsm: DSMOutput | None, *,
               generator: torch.Generator | None = None):
        """(y, t, s or None): where the FP terms are evaluated, and a reusable score."""
        n = x.shape[0] if self.batch is None else min(self.batch, x.shape[0])
        if dsm is not None:
            t = dsm.t[:n]
        else:
            t = sample_time(n, eps=self.eps, T=self.sde.T, generator=generator,
                            device=x.device, dtype=x.dtype)
        if self.fp_points == "pert":
            if dsm is not None:
                return dsm.xt[:n], t, dsm.s[:n]
            z = torch.randn(x[:n].shape, generator=generator, dtype=x.dtype,
                            device=generator.device if generator is not None else x.device)
            mean, std = self.sde.marginal_prob(x[:n], t)
            return mean + bcast(std, mean) * z.to(x.device), t, None
        if self.fp_points == "x":
            return x[:n], t, None
        lo, hi = self.data_range if self.data_range is not None else (x.min(), x.max())
        u = torch.rand(x[:n].shape, generator=generator, dtype=x.dtype,
                       device=generator.device if generator is not None else x.device)
        return lo + (hi - lo) * u.to(x.device), t, None

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, *, dsm: DSMOutput | None = None,
                 generator: torch.Generator | None = None) -> FPOutput:
        y, t, s = self.points(x, dsm, generator=generator)
        if self.form == "log_density":
            return self._log_density(score_fn, y, t, generator)
        if self.alpha > 0 and self.method == "fused":
            return self._output(self._terms(score_fn, y, t, s, generator), t)
        D = y[0].numel()
        zero = y.new_zeros(())
        vec = y.new_zeros(y.shape[0])
        if self.alpha > 0:
            r = fpe_residual(score_fn, y, t, self.sde, form=self.form, method=self.method,
                             probes=self.probes, probe_dist=self.probe_dist, generator=generator,
                             score=s)
            norm = r.flatten(1).pow(2).sum(1)
            norm = norm if self.m == 2 else norm.sqrt() ** self.m
            vec = self.weight(t).to(norm.dtype) * norm / self.vec_scale(D)
        scalar = zero
        if self.beta > 0:
            if s is None:
                s = score_fn(y, t)
            div = hutchinson_divergence(score_fn, y, t, probes=self.probes,
                                        probe_dist=self.probe_dist, generator=generator)
            f, g2 = self.sde.f(t).to(y.dtype), self.sde.g2(t).to(y.dtype)
            scalar = self.scalar_term(scalar_fpe_rhs(y, s, div, f, g2), t, D)
        return FPOutput(self.alpha * vec.mean() + self.beta * scalar, vec, scalar)

    def with_dsm(self, dsm: DSMLoss, score_fn: ScoreFn, x: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> tuple[DSMOutput, FPOutput]:
        """Both terms of a training step: the values of d = dsm(score_fn, x) and
        self(score_fn, x, dsm=d), drawing the same random numbers from `generator` (for a
        score_fn that treats samples independently, as every fpkern.models network does:
        no batch statistics).

        When the FP pass evaluates the score at the DSM's points (shares_dsm_forward():
        fp_points 'pert', form 'div', method 'fused', alpha > 0), the DSM term takes s from
        that pass (fpkern.ops.fpe_terms) for the samples the FP terms use (`batch`), and
        runs a plain forward on the others only; one backward serves both terms. Otherwise
        it runs the DSM forward first (the laplacian form needs s for its transport
        direction).
        """
        if not self.shares_dsm_forward():
            d = dsm(score_fn, x, generator=generator)
            return d, self(score_fn, x, dsm=d, generator=generator)
        t, xt, z, std = dsm.perturb(x, generator=generator)
        n = x.shape[0] if self.batch is None else min(self.batch, x.shape[0])
        terms = self._terms(score_fn, xt[:n], t[:n], None, generator)
        s = terms.score if n == x.shape[0] else torch.cat([terms.score, score_fn(xt[n:], t[n:])])
        return dsm.from_score(s, t, xt, z, std), self._output(terms, t[:n])

    def shares_dsm_forward(self) -> bool:
        """Whether with_dsm takes the DSM term's score from the FP pass (on the samples the
        FP terms use)."""
        return (self.fp_points == "pert" and self.form == "div" and self.method == "fused"
                and self.alpha > 0)

    def _terms(self, score_fn, y, t, s, generator) -> FPETerms:
        """Every FP term from one pass (method 'fused'; fpkern.ops.fpe_terms)."""
        w = self.weight(t).to(y.dtype) / self.vec_scale(y[0].numel())
        return fpe_terms(score_fn, y, t, self.sde, form=self.form, weight=w, m=self.m,
                         probes=self.probes, probe_dist=self.probe_dist, generator=generator,
                         score=s if self.form == "laplacian" else None,
                         directions=1 if self.estimator == "projected" else None)

    def _log_density(self, score_fn, y, t, generator) -> FPOutput:
        """Form 'log_density': alpha mean_n w R_1 R_2 / (D^2 or D) (FP_FORMS)."""
        if getattr(score_fn, "log_density", None) is None:
            raise TypeError(f"form 'log_density' needs a log-density network with a "
                            f"log_density(x, t) method (fpkern.models.EnergyScore), got "
                            f"{type(score_fn).__name__}")
        zero = y.new_zeros(())
        if self.alpha == 0:
            return FPOutput(zero, y.new_zeros(y.shape[0]), zero)
        terms = log_density_fpe(score_fn, y, t, self.sde, method=self.method,
                                probes=self.probes, probe_dist=self.probe_dist,
                                generator=generator)
        vec = self.weight(t).to(y.dtype) * terms.square / self.vec_scale(y[0].numel())
        return FPOutput(self.alpha * vec.mean(), vec, zero)

    def _output(self, terms: FPETerms, t: torch.Tensor) -> FPOutput:
        scalar = (self.scalar_term(terms.scalar, t, terms.score[0].numel()) if self.beta > 0
                  else terms.loss.new_zeros(()))
        return FPOutput(self.alpha * terms.loss.mean() + self.beta * scalar, terms.loss, scalar)

    def __repr__(self) -> str:
        return (f"FPLoss(alpha={self.alpha}, beta={self.beta}, m={self.m}, "
                f"weighting={self.weighting!r}, fp_points={self.fp_points!r}, form={self.form!r}, "
                f"method={self.method!r}, probes={self.probes}, batch={self.batch}, "
                f"estimator={self.estimator!r}, normalize={self.normalize!r}, "
                f"scalar={self.scalar!r})")

"""Issue 17, item 3 (study v2): when does the score-FPE regulariser help? (docs/MATH.md 4, 6, 9)

    python experiments/fp_study.py                     # the full study, 97 min on 2 cores
    python experiments/fp_study.py --quick --out /tmp/fpq   # smoke run, ~35 s, concludes nothing
    python experiments/fp_study.py --no-images --seeds 3 --alphas 1e-3 1e-1 --out /tmp/fp

``--help`` lists every option with its default. The committed results are written by the
first command (``--out experiments/results``, the default); it uses 2 worker processes with
one torch thread each.

Design
------
Data with exact densities, VP SDE, an MLP score network (``MLP(D, 128, 3)`` in ``ScoreFn``),
EMA weights evaluated:

- ``mix2``: the 8-Gaussian ring (D = 2; exact log q_0, the docs/MATH.md 6 oracle);
- ``checkerboard`` (D = 2): uniform on area 32, so -log q_0 = log 32 per sample at every
  support point, log(32)/2 nats/dim;
- ``gmm8``, ``gmm32``: ``GaussianMixture.random(8, D, spread=1)`` with fixed seeds 8 and 32
  (exact log q_0 from ``log_prob``).

Per (data set, seed) one task, deterministic given (data set, seed, config) whatever worker
runs it (every random number comes from generators seeded by a hash of those names):

1. **DSM pretraining to convergence.** Adam (lr 2e-3, clip 1), batch 256, EMA 0.999. Every
   ``--eval-every`` steps the EMA model's held-out DSM loss is computed on a fixed set (4096
   held-out x, times t and noises z drawn once from the eval seed): the training objective
   (likelihood weighting) with t drawn log-uniformly on [1e-5, 1] and importance weights, an
   unbiased estimate of the uniform-t objective without the 1/t tail that makes a plain
   uniform-t estimate jump by percents between evaluations. Converged at the first
   evaluation (after ``--pretrain-min-steps``) at which the best value improved by at most
   ``--conv-rtol`` (relative) over the last ``--conv-window`` evaluations; otherwise the run
   stops at ``--pretrain-max-steps`` (12000; the cap, reported as such). For the mixtures the true
   score's loss on the same set (the floor) is reported beside it.
2. **Calibration** at that checkpoint: the gradient norm of each term (DSM, the vector term
   in each form, each scalar term) over a few batches, so every knob's strength can be read
   as knob x |grad term| / |grad DSM|.
3. **Fine-tuning** (the paper's protocol) from the checkpoint (weights, EMA, Adam state) for
   ``--ft-steps`` (500) per config, the pretraining's lr and EMA (0.999), with separate
   generators for data, DSM noise and FP probes, seeded the same for every config: only the
   loss differs. (With EMA 0.99 instead, the DSM-only continuation of a gmm32 checkpoint had
   NLL - exact 0.62 against the checkpoint's 0.26: the evaluated weights carried the noise of
   lr 2e-3, and the baseline was no longer the converged model; with 0.999 it had 0.28.) Configs: ``dsm``
   (alpha = beta = 0: the DSM-only continuation, the paired baseline); ``div:a`` and
   ``laplacian:a``, alpha on the log grid ``--alphas`` (default 1e-5 .. 1, six values, five
   decades) in the per-dimension scale (FPLoss(normalize="dim")), beta = 0;
   ``scalar_paper`` (alpha 0, FP-Diffusion's scalar term, beta 0.01); ``scalar_consistent``
   (alpha 0, the consistent scalar term, beta ``--beta-consistent`` = 10: at converged mix2 and
   gmm32 checkpoints its gradient was 0.22 and 0.039 x DSM's at beta 1, so 10 puts it at
   0.4-2 x, the size of the paper's scalar term at beta 0.01 there, 0.08-1.4 x); ``paper`` (the combined
   config: FP-Diffusion's own objective, FPLoss(preset='paper'): alpha 0.15 in the paper's
   normalisation = 0.15 / D per dimension, beta 0.01, paper scalar, div form). FP terms on
   the first 64 samples of a batch, fused, one Rademacher probe.
4. **Equal wall-clock.** The DSM-only continuation is also run on (same streams) to the step
   count at which it has used each FP config's training time: n = ft_steps x (that
   config's time / the DSM continuation's time for ft_steps), rounded to a multiple of
   ``--time-quantum`` x ft_steps; each distinct n is evaluated once and every FP config is
   compared with its own n.
5. **Evaluation** of every EMA model (the pretrained one too), on held-out sets fixed per
   data set (the same for every seed, so the seeds vary training only): NLL by the
   probability-flow ODE (fpkern.likelihood.log_likelihood, rtol = atol = 1e-4) minus the exact
   value, nats/dim, on 256 held-out points (exact divergence for D <= 8, Hutchinson with 4
   fixed Rademacher probes for D = 32); the relative residual profile of both forms over t
   (residual_profile, fused, 8 probes); conservativity (conservativity_profile); the ODE-SDE
   gap (ode_sde_gap: SW2 between 1000 ODE and reverse-SDE samples from the same x_T, 250
   Euler-Maruyama steps); MMD^2 and sliced W2 of the SDE and ODE samples against 1000 true
   samples; wall-clock per step. The true mixture score through the same pipeline gives
   each metric's floor (seed 0 only).
6. **Paired statistics.** For each metric and config, the per-seed difference to the DSM-only
   continuation (the log10 ratio for positive scale metrics), mean and 95% t-interval over
   the seeds (``mean_ci`` of experiments/fast_samplers.py); the same at equal wall-clock;
   and per seed the least-squares slope against log10(alpha) of the gap and of the SDE
   sample metrics (the claim of Deveney et al. 2023: the gap shrinks as the FP weight grows
   while SDE sample quality can worsen).

Digits (``--images``, on by default, off in --quick): the embedded 16x16 digits (1541 to train,
the last 256 held out), the small/ddpmpp preset (VP), DSM pretraining for
``--image-pretrain-steps`` = 3000 (batch 32, lr 1e-3, 100 warm-up steps, EMA 0.999; the same
held-out DSM curve and convergence rule, with the cap expected to bind; 2900 such steps gave
recognisable reverse-SDE samples in a trial), a PNG grid of reverse-SDE samples (200
Euler-Maruyama steps) of every model (fp_study_digits.png), then per fine-tuning seed (2; the
checkpoint is shared, the seeds vary the fine-tuning streams only) the DSM-only and an FP
fine-tune for ``--image-ft-steps`` = 300: alpha 1e-3 per dimension (the grid value nearest
the paper's alpha 0.15 at D = 256, 5.9e-4; about 0.1 x DSM's gradient at the trial
checkpoint, where 150 steps of it moved bits/dim on 32 images by +0.05), div form, 4 FP
samples a batch; and the DSM continuation at the FP run's wall-clock. Bits/dim on the 256
held-out images by the probability-flow ODE (rtol 1e-3) with 4 fixed Hutchinson probes and
one fixed dequantisation (the same for every model, so the per-image differences are paired).

Budget
------
Timed at one torch thread on the 2-core machine while other jobs ran on it (load average
2-3), a few steps or evaluations of each kind (``COST``): an MLP DSM step 5.3 ms, an FP step
13.5-22.7 ms (div 18.7, laplacian 14.6, scalar 13.5, combined 22.7); pretraining converged
in 8500-9000 steps on mix2 and gmm32 (50-60 s); one evaluation of a vector model 3.9-5 s
(NLL 0.6-1.9 with 80-180 right-hand sides, residual and conservativity 0.8, samples 1.6-2.1);
digits: a DSM step 0.16 s, an FP step 0.41 s, bits/dim 0.36 s per ODE right-hand side per 32
images (92 right-hand sides on the trial checkpoint), 200 sampling steps for 64 images 22 s.
``estimate_seconds`` extrapolates to the settings; for the defaults: a vector task (one data
set and seed: pretraining, 16 fine-tunes, the equal-time run, about 21 evaluations) 4.7 min,
20 tasks 95 worker-minutes; digits 46 worker-minutes (pretraining 9, each of 2 seeds 18: FP
and DSM fine-tunes, the equal-time run, 3 bits/dim evaluations of 4.5 min); in all about 140
worker-minutes, about 71 minutes on 2 workers (the digits chain, about 35 minutes, runs
beside the vector tasks and takes precedence when ready). The estimate is printed at the
start and written to the md beside the measured total and per-phase worker-seconds. A
pretraining that runs to the cap (12000 steps) adds 0.3 min per task; a more loaded machine
runs slower. Measured (the committed run, experiments/results/fp_study.md): 97.4 minutes
and 189 worker-minutes. The steps ran slower than COST says (a DSM step 7.7 ms, FP steps
3.4-4.3x that), so the run overran the 90-minute budget by 8%. ``--ft-steps 400`` or
``--alphas`` without 1e-5 would bring it back under.

Outputs in --out: fp_study.json (every number, the command, git commit, machine, per-phase and
total times), fp_study.md (tables with CIs, the convergence judgement, the calibration, a
verdict worded from the numbers), fp_study.png (figures), fp_study_digits.png (samples).
A --quick run is labelled "QUICK SMOKE RUN: concludes nothing" in both.

``train`` and ``ring_mixture`` are kept with their version-1 signatures for
experiments/density_likelihood.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing as mp
import queue as queue_mod
import shlex
import shutil
import statistics
import sys
import time
import types
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_samplers import mean_ci  # noqa: E402  (95% t-intervals over seeds)
from provenance import git, machine  # noqa: E402  (experiments/provenance.py)

from fpkern.data.images import load_image_dataset  # noqa: E402
from fpkern.data.mixture import GaussianMixture  # noqa: E402
from fpkern.data.toy2d import EIGHT_GAUSSIANS_CENTRES, EIGHT_GAUSSIANS_STD, TOY_SETS  # noqa: E402
from fpkern.diagnostics import (conservativity_profile, mmd, ode_sde_gap,  # noqa: E402
                                residual_profile, sliced_wasserstein)
from fpkern.likelihood import bits_per_dim, dequantize_to_range, log_likelihood  # noqa: E402
from fpkern.losses import DSMLoss, FPLoss  # noqa: E402
from fpkern.models import MLP, ScoreFn  # noqa: E402
from fpkern.models.presets import from_preset, get_config, sde_from_config  # noqa: E402
from fpkern.sampling import sample  # noqa: E402
from fpkern.sde import VPSDE  # noqa: E402

log = logging.getLogger("fp_study")

DATASETS = ("mix2", "checkerboard", "gmm8", "gmm32")
GMM_SEEDS = {"gmm8": 8, "gmm32": 32}
#: Exact -log q_0 of the checkerboard: uniform on 8 cells of 2x2 (area 32), toy2d docstring.
CHECKERBOARD_NLL = math.log(32.0)
#: Largest D with the exact divergence in the NLL; above it Hutchinson with fixed probes.
EXACT_DIV_MAX_DIM = 8
RESIDUAL_TIMES = (1e-3, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
IMAGE_TIMES = (0.01, 0.1, 0.5, 1.0)
FORMS = ("div", "laplacian")
QUICK_LABEL = "QUICK SMOKE RUN: concludes nothing"
HELDOUT_EPS = 1e-5


# ==== version-1 helpers kept for experiments/density_likelihood.py ===========================
def ring_mixture() -> GaussianMixture:
    """8 equal isotropic Gaussians on a ring (the 8gaussians geometry), float64."""
    return GaussianMixture(torch.ones(8, dtype=torch.float64),
                           EIGHT_GAUSSIANS_CENTRES.double(), EIGHT_GAUSSIANS_STD)


def train(score_fn: ScoreFn, sde, sample_batch, *, alpha: float, beta: float, steps: int,
          lr: float, fp_batch: int | None, ema_decay: float, seed: int, desc: str,
          ema: ScoreFn | None = None, phase: int = 0):
    """Version 1's loop (kept for experiments/density_likelihood.py): Adam on mean(DSM) +
    alpha L_vec + beta L_scalar (paper normalisation, div form); returns (EMA score_fn,
    ms/step, last loss). ema: continue this EMA copy (full decay from the first step)."""
    net = score_fn.net
    warm = ema is None
    ema = copy.deepcopy(score_fn).requires_grad_(False) if warm else ema
    g_data, g_dsm, g_fp = (torch.Generator().manual_seed(seed * 1000 + 10 * phase + k)
                           for k in (1, 2, 3))
    dsm = DSMLoss(sde)
    fp = (FPLoss(sde, alpha=alpha, beta=beta, method="fused", form="div", batch=fp_batch)
          if alpha > 0 or beta > 0 else None)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    times, loss = [], float("nan")
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        t0 = time.perf_counter()
        x = sample_batch(g_data)
        d = dsm(score_fn, x, generator=g_dsm)
        total = d.loss.mean()
        if fp is not None:
            total = total + fp(score_fn, x, dsm=d, generator=g_fp).loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step)) if warm else ema_decay
            for pe, p in zip(ema.net.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        times.append(time.perf_counter() - t0)
        loss = float(total.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
    steady = sorted(times[min(10, len(times) - 1):])
    return ema.eval(), 1e3 * steady[len(steady) // 2], loss


# ==== data ===================================================================================
class Data(NamedTuple):
    name: str
    dim: int
    sample: Callable          # (n, generator) -> float32 [n, D]
    mixture: GaussianMixture | None


def make_data(name: str) -> Data:
    if name == "checkerboard":
        return Data(name, 2, lambda n, g: TOY_SETS["checkerboard"](n, generator=g).float(), None)
    if name == "mix2":
        gm = ring_mixture()
    elif name in GMM_SEEDS:
        gm = GaussianMixture.random(8, int(name[3:]), spread=1.0,
                                    generator=torch.Generator().manual_seed(GMM_SEEDS[name]))
    else:
        raise ValueError(f"unknown data set {name!r}; valid: {DATASETS}")
    return Data(name, gm.dim, lambda n, g: gm.sample(n, generator=g).float(), gm)


def exact_nll(data: Data, x: torch.Tensor) -> float:
    """Mean exact -log q_0(x) of held-out points, nats per dimension."""
    if data.mixture is None:
        return CHECKERBOARD_NLL / data.dim
    return float(-data.mixture.log_prob(x.double()).mean() / data.dim)


def _seed(*parts) -> int:
    """A 31-bit seed from names: the same (data set, seed, role) gives the same stream."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


# ==== configs ================================================================================
class Config(NamedTuple):
    key: str
    label: str
    alpha: float
    beta: float
    form: str
    scalar: str
    normalize: str

    def fp(self, sde, args, batch=None) -> FPLoss | None:
        if self.alpha == 0 and self.beta == 0:
            return None
        return FPLoss(sde, alpha=self.alpha, beta=self.beta, form=self.form, scalar=self.scalar,
                      normalize=self.normalize, method="fused", probes=args.fp_probes,
                      batch=args.fp_batch if batch is None else batch)

    def alpha_dim(self, D: int) -> float:
        """alpha in the per-dimension scale (docs/MATH.md 4: alpha_dim = alpha_paper / D)."""
        return self.alpha if self.normalize == "dim" else self.alpha / D


def make_configs(args) -> list[Config]:
    cfgs = [Config("dsm", "DSM only (alpha 0, beta 0)", 0.0, 0.0, "div", "paper", "dim")]
    for form in args.forms:
        for a in args.alphas:
            cfgs.append(Config(f"{form}:{a:g}", f"{form}, alpha {a:g}", a, 0.0, form, "paper", "dim"))
    if args.beta_paper > 0:
        cfgs.append(Config("scalar_paper", f"scalar 'paper', beta {args.beta_paper:g}", 0.0,
                           args.beta_paper, "div", "paper", "dim"))
    if args.beta_consistent > 0:
        cfgs.append(Config("scalar_consistent", f"scalar 'consistent', beta {args.beta_consistent:g}",
                           0.0, args.beta_consistent, "div", "consistent", "dim"))
    if args.combined:
        cfgs.append(Config("paper", f"paper's objective: alpha {args.combined_alpha:g} (paper "
                           f"normalisation), beta {args.combined_beta:g} (paper scalar), div",
                           args.combined_alpha, args.combined_beta, "div", "paper", "paper"))
    return cfgs


# ==== training ===============================================================================
class State:
    """A training run: live network, EMA copy, optimiser, the three generators, step count."""

    def __init__(self, score, ema, opt, gens, step=0):
        self.score, self.ema, self.opt = score, ema, opt
        self.g_data, self.g_dsm, self.g_fp = gens
        self.step = step
        self.times: list[float] = []
        self.diverged: int | None = None


def step_loss(score, x, dsm: DSMLoss, fp: FPLoss | None, g_dsm, g_fp) -> torch.Tensor:
    """mean DSM + FP terms with the DSM's (t, z) from g_dsm and the FP probes from g_fp, so
    that runs with different FP terms see the same DSM noise. In the div form the DSM term
    takes its score from the FP pass (what FPLoss.with_dsm does, which takes one generator)."""
    t, xt, z, std = dsm.perturb(x, generator=g_dsm)
    if fp is None:
        return dsm.from_score(score(xt, t), t, xt, z, std).loss.mean()
    B = x.shape[0]
    if fp.shares_dsm_forward():
        n = B if fp.batch is None else min(fp.batch, B)
        terms = fp._terms(score, xt[:n], t[:n], None, g_fp)
        s = terms.score if n == B else torch.cat([terms.score, score(xt[n:], t[n:])])
        d, f = dsm.from_score(s, t, xt, z, std), fp._output(terms, t[:n])
    else:
        d = dsm.from_score(score(xt, t), t, xt, z, std)
        f = fp(score, x, dsm=d, generator=g_fp)
    return d.loss.mean() + f.loss


def run_steps(st: State, steps: int, batch_fn, dsm, fp, *, ema_decay: float, warm_ema: bool,
              lr: float, warmup: int = 0, clip: float = 1.0, hook=None) -> None:
    """steps optimiser steps on st (stops early, marking st.diverged, on a non-finite loss)."""
    params = [p for p in st.score.parameters() if p.requires_grad]
    for _ in range(steps):
        if st.diverged is not None:
            return
        t0 = time.perf_counter()
        if warmup:
            for pg in st.opt.param_groups:
                pg["lr"] = lr * min(1.0, (st.step + 1) / warmup)
        x = batch_fn(st.g_data)
        loss = step_loss(st.score, x, dsm, fp, st.g_dsm, st.g_fp)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(float(loss.detach())):
            st.diverged = st.step
            return
        torch.nn.utils.clip_grad_norm_(params, clip)
        st.opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + st.step) / (10 + st.step)) if warm_ema else ema_decay
            for pe, p in zip(st.ema.parameters(), st.score.parameters()):
                pe.lerp_(p, 1 - decay)
        st.step += 1
        st.times.append(time.perf_counter() - t0)
        if hook is not None:
            hook(st)


def median_ms(times: list[float], skip: int = 10) -> float:
    steady = times[min(skip, max(len(times) - 1, 0)):]
    return 1e3 * statistics.median(steady) if steady else float("nan")


def checkpoint(st: State) -> dict:
    return {"net": copy.deepcopy(st.score.state_dict()), "ema": copy.deepcopy(st.ema.state_dict()),
            "opt": copy.deepcopy(st.opt.state_dict()), "step": st.step}


def restore(ck: dict, make_score, lr: float, gens) -> State:
    score = make_score()
    score.load_state_dict(ck["net"])
    ema = make_score().requires_grad_(False)
    ema.load_state_dict(ck["ema"])
    opt = torch.optim.Adam(score.parameters(), lr=lr)
    opt.load_state_dict(ck["opt"])
    for pg in opt.param_groups:
        pg["lr"] = lr
    return State(score.train(), ema, opt, gens, step=ck["step"])


# ---- held-out DSM and the convergence judgement -----------------------------------------------
def heldout_set(sde, x: torch.Tensor, g: torch.Generator) -> dict:
    """Fixed (x_t, t, z, sigma, w) for the held-out DSM: t log-uniform on [1e-5, T] with
    importance weights w = p_uniform / p_loguniform, so mean(w * loss) is unbiased for the
    uniform-t training objective."""
    n = x.shape[0]
    lo, hi = math.log(HELDOUT_EPS), math.log(sde.T)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = torch.exp(lo + (hi - lo) * u)
    w = t * (hi - lo) / (sde.T - HELDOUT_EPS)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    t = t.to(x.dtype)
    mean, std = sde.marginal_prob(x, t)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return {"xt": mean + std.reshape(shape) * z, "t": t, "z": z, "std": std, "w": w}


def heldout_dsm(score, dsm: DSMLoss, H: dict, chunk: int = 1024) -> float:
    vals = []
    with torch.no_grad():
        for i in range(0, H["t"].shape[0], chunk):
            sl = slice(i, i + chunk)
            s = score(H["xt"][sl], H["t"][sl])
            d = dsm.from_score(s.to(H["xt"].dtype), H["t"][sl], H["xt"][sl], H["z"][sl], H["std"][sl])
            vals.append(d.loss.double() * H["w"][sl])
    return float(torch.cat(vals).mean())


def converged_at(curve: list, *, window: int, rtol: float, min_step: int) -> int | None:
    """Index of the first evaluation at which the best held-out value improved by at most
    rtol (relative) over the last `window` evaluations, at a step >= min_step; None if none.
    curve: [(step, value), ...]."""
    for k in range(window, len(curve)):
        if curve[k][0] < min_step:
            continue
        before = min(v for _, v in curve[:k - window + 1])
        now = min(v for _, v in curve[:k + 1])
        if before - now <= rtol * abs(before):
            return k
    return None


def pretrain(st: State, batch_fn, dsm, H, *, eval_every: int, window: int, rtol: float,
             min_steps: int, max_steps: int, ema_decay: float, lr: float, warmup: int = 0,
             tick=None) -> dict:
    """DSM until converged_at() says flat or max_steps; returns the judgement and the curve."""
    curve = []
    k = None
    while st.step < max_steps:
        run_steps(st, min(eval_every, max_steps - st.step), batch_fn, dsm, None,
                  ema_decay=ema_decay, warm_ema=True, lr=lr, warmup=warmup)
        if st.diverged is not None:
            raise FloatingPointError(f"DSM pretraining diverged at step {st.diverged}")
        curve.append((st.step, heldout_dsm(st.ema, dsm, H)))
        if tick is not None:
            tick()
        k = converged_at(curve, window=window, rtol=rtol, min_step=min_steps)
        if k is not None:
            break
    out = {"curve": curve, "converged": k is not None, "cap_hit": k is None,
           "steps": st.step, "final": curve[-1][1] if curve else float("nan"),
           "ms_per_step": median_ms(st.times)}
    if k is not None:
        before = min(v for _, v in curve[:k - window + 1])
        out["last_window_rel_improvement"] = (before - min(v for _, v in curve)) / abs(before)
    elif len(curve) > window:
        before = min(v for _, v in curve[:len(curve) - window])
        out["last_window_rel_improvement"] = (before - min(v for _, v in curve)) / abs(before)
    return out


# ---- calibration -------------------------------------------------------------------------------
def _grad_norm(loss, params) -> float:
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None))


def calibrate(score, sde, batch_fn, args, *, fp_batch: int, batches: int, g) -> dict:
    """Gradient norms and values of every loss term at the checkpoint's raw weights, median
    over `batches` batches (the FP terms' gradients are heavy-tailed in t): the scale each
    knob multiplies."""
    dsm = DSMLoss(sde)
    mk = lambda **kw: FPLoss(sde, method="fused", probes=args.fp_probes, batch=fp_batch,  # noqa: E731
                             normalize="dim", **kw)
    terms = {"vec_div": mk(alpha=1.0, beta=0.0, form="div"),
             "vec_laplacian": mk(alpha=1.0, beta=0.0, form="laplacian"),
             "scalar_paper": mk(alpha=0.0, beta=1.0, scalar="paper"),
             "scalar_consistent": mk(alpha=0.0, beta=1.0, scalar="consistent")}
    params = [p for p in score.parameters() if p.requires_grad]
    acc = {k: {"grad": [], "value": []} for k in ("dsm", *terms)}
    for _ in range(batches):
        x = batch_fn(g)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        d = dsm(score, x, generator=torch.Generator().manual_seed(seed))
        acc["dsm"]["value"].append(float(d.loss.mean().detach()))
        acc["dsm"]["grad"].append(_grad_norm(d.loss.mean(), params))
        for k, fp in terms.items():
            d = dsm(score, x, generator=torch.Generator().manual_seed(seed))
            f = fp(score, x, dsm=d, generator=torch.Generator().manual_seed(seed + 1))
            acc[k]["value"].append(float((f.vec.mean() if fp.alpha > 0 else f.scalar).detach()))
            acc[k]["grad"].append(_grad_norm(f.loss, params))
    out = {k: {"grad": statistics.median(v["grad"]), "value": statistics.median(v["value"]),
               "grad_batches": v["grad"]} for k, v in acc.items()}
    gd = out["dsm"]["grad"]
    for k in terms:
        out[k]["grad_ratio"] = out[k]["grad"] / gd if gd > 0 else float("nan")
    return out


def strength(cfg: Config, cal: dict, D: int) -> float:
    """knob x |grad term| / |grad DSM| summed over the config's terms (a scale, not the norm
    of the combined gradient)."""
    s = 0.0
    if cfg.alpha > 0:
        s += cfg.alpha_dim(D) * cal[f"vec_{cfg.form}"]["grad_ratio"]
    if cfg.beta > 0:
        s += cfg.beta * cal[f"scalar_{cfg.scalar}"]["grad_ratio"]
    return s


# ==== evaluation (vector data) ===============================================================
def eval_sets(data: Data, sde, args) -> dict:
    """Held-out sets fixed per data set (the same for every seed)."""
    g = _gen(data.name, "eval", args.eval_seed)
    x_nll, x_prof, x_ref = (data.sample(n, g) for n in (args.n_nll, args.n_prof, args.n_samples))
    z = torch.cat([x_ref[:500], data.sample(500, g)]).double()
    d2 = torch.cdist(z, z).pow(2)
    bw = float(d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), 1)].median().sqrt())
    probes = None
    if data.dim > EXACT_DIV_MAX_DIM:
        probes = (torch.randint(0, 2, (args.nll_probes, *x_nll.shape), generator=g)
                  .to(x_nll.dtype) * 2 - 1)
    x_dsm = data.sample(args.n_heldout_dsm, g)
    return {"x_nll": x_nll, "x_prof": x_prof, "x_ref": x_ref, "bandwidth": bw,
            "nll_probes": probes, "nll_exact": exact_nll(data, x_nll),
            "heldout": heldout_set(sde, x_dsm, g)}


def _geomean(v) -> float:
    return float(torch.tensor(v, dtype=torch.float64).clamp_min(1e-300).log().mean().exp())


def evaluate_vec(score, sde, data: Data, ev: dict, args, *, dtype=torch.float32) -> dict:
    """Every metric of one model on the fixed held-out sets (the same generators for every
    model of a data set: paired)."""
    D = data.dim
    g = lambda k: _gen(data.name, "evalgen", args.eval_seed, k)  # noqa: E731
    out = {}
    t0 = time.perf_counter()
    ll = log_likelihood(score, sde, ev["x_nll"].to(dtype), probes=ev["nll_probes"],
                        rtol=args.ode_tol, atol=args.ode_tol)
    out["nll"] = float(-ll.logp.double().mean() / D)
    out["nll_exact"] = ev["nll_exact"]
    out["nll_excess"] = out["nll"] - out["nll_exact"]
    out["nfe_nll"] = ll.nfe
    out["t_nll_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    method = "fused" if dtype == torch.float32 else "exact"
    prof = residual_profile(score, sde, ev["x_prof"].to(dtype), args.residual_times, forms=FORMS,
                            method=method, probes=args.eval_probes, generator=g(1))
    out["residual_abs"] = {f: prof.abs[f].tolist() for f in FORMS}
    out["residual_rel"] = {f: prof.rel[f].tolist() for f in FORMS}
    out["res_div"] = float(prof.rel["div"].mean())
    out["res_lap"] = float(prof.rel["laplacian"].mean())
    out["abs_div"] = _geomean(prof.abs["div"].tolist())
    cons = conservativity_profile(score, sde, ev["x_prof"].to(dtype), args.residual_times,
                                  probes=args.eval_probes, generator=g(2))
    out["conservativity"] = cons.tolist()
    out["cons"] = float(cons.mean())
    out["t_residual_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        gap = ode_sde_gap(score, sde, args.n_samples, dim=D, steps=args.sde_steps,
                          generator=g(3), dtype=dtype, rtol=args.ode_tol, atol=args.ode_tol)
    ref, bw = ev["x_ref"].double(), ev["bandwidth"]
    ode_s, sde_s = gap.ode_samples.double(), gap.sde_samples.double()
    out["gap"] = gap.distance
    out["gap_mmd"] = mmd(ode_s, sde_s, bandwidth=bw)
    out["mmd_sde"] = mmd(sde_s, ref, bandwidth=bw)
    out["mmd_ode"] = mmd(ode_s, ref, bandwidth=bw)
    out["sw_sde"] = sliced_wasserstein(sde_s, ref, generator=g(4))
    out["sw_ode"] = sliced_wasserstein(ode_s, ref, generator=g(4))
    out["t_samples_s"] = time.perf_counter() - t0
    return out


def safe_eval(fn, *a, **kw) -> dict:
    try:
        return fn(*a, **kw)
    except (RuntimeError, FloatingPointError, ValueError) as e:     # a broken model
        return {"error": f"{type(e).__name__}: {e}"}


# ==== the tasks ==============================================================================
_PROGRESS = None      # a multiprocessing queue in workers, a callable in-process


def _init_worker(threads: int, q) -> None:
    global _PROGRESS
    torch.set_num_threads(threads)
    _PROGRESS = q


def _tick(msg: str = "") -> None:
    if _PROGRESS is None:
        return
    if callable(_PROGRESS):
        _PROGRESS(msg)
    else:
        _PROGRESS.put(msg)


class Phases:
    """Seconds per phase inside a task."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.s[name] = self.s.get(name, 0.0) + now - t0
        return now


def task_vec(spec: dict) -> dict:
    """One (data set, seed): pretrain, calibrate, fine-tune every config, equal-time DSM,
    evaluate everything."""
    args = argparse.Namespace(**spec["args"])
    name, seed = spec["dataset"], spec["seed"]
    torch.set_num_threads(args.threads)
    ph = Phases()
    t0 = time.perf_counter()
    sde = VPSDE()
    data = make_data(name)
    D = data.dim
    ev = eval_sets(data, sde, args)
    dsm = DSMLoss(sde)
    batch_fn = lambda g: data.sample(args.batch, g)  # noqa: E731
    make_score = lambda: ScoreFn(MLP(D, args.width, args.depth), sde)  # noqa: E731
    torch.manual_seed(_seed(name, seed, "init"))
    score = make_score()
    st = State(score, copy.deepcopy(score).requires_grad_(False),
               torch.optim.Adam(score.parameters(), lr=args.lr),
               [_gen(name, seed, "pre", k) for k in range(3)])
    res = {"dataset": name, "seed": seed, "dim": D, "nll_exact": ev["nll_exact"],
           "mmd_bandwidth": ev["bandwidth"],
           "nll_divergence": "exact" if ev["nll_probes"] is None else
           f"Hutchinson, {args.nll_probes} fixed Rademacher probes"}
    t0 = ph.add("setup", t0)
    conv = pretrain(st, batch_fn, dsm, ev["heldout"], eval_every=args.eval_every,
                    window=args.conv_window, rtol=args.conv_rtol,
                    min_steps=args.pretrain_min_steps, max_steps=args.pretrain_max_steps,
                    ema_decay=args.pretrain_ema, lr=args.lr)
    if data.mixture is not None:
        gm = data.mixture
        conv["oracle_floor"] = heldout_dsm(
            lambda x, t: gm.score(x.double(), t.double(), sde), dsm,
            {k: v.double() for k, v in ev["heldout"].items()})
    res["pretrain"] = conv
    ck = checkpoint(st)
    t0 = ph.add("pretrain", t0)
    _tick(f"{name} s{seed} pretrained ({conv['steps']} steps)")
    res["calibration"] = calibrate(st.score, sde, batch_fn, args, fp_batch=args.fp_batch,
                                   batches=args.calib_batches, g=_gen(name, seed, "calib"))
    t0 = ph.add("calibrate", t0)
    res["pretrained_eval"] = safe_eval(evaluate_vec, st.ema.eval(), sde, data, ev, args)
    if seed == 0 and data.mixture is not None:
        gm = data.mixture
        oracle = lambda x, t: gm.score(x.double(), t.double(), sde).to(x.dtype)  # noqa: E731
        res["oracle"] = safe_eval(evaluate_vec, oracle, sde, data, ev, args, dtype=torch.float64)
    t0 = ph.add("eval", t0)
    _tick()
    runs, dsm_state = {}, None
    for cfg in make_configs(args):
        gens = [_gen(name, seed, "ft", k) for k in range(3)]
        rs = restore(ck, make_score, args.lr, gens)
        fp = cfg.fp(sde, args)
        run_steps(rs, args.ft_steps, batch_fn, dsm, fp, ema_decay=args.ft_ema, warm_ema=False,
                  lr=args.lr)
        r = {"alpha": cfg.alpha, "beta": cfg.beta, "form": cfg.form, "scalar": cfg.scalar,
             "normalize": cfg.normalize, "alpha_dim": cfg.alpha_dim(D),
             "strength": strength(cfg, res["calibration"], D),
             "steps": rs.step - ck["step"], "train_s": sum(rs.times),
             "ms_per_step": median_ms(rs.times), "diverged_at": rs.diverged}
        t0 = ph.add("finetune", t0)
        if rs.diverged is None:
            r.update(safe_eval(evaluate_vec, rs.ema.eval(), sde, data, ev, args))
        t0 = ph.add("eval", t0)
        runs[cfg.key] = r
        if cfg.key == "dsm":
            dsm_state = rs
        _tick()
    res["runs"] = runs
    # ---- equal wall-clock: the DSM continuation run on to each FP config's time ----
    w_dsm = runs["dsm"]["train_s"]
    q = max(1, round(args.ft_steps * args.time_quantum))
    matched = {}
    for key, r in runs.items():
        if key == "dsm" or not w_dsm > 0:
            continue
        ratio = r["train_s"] / w_dsm
        n = min(args.max_time_ratio * args.ft_steps,
                max(args.ft_steps, q * round(args.ft_steps * ratio / q)))
        matched[key] = {"time_ratio": ratio, "dsm_steps": int(n)}
    targets = sorted({m["dsm_steps"] for m in matched.values()} - {args.ft_steps})
    snaps = {}

    def hook(s: State):
        if s.step - ck["step"] in targets:
            snaps[s.step - ck["step"]] = (copy.deepcopy(s.ema).eval(), sum(s.times))

    if targets and dsm_state is not None and dsm_state.diverged is None:
        run_steps(dsm_state, targets[-1] - args.ft_steps, batch_fn, dsm, None,
                  ema_decay=args.ft_ema, warm_ema=False, lr=args.lr, hook=hook)
    t0 = ph.add("equal_time", t0)
    eq = {}
    for n, (model, wall) in sorted(snaps.items()):
        eq[str(n)] = {"steps": n, "train_s": wall, **safe_eval(evaluate_vec, model, sde, data, ev, args)}
    eq[str(args.ft_steps)] = {"steps": args.ft_steps, "train_s": w_dsm,
                              **{k: v for k, v in runs["dsm"].items() if k not in ("steps", "train_s")}}
    res["equal_time"] = {"matched": matched, "dsm_runs": eq}
    ph.add("eval", t0)
    res["phase_s"] = ph.s
    _tick(f"{name} s{seed} done")
    return res


# ---- digits ------------------------------------------------------------------------------------
def image_setup(args):
    cfg = get_config(args.image_preset)
    sde = sde_from_config(cfg)
    images = load_image_dataset("digits").images
    held, train_set = images[-args.image_n_heldout:], images[:-args.image_n_heldout]

    def batch_fn(g):
        idx = torch.randint(0, train_set.shape[0], (args.image_batch,), generator=g)
        return dequantize_to_range(train_set[idx], generator=g)

    return sde, held, train_set, batch_fn


def _image_score(args, sde):
    return ScoreFn(from_preset(args.image_preset), sde)


def image_samples(score, sde, args) -> torch.Tensor:
    with torch.no_grad():
        s = sample(score, sde, (args.image_n_samples, 1, 16, 16), method="euler_maruyama",
                   steps=args.image_sde_steps, generator=_gen("digits", "samples"))
    return s.samples.clamp(-1, 1)


def evaluate_image(score, sde, held, args) -> dict:
    t0 = time.perf_counter()
    g = _gen("digits", "bpd")
    V = torch.randint(0, 2, (args.image_bpd_probes, *held.shape), generator=g).float() * 2 - 1
    b = bits_per_dim(score, sde, held, probes=V, rtol=args.image_bpd_tol, atol=args.image_bpd_tol,
                     generator=_gen("digits", "dequant"))
    out = {"bpd": float(b.bpd.double().mean()), "bpd_per_image": b.bpd.double().tolist(),
           "nfe_bpd": b.likelihood.nfe, "t_bpd_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    x_prof = dequantize_to_range(held[:args.image_n_prof], generator=_gen("digits", "prof"))
    prof = residual_profile(score, sde, x_prof, IMAGE_TIMES, forms=FORMS, method="fused",
                            probes=1, generator=_gen("digits", "profgen"))
    out["residual_rel"] = {f: prof.rel[f].tolist() for f in FORMS}
    out["residual_abs"] = {f: prof.abs[f].tolist() for f in FORMS}
    out["res_div"] = float(prof.rel["div"].mean())
    out["res_lap"] = float(prof.rel["laplacian"].mean())
    out["abs_div"] = _geomean(prof.abs["div"].tolist())
    out["samples"] = image_samples(score, sde, args)
    out["t_residual_samples_s"] = time.perf_counter() - t0
    return out


def task_image_pretrain(spec: dict) -> dict:
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    ph = Phases()
    t0 = time.perf_counter()
    sde, held, _, batch_fn = image_setup(args)
    torch.manual_seed(_seed("digits", "init"))
    score = _image_score(args, sde)
    st = State(score, copy.deepcopy(score).requires_grad_(False),
               torch.optim.Adam(score.parameters(), lr=args.image_lr),
               [_gen("digits", "pre", k) for k in range(3)])
    H = heldout_set(sde, dequantize_to_range(held, generator=_gen("digits", "heldout_x")),
                    _gen("digits", "heldout"))
    dsm = DSMLoss(sde)
    t0 = ph.add("image_setup", t0)
    conv = pretrain(st, batch_fn, dsm, H, eval_every=args.image_eval_every,
                    window=args.conv_window, rtol=args.conv_rtol,
                    min_steps=min(args.image_pretrain_steps, args.pretrain_min_steps),
                    max_steps=args.image_pretrain_steps, ema_decay=args.pretrain_ema,
                    lr=args.image_lr, warmup=args.image_warmup,
                    tick=lambda: _tick(f"digits pretraining {st.step}"))
    t0 = ph.add("image_pretrain", t0)
    cal = calibrate(st.score, sde, batch_fn, args, fp_batch=args.image_fp_batch,
                    batches=args.calib_batches, g=_gen("digits", "calib"))
    t0 = ph.add("image_calibrate", t0)
    samples = image_samples(st.ema.eval(), sde, args)
    ph.add("image_eval", t0)
    _tick("digits pretrained")
    return {"pretrain": conv, "calibration": cal, "checkpoint": checkpoint(st),
            "samples": samples, "phase_s": ph.s}


def task_image_finetune(spec: dict) -> dict:
    """One fine-tuning seed and one config ('fp' or 'dsm'); 'dsm' also runs on to the FP
    run's wall-clock (spec['fp_train_s']) and evaluates there."""
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    ph = Phases()
    t0 = time.perf_counter()
    sde, held, _, batch_fn = image_setup(args)
    ck, seed, which = spec["checkpoint"], spec["seed"], spec["config"]
    gens = [_gen("digits", seed, "ft", k) for k in range(3)]
    st = restore(ck, lambda: _image_score(args, sde), args.image_lr, gens)
    fp = None
    if which == "fp":
        fp = FPLoss(sde, alpha=args.image_alpha, beta=0.0, form=args.image_form, normalize="dim",
                    method="fused", probes=args.fp_probes, batch=args.image_fp_batch)
    dsm = DSMLoss(sde)
    run_steps(st, args.image_ft_steps, batch_fn, dsm, fp, ema_decay=args.ft_ema, warm_ema=False,
              lr=args.image_lr)
    out = {"seed": seed, "config": which, "steps": args.image_ft_steps, "train_s": sum(st.times),
           "ms_per_step": median_ms(st.times, skip=3), "diverged_at": st.diverged}
    t0 = ph.add("image_finetune", t0)
    if st.diverged is None:
        out.update(safe_eval(evaluate_image, st.ema.eval(), sde, held, args))
    t0 = ph.add("image_eval", t0)
    _tick(f"digits {which} s{seed}")
    fp_s = spec.get("fp_train_s")
    if which == "dsm" and fp_s and st.diverged is None and out["train_s"] > 0:
        ratio = fp_s / out["train_s"]
        q = max(1, round(args.image_ft_steps * args.time_quantum))
        n = min(args.max_time_ratio * args.image_ft_steps,
                max(args.image_ft_steps, q * round(args.image_ft_steps * ratio / q)))
        eq = {"time_ratio": ratio, "steps": int(n)}
        if n > args.image_ft_steps:
            run_steps(st, int(n) - args.image_ft_steps, batch_fn, dsm, None, ema_decay=args.ft_ema,
                      warm_ema=False, lr=args.image_lr)
            eq["train_s"] = sum(st.times)
            t0 = ph.add("image_equal_time", t0)
            eq.update(safe_eval(evaluate_image, st.ema.eval(), sde, held, args))
            ph.add("image_eval", t0)
        out["equal_time"] = eq
    out["phase_s"] = ph.s
    return out


# ==== scheduling =============================================================================
def run_tasks(args, tasks_vec: list[dict], bar, parts: "Parts") -> tuple[list, dict]:
    """Run the vector tasks and the digits chain on args.workers processes (in this process
    for workers = 1). The digits chain is on the critical path, so its ready tasks go first."""
    base = {"args": vars_for_workers(args)}
    ready = []            # (priority, kind, spec); lower priority runs first
    if args.images:
        ready.append((0, "image_pretrain", dict(base)))
    ready += [(1, "vec", {**base, **t}) for t in tasks_vec]
    fns = {"vec": task_vec, "image_pretrain": task_image_pretrain,
           "image_finetune": task_image_finetune}
    vec_results, image = [], {"finetune": []}

    def handle(kind, spec, res, cached=False):
        if not cached:
            parts.save(kind, spec, res)
        if kind == "vec":
            vec_results.append(res)
            log.info("%s seed %d done: %s", res["dataset"], res["seed"],
                     ", ".join(f"{k} {v:.0f} s" for k, v in res["phase_s"].items()))
        elif kind == "image_pretrain":
            image["pretrain"], image["pretrain_samples"] = res["pretrain"], res["samples"]
            image["pretrain_phase_s"] = res["phase_s"]
            image["calibration"] = res["calibration"]
            for s in range(args.image_seeds):
                ready.append((0, "image_finetune", {**base, "checkpoint": res["checkpoint"],
                                                    "seed": s, "config": "fp"}))
            image["checkpoint"] = res["checkpoint"]
        else:
            image["finetune"].append(res)
            if res["config"] == "fp":
                ready.append((0, "image_finetune", {**base, "checkpoint": image["checkpoint"],
                                                    "seed": res["seed"], "config": "dsm",
                                                    "fp_train_s": res["train_s"]}))

    def next_task():
        """The next ready task to run, after handling the ready ones --resume has saved."""
        while ready:
            ready.sort(key=lambda r: r[0])
            _, kind, spec = ready.pop(0)
            res = parts.load(kind, spec)
            if res is None:
                return kind, spec
            handle(kind, spec, res, cached=True)
            bar.update(parts.units(kind, args))
        return None

    if args.workers <= 1:
        global _PROGRESS
        _PROGRESS = lambda msg: _bar_update(bar, msg)  # noqa: E731
        try:
            while (task := next_task()) is not None:
                kind, spec = task
                handle(kind, spec, fns[kind](spec))
        finally:
            _PROGRESS = None
        return vec_results, image
    _register_self()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(args.threads, q)) as pool:
        running = {}
        while ready or running:
            while len(running) < args.workers and (task := next_task()) is not None:
                kind, spec = task
                running[pool.submit(fns[kind], spec)] = (kind, spec)
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(q, bar)
            for f in done:
                kind, spec = running.pop(f)
                handle(kind, spec, f.result())
        _drain(q, bar)
    return vec_results, image


class Parts:
    """Each finished task's result saved under --out/fp_study_parts/ (atomically, as it
    finishes), so an interrupted run keeps its work: ``--resume`` loads the parts written with
    the same settings and runs only the rest. The folder is removed once the results are
    written."""

    #: Options that do not change a task's result.
    NEUTRAL = ("out", "workers", "threads", "resume")

    def __init__(self, args):
        self.dir = Path(args.out) / "fp_study_parts"
        self.resume = args.resume
        self.settings = {k: v for k, v in vars_for_workers(args).items() if k not in self.NEUTRAL}
        self.resumed: list[str] = []

    @staticmethod
    def name(kind: str, spec: dict) -> str:
        if kind == "vec":
            return f"vec_{spec['dataset']}_{spec['seed']}"
        if kind == "image_finetune":
            return f"image_finetune_{spec['seed']}_{spec['config']}"
        return kind

    @staticmethod
    def units(kind: str, args) -> int:
        """Progress-bar units a task reports (see count_units)."""
        return len(make_configs(args)) + 3 if kind == "vec" else 1

    def save(self, kind: str, spec: dict, res: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / (self.name(kind, spec) + ".pt")
        tmp = path.with_suffix(".tmp")
        torch.save({"settings": self.settings, "result": res}, tmp)
        tmp.replace(path)

    def load(self, kind: str, spec: dict) -> dict | None:
        if not self.resume:
            return None
        path = self.dir / (self.name(kind, spec) + ".pt")
        if not path.exists():
            return None
        part = torch.load(path, weights_only=False)
        if part["settings"] != self.settings:
            diff = sorted(k for k in set(part["settings"]) | set(self.settings)
                          if part["settings"].get(k) != self.settings.get(k))
            log.warning("%s was written with other settings (%s): running it again",
                        path, ", ".join(diff))
            return None
        log.info("resumed %s", path.name)
        self.resumed.append(path.stem)
        return part["result"]

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _bar_update(bar, msg: str) -> None:
    if msg.startswith("digits pretraining"):
        bar.set_postfix_str(msg)
        return
    bar.update(1)
    if msg:
        bar.set_postfix_str(msg)


def _drain(q, bar) -> None:
    while True:
        try:
            _bar_update(bar, q.get_nowait())
        except queue_mod.Empty:
            return


def _register_self() -> None:
    """Worker processes pickle the task functions by module name: make this module findable
    under its name when it was loaded from its path (tests/conftest.py's load_experiment)."""
    if sys.modules.get(__name__) is None or getattr(sys.modules[__name__], "task_vec", None) is not task_vec:
        mod = types.ModuleType(__name__)
        mod.__dict__.update(globals())
        sys.modules[__name__] = mod


def vars_for_workers(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def count_units(args, n_tasks: int) -> int:
    n_cfg = len(make_configs(args))
    units = n_tasks * (n_cfg + 3)
    if args.images:
        units += 1 + 2 * args.image_seeds
    return units


# ==== cost model =============================================================================
#: Seconds measured at one torch thread on the 2-core machine with other jobs running (load
#: average 2-3): MLP(., 128, 3) steps at batch 256 (FP on 64 samples), one evaluation of a
#: vector model at the default sizes split into its parts, digits steps (batch 32, FP on 4)
#: and one bits/dim right-hand side per image with 4 probes (92 NFE at rtol 1e-3).
COST = {"dsm_step": 5.3e-3, "pretrain_step": 6.0e-3, "pretrain_steps": 9000,
        "fp_step": {"div": 18.7e-3, "laplacian": 14.6e-3, "scalar": 13.5e-3, "combined": 22.7e-3},
        "eval_nll": 1.4, "eval_residual": 0.9, "eval_samples": 1.8, "eval_other": 0.3,
        "snapshots": 4, "time_ratio": 4.4,
        "img_dsm_step": 0.16, "img_fp_step": 0.41, "img_rhs_per_image": 0.36 / 32, "img_nfe": 92,
        "img_forward_per_image": 0.11 / 64, "img_residual": 2.0, "img_time_ratio": 2.6}


def _kind(c: Config) -> str:
    if c.alpha > 0 and c.beta > 0:
        return "combined"
    return c.form if c.alpha > 0 else "scalar"


def estimate_seconds(args) -> dict:
    """Worker-seconds per part and the wall-clock on args.workers workers, from COST (a rough
    model: it ignores the load of the machine and the convergence step of each run)."""
    cfgs = [c for c in make_configs(args) if c.key != "dsm"]
    ev = (COST["eval_nll"] * args.n_nll / 256
          + COST["eval_residual"] * args.n_prof / 256 * len(args.residual_times) / 8
          * (1 + args.eval_probes) / 9
          + COST["eval_samples"] * args.n_samples / 1000 * (args.sde_steps + 100) / 350
          + COST["eval_other"])
    pre = min(args.pretrain_max_steps, max(args.pretrain_min_steps, COST["pretrain_steps"]))
    ratio = min(args.max_time_ratio, COST["time_ratio"] if cfgs else 1.0)
    n_snap = min(COST["snapshots"], len(cfgs))
    per_task = (pre * COST["pretrain_step"]
                + args.ft_steps * (COST["dsm_step"] + sum(COST["fp_step"][_kind(c)] for c in cfgs))
                + (ratio - 1) * args.ft_steps * COST["dsm_step"]
                + (len(cfgs) + 2 + n_snap) * ev)
    n_mix = sum(d != "checkerboard" for d in args.datasets)
    vec = per_task * len(args.datasets) * args.seeds + n_mix * ev
    img = chain = 0.0
    if args.images:
        n = args.image_n_heldout
        im_ev = (COST["img_rhs_per_image"] * n * COST["img_nfe"] * (1 + args.image_bpd_probes) / 5
                 + COST["img_residual"]
                 + COST["img_forward_per_image"] * args.image_n_samples * args.image_sde_steps)
        samp = COST["img_forward_per_image"] * args.image_n_samples * args.image_sde_steps
        pre_img = args.image_pretrain_steps * COST["img_dsm_step"] * 1.03 + samp + 10
        r = min(args.max_time_ratio, COST["img_time_ratio"])
        fp = args.image_ft_steps * COST["img_fp_step"] + im_ev
        dsm = args.image_ft_steps * COST["img_dsm_step"] * r + (2 if r > 1 else 1) * im_ev
        img = pre_img + args.image_seeds * (fp + dsm)
        chain = pre_img + fp + dsm + per_task     # a worker may first finish a vector task
    total = vec + img
    wall = max(total / max(1, args.workers), chain) + 15 + (20 if args.workers > 1 else 0)
    return {"vector_worker_s": vec, "images_worker_s": img, "total_worker_s": total,
            "per_vector_task_s": per_task, "eval_per_model_s": ev, "wall_s": wall}


# ==== aggregation ============================================================================
#: metric -> (label, kind): kind 'diff' compares by the difference, 'log' by the log10 ratio.
METRICS = {
    "nll_excess": ("NLL - exact (nats/dim)", "diff"),
    "sw_sde": ("SW2 SDE samples", "diff"),
    "mmd_sde": ("MMD^2 SDE samples", "diff"),
    "sw_ode": ("SW2 ODE samples", "diff"),
    "mmd_ode": ("MMD^2 ODE samples", "diff"),
    "gap": ("ODE-SDE gap (SW2)", "log"),
    "gap_mmd": ("ODE-SDE gap (MMD^2)", "diff"),
    "res_div": ("rel. residual div", "log"),
    "res_lap": ("rel. residual lap", "log"),
    "cons": ("non-conservativity", "log"),
    "ms_per_step": ("ms/step", "log"),
}


def _ci(values) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    m, h = mean_ci(vals)
    return {"mean": m, "ci": h, "lo": m - h, "hi": m + h, "n": len(vals), "values": vals}


def _get(run: dict | None, key: str):
    if run is None or "error" in run or run.get(key) is None:
        return None
    v = run[key]
    return float(v) if isinstance(v, (int, float)) else None


def _compare(runs_c: list, runs_b: list) -> dict:
    """Per metric: the config's own values, and the paired difference (and log10 ratio) to
    the baseline runs of the same seeds."""
    out = {}
    for m, (_, kind) in METRICS.items():
        a = [_get(r, m) for r in runs_c]
        b = [_get(r, m) for r in runs_b]
        diff = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
        entry = {"abs": _ci(a), "diff": _ci(diff)}
        if kind == "log":
            lr = [math.log10(x / y) if x is not None and y is not None and x > 0 and y > 0 else None
                  for x, y in zip(a, b)]
            entry["log10_ratio"] = _ci(lr)
        out[m] = entry
    return out


def _slope(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def summarize(args, vec_results: list) -> dict:
    cfgs = make_configs(args)
    out = {}
    for name in args.datasets:
        rs = sorted((r for r in vec_results if r["dataset"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        base = [r["runs"]["dsm"] for r in rs]
        steps = {c.key: _compare([r["runs"][c.key] for r in rs], base) for c in cfgs}
        eq = {}
        for c in cfgs:
            if c.key == "dsm":
                continue
            bm = []
            for r in rs:
                m = r["equal_time"]["matched"].get(c.key)
                bm.append(r["equal_time"]["dsm_runs"].get(str(m["dsm_steps"])) if m else None)
            eq[c.key] = _compare([r["runs"][c.key] for r in rs], bm)
            eq[c.key]["dsm_steps"] = _ci([r["equal_time"]["matched"].get(c.key, {}).get("dsm_steps")
                                          for r in rs])
            eq[c.key]["time_ratio"] = _ci([r["equal_time"]["matched"].get(c.key, {}).get("time_ratio")
                                           for r in rs])
        slopes = {}
        for form in args.forms:
            keys = [f"{form}:{a:g}" for a in args.alphas]
            xs = [math.log10(a) for a in args.alphas]
            sl = {}
            for m, tr in (("gap", "log10"), ("gap_mmd", "raw"), ("sw_sde", "raw"),
                          ("mmd_sde", "raw"), ("nll_excess", "raw")):
                per_seed = []
                for r in rs:
                    ys = [_get(r["runs"][k], m) for k in keys]
                    if tr == "log10":
                        ys = [math.log10(y) if y is not None and y > 0 else None for y in ys]
                    per_seed.append(_slope(xs, ys))
                sl[m if tr == "raw" else f"log10_{m}"] = _ci(per_seed)
            slopes[form] = sl
        profiles = {}
        for c in cfgs:
            per = [r["runs"][c.key].get("residual_rel") for r in rs]
            per = [q for q in per if q]
            if per:
                profiles[c.key] = {f: [_geomean([q[f][i] for q in per])
                                       for i in range(len(args.residual_times))] for f in FORMS}
        conv = [r["pretrain"] for r in rs]
        out[name] = {"dim": rs[0]["dim"], "seeds": [r["seed"] for r in rs],
                     "nll_exact": rs[0]["nll_exact"], "nll_divergence": rs[0]["nll_divergence"],
                     "equal_steps": steps, "equal_time": eq, "alpha_slopes": slopes,
                     "profiles_geomean": profiles,
                     "pretrain": {"steps": _ci([c["steps"] for c in conv]),
                                  "cap_hit": sum(bool(c["cap_hit"]) for c in conv),
                                  "final": _ci([c["final"] for c in conv]),
                                  "oracle_floor": conv[0].get("oracle_floor"),
                                  "nll_excess_pretrained": _ci([_get(r["pretrained_eval"], "nll_excess")
                                                                for r in rs])},
                     "calibration": {k: {"grad_ratio": _ci([r["calibration"][k].get("grad_ratio")
                                                            for r in rs]),
                                         "value": _ci([r["calibration"][k]["value"] for r in rs]),
                                         "grad": _ci([r["calibration"][k]["grad"] for r in rs])}
                                     for k in rs[0]["calibration"]},
                     "strength": {c.key: _ci([r["runs"][c.key]["strength"] for r in rs])
                                  for c in cfgs},
                     "oracle": next((r["oracle"] for r in rs if "oracle" in r), None)}
    return out


def summarize_images(args, image: dict) -> dict:
    if not image or "pretrain" not in image:
        return {}
    ft = image["finetune"]
    out = {"pretrain": image["pretrain"], "calibration": image.get("calibration"),
           "runs": [{k: v for k, v in r.items() if k != "samples"} for r in ft]}
    for r in out["runs"]:
        if "equal_time" in r:
            r["equal_time"] = {k: v for k, v in r["equal_time"].items() if k != "samples"}
    pairs = []
    for s in range(args.image_seeds):
        fp = next((r for r in ft if r["seed"] == s and r["config"] == "fp"), None)
        dm = next((r for r in ft if r["seed"] == s and r["config"] == "dsm"), None)
        if fp is None or dm is None or "bpd_per_image" not in fp or "bpd_per_image" not in dm:
            continue
        p = {"seed": s, "bpd_fp": fp["bpd"], "bpd_dsm": dm["bpd"],
             "per_image_diff": _ci([a - b for a, b in zip(fp["bpd_per_image"], dm["bpd_per_image"])]),
             "res_div_ratio": fp["res_div"] / dm["res_div"], "time_ratio": fp["train_s"] / dm["train_s"]}
        eqr = dm.get("equal_time", {})
        if "bpd_per_image" in eqr:
            p["equal_time_steps"] = eqr["steps"]
            p["bpd_dsm_equal_time"] = eqr["bpd"]
            p["per_image_diff_equal_time"] = _ci([a - b for a, b in zip(fp["bpd_per_image"],
                                                                        eqr["bpd_per_image"])])
        pairs.append(p)
    out["pairs"] = pairs
    out["seed_diff"] = _ci([p["bpd_fp"] - p["bpd_dsm"] for p in pairs])
    out["seed_diff_equal_time"] = _ci([p["bpd_fp"] - p["bpd_dsm_equal_time"] for p in pairs
                                       if "bpd_dsm_equal_time" in p])
    return out


# ==== reports ================================================================================
def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}"


def _cell(e: dict, kind: str) -> str:
    """mean [lo, hi] of a paired comparison; bold when the interval excludes 0."""
    src = e["log10_ratio"] if kind == "log" else e["diff"]
    if src["n"] == 0:
        return "—"
    m, lo, hi = src["mean"], src["lo"], src["hi"]
    star = src["n"] > 1 and (lo > 0 or hi < 0)
    if kind == "log":
        s = f"x{10 ** m:.3g} [{10 ** lo:.3g}, {10 ** hi:.3g}]"
    else:
        s = f"{m:+.3g} [{lo:+.3g}, {hi:+.3g}]"
    return f"**{s}**" if star else s


def _sign(src: dict) -> int:
    """+1 / -1 when the 95% interval lies above / below 0, else 0."""
    if src["n"] < 2:
        return 0
    return 1 if src["lo"] > 0 else -1 if src["hi"] < 0 else 0


def _iv(src: dict, unit: str = "", log: bool = False) -> str:
    if log:
        return (f"x{10 ** src['mean']:.3g} [{10 ** src['lo']:.3g}, {10 ** src['hi']:.3g}]")
    return f"{src['mean']:+.3g} [{src['lo']:+.3g}, {src['hi']:+.3g}]{unit}"


def verdict(args, summary: dict, images: dict) -> list[str]:
    """Sentences computed from the intervals (so a re-run rewrites them)."""
    L = []
    cfgs = [c for c in make_configs(args) if c.key != "dsm"]
    n_help = n_hurt = n_cells = 0
    helped = []
    for name, s in summary.items():
        n = len(s["seeds"])
        base = s["equal_steps"]["dsm"]["nll_excess"]["abs"]
        L.append(f"- **{name}** (D = {s['dim']}, {n} seeds): the DSM-only continuation has NLL - "
                 f"exact {base['mean']:.4g} ± {base['ci']:.2g} nats/dim.")
        for what, table in (("equal steps", s["equal_steps"]), ("equal wall-clock", s["equal_time"])):
            rows = [(c, table[c.key]["nll_excess"]["diff"]) for c in cfgs if c.key in table]
            rows = [(c, d) for c, d in rows if d["n"] > 0]
            if not rows:
                continue
            best = min(rows, key=lambda r: r[1]["mean"])
            tag = lambda c: f"{c.key} (strength {s['strength'][c.key]['mean']:.2g})"  # noqa: E731
            below = [tag(c) for c, d in rows if _sign(d) < 0]
            above = [tag(c) for c, d in rows if _sign(d) > 0]
            if what == "equal steps":
                n_cells += len(rows)
                n_help += len(below)
                n_hurt += len(above)
                helped += [f"{name}/{k}" for k in below]
            L_best = best[0].key
            L.append(f"  - {what}: lowest mean difference {L_best}: "
                     f"{_iv(best[1], ' nats/dim')}; interval below 0 for "
                     f"{len(below)} of {len(rows)} configs ({', '.join(below) or 'none'}), above 0 "
                     f"for {len(above)} ({', '.join(above) or 'none'}).")
        for form, sl in s["alpha_slopes"].items():
            g, sw, mm = sl["log10_gap"], sl["sw_sde"], sl["mmd_sde"]
            if g["n"] == 0:
                continue
            L.append(f"  - Deveney et al. test, {form} form: slope per decade of alpha of "
                     f"log10(gap) {_iv(g)} (gap x{10 ** g['mean']:.3g} per decade); of SDE SW2 "
                     f"{_iv(sw)}; of SDE MMD^2 {_iv(mm)}. "
                     + ("Gap falls with alpha (interval below 0). " if _sign(g) < 0 else
                        "Gap rises with alpha (interval above 0). " if _sign(g) > 0 else
                        "No trend of the gap detected (interval contains 0). ")
                     + ("SDE SW2 rises with alpha (interval above 0)." if _sign(sw) > 0 else
                        "SDE SW2 falls with alpha (interval below 0)." if _sign(sw) < 0 else
                        "No trend of SDE SW2 detected (interval contains 0)."))
    L.insert(0, f"Across the data sets, at equal steps the NLL - exact difference to the DSM-only "
                f"continuation has its 95% interval below 0 (FP better) in {n_help} of {n_cells} "
                f"(data set, config) cells and above 0 (FP worse) in {n_hurt}"
                + (f"; the cells below 0: {', '.join(helped)}." if helped else "."))
    if images.get("pairs"):
        sd = images["seed_diff"]
        p = images["pairs"][0]
        L.append(f"- **digits**: FP (alpha {args.image_alpha:g}, {args.image_form}) minus DSM-only, "
                 "bits/dim: per seed " + ", ".join(f"{q['bpd_fp'] - q['bpd_dsm']:+.4f}"
                                                    for q in images["pairs"])
                 + (f" (mean {_iv(sd)} over {sd['n']} seeds)" if sd["n"] > 1 else
                    " (one seed: no interval over seeds)")
                 + f"; seed {p['seed']}'s per-image interval (evaluation noise only) "
                 f"{_iv(p['per_image_diff'])}"
                 + (f"; at equal wall-clock (DSM {p['equal_time_steps']} steps) "
                    f"{_iv(p['per_image_diff_equal_time'])}" if "per_image_diff_equal_time" in p else "")
                 + ".")
    return L


def write_markdown(results: dict, args, path: Path) -> None:
    quick = results["quick"]
    S, IM = results["summary"], results.get("images_summary", {})
    cfgs = make_configs(args)
    L = ["# FP regulariser study v2 (issue 17, item 3)", ""]
    if quick:
        L += [f"**{QUICK_LABEL}.** Tiny settings: the numbers test the pipeline, not the method.", ""]
    est = results["estimate"]
    L += [f"Command: `{results['command']}`  ",
          f"Commit: `{results['git_commit']}`{' (dirty tree)' if results['git_dirty'] else ''}; "
          f"machine: {results['machine']['summary']}; {args.workers} worker process(es) x "
          f"{args.threads} torch thread(s).  ",
          f"Total {results['total_s'] / 60:.1f} min wall-clock (estimated beforehand "
          f"{est['wall_s'] / 60:.1f} min). Worker-seconds per phase: "
          + ", ".join(f"{k} {v:.0f}" for k, v in results["phase_worker_s"].items()) + ".", ""]
    if results.get("resumed_tasks"):
        L += [f"Resumed (`--resume`) from an interrupted run with the same settings: "
              f"{', '.join(results['resumed_tasks'])}; the wall-clock total covers this run "
              f"only, the worker-seconds every task.", ""]
    L += ["## Set-up", "",
          f"VP SDE; MLP(D, {args.width}, {args.depth}) noise-prediction network in ScoreFn; EMA "
          f"weights evaluated. DSM pretraining per (data set, seed): Adam lr {args.lr}, clip 1, "
          f"batch {args.batch}, EMA {args.pretrain_ema}. Fine-tuning from that checkpoint "
          f"(weights, EMA, Adam state): {args.ft_steps} steps per config, EMA {args.ft_ema}, the "
          f"same data, DSM-noise and probe generators for every config. FP terms fused, "
          f"{args.fp_probes} Rademacher probe(s), on the first {args.fp_batch} samples of each "
          f"batch, likelihood weighting w = g^2. Seeds: {args.seeds}; every comparison is paired "
          f"by seed against the DSM-only continuation ('dsm'), mean and 95% t-interval over "
          f"seeds; **bold** when the interval excludes 0 (difference) or 1 (ratio).", "",
          f"Metrics (lower is better): NLL by the probability-flow ODE (rtol = atol = "
          f"{args.ode_tol}) on {args.n_nll} held-out points minus the exact -log q_0, nats/dim; "
          f"relative residual E|r|^2/E|d_t s|^2 averaged over t in {list(args.residual_times)} "
          f"(fused, {args.eval_probes} probes); non-conservativity E|Jv-J^T v|^2/E|Jv|^2 averaged "
          f"over the same t ({args.eval_probes} probes); ODE-SDE gap = SW2 between "
          f"{args.n_samples} probability-flow and reverse-SDE ({args.sde_steps} Euler-Maruyama "
          f"steps) samples from the same x_T; MMD^2 (RBF, "
          f"bandwidth fixed per data set) and SW2 of both sample sets against {args.n_samples} "
          f"true samples. Held-out sets are fixed per data set, the same for every seed.", "",
          "Equal wall-clock: the DSM-only continuation runs on, on the same streams, to "
          f"n = {args.ft_steps} x (FP config's training time / DSM continuation's time for "
          f"{args.ft_steps} steps), rounded to a multiple of {args.time_quantum:g} x "
          f"{args.ft_steps} steps (at most {args.max_time_ratio} x); each FP config is compared "
          "with the DSM model at its own n (the matched n and time ratios are in the tables "
          "and the JSON).", ""]
    L += ["## Convergence of the DSM pretraining", "",
          f"Held-out DSM loss of the EMA weights every {args.eval_every} steps on "
          f"{args.n_heldout_dsm} fixed held-out (x, t, z) (t log-uniform on [1e-5, 1] with "
          "importance weights: an unbiased estimate of the likelihood-weighted training "
          "objective). Judged converged at the first evaluation after "
          f"{args.pretrain_min_steps} steps at which the best value had improved by at most "
          f"{args.conv_rtol:g} (relative) over the last {args.conv_window} evaluations "
          f"({args.conv_window * args.eval_every} steps); cap {args.pretrain_max_steps} steps.", "",
          "| data | D | steps (mean [range]) | cap hit | held-out DSM at stop | true score's (floor) "
          "| NLL - exact at the checkpoint |", "|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        p = s["pretrain"]
        st = p["steps"]["values"]
        L.append(f"| {name} | {s['dim']} | {p['steps']['mean']:.0f} [{min(st)}-{max(st)}] | "
                 f"{p['cap_hit']} of {len(st)} | {p['final']['mean']:.4g} ± {p['final']['ci']:.2g} | "
                 f"{_fmt(p['oracle_floor'], 4)} | {p['nll_excess_pretrained']['mean']:.4g} ± "
                 f"{p['nll_excess_pretrained']['ci']:.2g} |")
    L += ["", "## Calibration of the knobs", "",
          "At each checkpoint's raw weights, median over "
          f"{args.calib_batches} batches (then the mean over seeds): |grad term| / |grad DSM| "
          "for each term at weight 1 "
          "(vector terms in the per-dimension scale). A knob's strength is its weight times this "
          "ratio (a scale, not the norm of the combined gradient); alpha at which the vector "
          "term's gradient equals DSM's = 1 / ratio.", "",
          "| data | norm of grad DSM | vec div ratio | vec lap ratio | scalar paper ratio | scalar "
          "consistent ratio | alpha_eq div | alpha_eq lap |", "|---|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        c = s["calibration"]
        rd, rl = c["vec_div"]["grad_ratio"]["mean"], c["vec_laplacian"]["grad_ratio"]["mean"]
        L.append(f"| {name} | {c['dsm']['grad']['mean']:.3g} | {rd:.3g} | {rl:.3g} | "
                 f"{c['scalar_paper']['grad_ratio']['mean']:.3g} | "
                 f"{c['scalar_consistent']['grad_ratio']['mean']:.3g} | {_fmt(1 / rd if rd else None)} | "
                 f"{_fmt(1 / rl if rl else None)} |")
    L += ["", "Term values at the checkpoint (per-dimension vector terms, scalar terms as "
          "defined in docs/MATH.md 4): "
          + "; ".join(f"{name}: " + ", ".join(f"{k} {v['value']['mean']:.3g}"
                                              for k, v in s["calibration"].items())
                      for name, s in S.items()) + ".", "",
          "Configs and their strengths (mean over seeds): "
          + "; ".join(f"`{c.key}` = {c.label}" for c in cfgs) + ".", "",
          "| data | " + " | ".join(c.key for c in cfgs if c.key != "dsm") + " |",
          "|---" * len(cfgs) + "|"]
    for name, s in S.items():
        L.append(f"| {name} | " + " | ".join(_fmt(s["strength"][c.key]["mean"], 2)
                                           for c in cfgs if c.key != "dsm") + " |")
    L += ["", f"beta for the consistent scalar term: {args.beta_consistent:g} (it is a squared "
          "per-dimension moment, of another size than the paper's batch norm, docs/MATH.md 4; "
          "its strength is in the table above). The paper's beta 0.01 is used for the paper "
          "scalar term and in the combined config.", ""]
    shown = ("nll_excess", "sw_sde", "mmd_sde", "sw_ode", "gap", "res_div", "res_lap", "cons",
             "ms_per_step")
    for name, s in S.items():
        L += [f"## {name} (D = {s['dim']})", "",
              f"Exact NLL {s['nll_exact']:.4f} nats/dim"
              + (" (log(32)/2: the entropy; a model's NLL, a cross-entropy, cannot be below it "
                 "in expectation)" if name == "checkerboard" else " (-log q_0 of the held-out points)")
              + f"; NLL divergence: {s['nll_divergence']}."]
        o = s.get("oracle")
        if o and "error" not in o:
            L.append(f"True score through the same pipeline (float64): NLL - exact "
                     f"{o['nll_excess']:+.4f}, rel. residual div {o['res_div']:.2g}, gap "
                     f"{o['gap']:.3g}, SW2 SDE {o['sw_sde']:.3g} / ODE {o['sw_ode']:.3g}, MMD^2 SDE "
                     f"{o['mmd_sde']:.2g}: the floors of the metrics.")
        b = s["equal_steps"]["dsm"]
        L += ["", "DSM-only continuation (absolute, mean ± CI): "
              + ", ".join(f"{METRICS[m][0]} {b[m]['abs']['mean']:.4g} ± {b[m]['abs']['ci']:.2g}"
                          for m in shown) + ".", "",
              "**Equal steps**: config minus DSM-only (difference; x = ratio for scale metrics).", "",
              "| config | " + " | ".join(METRICS[m][0] for m in shown) + " |",
              "|---" * (len(shown) + 1) + "|"]
        for c in cfgs:
            if c.key == "dsm":
                continue
            e = s["equal_steps"][c.key]
            L.append(f"| {c.key} | " + " | ".join(_cell(e[m], METRICS[m][1]) for m in shown) + " |")
        eq_shown = ("nll_excess", "sw_sde", "mmd_sde", "sw_ode", "gap", "res_div")
        L += ["", f"**Equal wall-clock**: config minus the DSM-only continuation run to the "
              "config's training time (its steps and the time ratio in the last columns).", "",
              "| config | " + " | ".join(METRICS[m][0] for m in eq_shown)
              + " | DSM steps | time ratio |", "|---" * (len(eq_shown) + 3) + "|"]
        for c in cfgs:
            if c.key == "dsm" or c.key not in s["equal_time"]:
                continue
            e = s["equal_time"][c.key]
            L.append(f"| {c.key} | " + " | ".join(_cell(e[m], METRICS[m][1]) for m in eq_shown)
                     + f" | {e['dsm_steps']['mean']:.0f} | {e['time_ratio']['mean']:.2f} |")
        L += ["", "**ODE-SDE gap and SDE samples against alpha** (absolute values, mean ± CI; "
              "Deveney et al. 2023 predict a gap falling with alpha while the SDE samples can "
              "worsen):", "", "| config | gap (SW2) | gap (MMD^2) | SW2 SDE | MMD^2 SDE |",
              "|---|---|---|---|---|"]
        for c in cfgs:
            e = s["equal_steps"][c.key]
            L.append(f"| {c.key} | " + " | ".join(
                f"{e[m]['abs']['mean']:.4g} ± {e[m]['abs']['ci']:.2g}"
                for m in ("gap", "gap_mmd", "sw_sde", "mmd_sde")) + " |")
        for form, sl in s["alpha_slopes"].items():
            L.append(f"\nSlopes per decade of alpha ({form}, per seed least squares over the "
                     f"grid, mean [95% CI]): log10 gap {_iv(sl['log10_gap'])}, gap MMD^2 "
                     f"{_iv(sl['gap_mmd'])}, SW2 SDE {_iv(sl['sw_sde'])}, MMD^2 SDE "
                     f"{_iv(sl['mmd_sde'])}, NLL - exact {_iv(sl['nll_excess'])}.")
        L.append("")
    if IM:
        L += image_markdown(args, IM)
    L += ["## Verdict", ""]
    if quick:
        L += [f"**{QUICK_LABEL}.**", ""]
    L += verdict(args, S, IM) + [""]
    path.write_text("\n".join(L))


def image_markdown(args, IM) -> list[str]:
    p = IM["pretrain"]
    L = ["## Digits 16x16", "",
         f"{args.image_preset} (VP), {args.image_n_heldout} held-out images, DSM pretraining "
         f"batch {args.image_batch}, lr {args.image_lr} ({args.image_warmup} warm-up steps), "
         f"EMA {args.pretrain_ema}: {p['steps']} steps, held-out DSM "
         + ", ".join(f"{s}: {v:.4g}" for s, v in p["curve"][:: max(1, len(p["curve"]) // 8)])
         + ("; converged by the rule above" if p["converged"] else
            "; the cap was hit: not flat by the rule above")
         + (f" (best improved by {100 * p['last_window_rel_improvement']:.2g}% over the last window)"
            if "last_window_rel_improvement" in p else "") + ". "
         f"Samples (reverse SDE, {args.image_sde_steps} Euler-Maruyama steps) of every model are "
         "in fp_study_digits.png.", "",
         f"Fine-tuning from that checkpoint, {args.image_ft_steps} steps, EMA {args.ft_ema}, per "
         f"seed (the seeds vary the fine-tuning streams only; {args.image_seeds} seed(s)): DSM-only "
         f"vs FP alpha {args.image_alpha:g} (per-dimension scale), {args.image_form} form, beta 0, "
         f"FP on {args.image_fp_batch} samples a batch. Bits/dim by the probability-flow ODE "
         f"(rtol = atol = {args.image_bpd_tol:g}) with {args.image_bpd_probes} fixed Hutchinson "
         f"probes and one fixed dequantisation on {args.image_n_heldout} held-out images."]
    c = IM.get("calibration")
    if c:
        r = c[f"vec_{args.image_form}"]["grad_ratio"]
        L.append(f"Calibration at the checkpoint (median over {args.calib_batches} batches): "
                 f"|grad vec {args.image_form}| / |grad DSM| = {r:.3g} (alpha_eq {_fmt(1 / r if r else None)}; "
                 f"the FP config's strength {args.image_alpha * r:.3g}), scalar paper "
                 f"{c['scalar_paper']['grad_ratio']:.3g}, scalar consistent "
                 f"{c['scalar_consistent']['grad_ratio']:.3g}.")
    L += ["", "| seed | config | steps | bits/dim | rel. residual div | rel. residual lap | "
          "abs. residual div (geo-mean over t) | ms/step | NFE |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(IM["runs"], key=lambda r: (r["seed"], r["config"])):
        L.append(f"| {r['seed']} | {r['config']} | {r['steps']} | {_fmt(r.get('bpd'), 5)} | "
                 f"{_fmt(r.get('res_div'))} | {_fmt(r.get('res_lap'))} | {_fmt(r.get('abs_div'))} | "
                 f"{r['ms_per_step']:.0f} | {r.get('nfe_bpd', '—')} |")
        e = r.get("equal_time")
        if e and "bpd" in e:
            L.append(f"| {r['seed']} | dsm, equal wall-clock | {e['steps']} | {_fmt(e['bpd'], 5)} | "
                     f"{_fmt(e.get('res_div'))} | {_fmt(e.get('res_lap'))} | {_fmt(e.get('abs_div'))} "
                     f"| — | {e.get('nfe_bpd', '—')} |")
    L.append("")
    for q in IM.get("pairs", []):
        L.append(f"Seed {q['seed']}: FP - DSM bits/dim {q['bpd_fp'] - q['bpd_dsm']:+.4f}, per-image "
                 f"paired interval {_iv(q['per_image_diff'])} (evaluation noise over the "
                 f"{args.image_n_heldout} images, not training noise); FP/DSM time ratio "
                 f"{q['time_ratio']:.2f}; rel. residual (div) ratio {q['res_div_ratio']:.3g}"
                 + (f"; against DSM at equal wall-clock ({q['equal_time_steps']} steps): "
                    f"{_iv(q['per_image_diff_equal_time'])}" if "per_image_diff_equal_time" in q else "")
                 + ".")
    L.append("")
    return L


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = results["summary"]
    names = list(S)
    if not names:
        return
    fig, axes = plt.subplots(len(names), 4, figsize=(20, 3.9 * len(names)), squeeze=False)
    alphas = list(args.alphas)
    extra = [c for c in make_configs(args) if c.alpha == 0 and c.beta > 0 or c.key == "paper"]
    for row, name in zip(axes, names):
        s = S[name]
        ax = row[0]
        for i, form in enumerate(args.forms):
            for j, (table, ls) in enumerate(((s["equal_steps"], "-"), (s["equal_time"], ":"))):
                es = [table[f"{form}:{a:g}"]["nll_excess"]["diff"] for a in alphas]
                xs = [a * (1.12 if i else 1) * (1.05 if j else 1) for a in alphas]
                ax.errorbar(xs, [e["mean"] for e in es], yerr=[e["ci"] for e in es], marker="o",
                            ls=ls, capsize=3, color=f"C{i}",
                            label=f"{form} ({'equal steps' if j == 0 else 'equal time'})")
        xe = max(alphas) * 10
        for k, c in enumerate(extra):
            e = s["equal_steps"][c.key]["nll_excess"]["diff"]
            ax.errorbar([xe * 3 ** k], [e["mean"]], yerr=[e["ci"]], marker="s", capsize=3,
                        color=f"C{2 + k}", ls="none", label=c.key)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="alpha (per-dimension scale); squares: other configs",
               ylabel="NLL - exact: config - DSM (nats/dim)",
               title=f"{name} (D = {s['dim']}): NLL - exact vs DSM-only, 95% CI")
        ax.legend(fontsize=6)
        ax = row[1]
        prof = s["profiles_geomean"]
        for i, key in enumerate(["dsm"] + [f"div:{a:g}" for a in alphas]):
            if key in prof:
                ax.plot(args.residual_times, prof[key]["div"], "-o", ms=3,
                        color=plt.cm.viridis(i / (len(alphas) + 1)), label=key)
        ax.set(xscale="log", yscale="log", xlabel="t", ylabel="E|r|^2 / E|d_t s|^2 (div)",
               title=f"{name}: relative residual profile (geo-mean over seeds)")
        ax.legend(fontsize=6)
        for ax, metric, ylabel in ((row[2], "gap", "ODE-SDE gap (SW2)"),
                                   (row[3], "sw_sde", "SW2 of SDE samples")):
            b = s["equal_steps"]["dsm"][metric]["abs"]
            ax.axhspan(b["lo"], b["hi"], color="gray", alpha=0.3, label="DSM-only (95% CI)")
            ax.axhline(b["mean"], color="gray")
            for i, form in enumerate(args.forms):
                es = [s["equal_steps"][f"{form}:{a:g}"][metric]["abs"] for a in alphas]
                ax.errorbar([a * (1.12 if i else 1) for a in alphas], [e["mean"] for e in es],
                            yerr=[e["ci"] for e in es], marker="o", capsize=3, color=f"C{i}", label=form)
            ax.set(xscale="log", yscale="log", xlabel="alpha (per-dimension scale)", ylabel=ylabel,
                   title=f"{name}: {ylabel} vs alpha (mean, 95% CI)")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_digits(image: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "pretrain_samples" in image:
        panels.append((f"pretrained ({image['pretrain']['steps']} DSM steps)", image["pretrain_samples"]))
    for r in sorted(image.get("finetune", []), key=lambda r: (r["seed"], r["config"])):
        if "samples" in r:
            panels.append((f"seed {r['seed']}: {r['config']} (+{r['steps']}), bpd {_fmt(r.get('bpd'), 4)}",
                           r["samples"]))
        e = r.get("equal_time", {})
        if "samples" in e:
            panels.append((f"seed {r['seed']}: dsm equal time (+{e['steps']}), bpd {_fmt(e.get('bpd'), 4)}",
                           e["samples"]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        ax.imshow(_tile(x), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tile(x: torch.Tensor, pad: int = 1):
    x = ((x.detach().float() + 1) / 2).clamp(0, 1)[:, 0]
    n = x.shape[0]
    k = int(math.ceil(math.sqrt(n)))
    H, W = x.shape[1:]
    out = torch.ones(k * (H + pad) + pad, k * (W + pad) + pad)
    for i in range(n):
        r, c = divmod(i, k)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    return out.numpy()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ==== CLI ====================================================================================
QUICK = dict(seeds=2, datasets=["mix2", "gmm8"], alphas=[1e-3, 1e-1], width=32, depth=2,
             batch=64, fp_batch=16, eval_every=20, conv_window=2, pretrain_min_steps=40,
             pretrain_max_steps=80, ft_steps=20, n_heldout_dsm=256, calib_batches=1, n_nll=16,
             n_prof=16, n_samples=64, sde_steps=20, eval_probes=2, ode_tol=3e-2, nll_probes=2,
             residual_times=[1e-3, 0.1, 1.0], time_quantum=1.0, max_time_ratio=2,
             images=False, workers=1,
             image_pretrain_steps=4, image_ft_steps=2, image_seeds=1, image_n_heldout=8,
             image_n_prof=2, image_n_samples=4, image_sde_steps=4, image_bpd_tol=1e-1,
             image_eval_every=2, image_batch=4, image_fp_batch=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true",
      help="tiny settings (a smoke run: concludes nothing); explicit options override them")
    a("--out", type=Path, default=Path("experiments/results"), help="output folder")
    a("--seeds", type=int, default=5, help="seeds per (data set, config)")
    a("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    a("--alphas", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
      help="alpha grid (per-dimension scale, normalize='dim') for each form")
    a("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    a("--beta-paper", type=float, default=0.01,
      help="beta of the 'scalar_paper' config (alpha 0, scalar 'paper'); 0 leaves it out")
    a("--beta-consistent", type=float, default=10.0,
      help="beta of the 'scalar_consistent' config (alpha 0, scalar 'consistent'); 0 leaves it out")
    a("--combined", action=argparse.BooleanOptionalAction, default=True,
      help="the 'paper' config: FP-Diffusion's objective (FPLoss(preset='paper'))")
    a("--combined-alpha", type=float, default=0.15, help="its alpha (paper normalisation)")
    a("--combined-beta", type=float, default=0.01, help="its beta (paper scalar term)")
    a("--width", type=int, default=128, help="MLP width")
    a("--depth", type=int, default=3, help="MLP depth")
    a("--batch", type=int, default=256, help="training batch")
    a("--fp-batch", type=int, default=64, help="samples of each batch the FP terms use")
    a("--fp-probes", type=int, default=1, help="Hutchinson probes of the FP terms in training")
    a("--lr", type=float, default=2e-3, help="Adam learning rate (pretraining and fine-tuning)")
    a("--pretrain-ema", type=float, default=0.999, help="EMA decay during pretraining")
    a("--ft-ema", type=float, default=0.999, help="EMA decay during fine-tuning")
    a("--eval-every", type=int, default=250, help="steps between held-out DSM evaluations")
    a("--conv-window", type=int, default=8, help="evaluations in the convergence window")
    a("--conv-rtol", type=float, default=2.5e-3, help="relative improvement judged flat")
    a("--pretrain-min-steps", type=int, default=2000)
    a("--pretrain-max-steps", type=int, default=12000, help="the cap of the DSM pretraining")
    a("--n-heldout-dsm", type=int, default=4096, help="held-out (x, t, z) of the DSM curve")
    a("--calib-batches", type=int, default=8, help="batches of the gradient-norm calibration")
    a("--ft-steps", type=int, default=500, help="fine-tuning steps per config")
    a("--time-quantum", type=float, default=0.5,
      help="equal-time DSM step counts are multiples of this x --ft-steps")
    a("--max-time-ratio", type=int, default=8, help="at most this x --ft-steps DSM steps")
    a("--n-nll", type=int, default=256, help="held-out points for the NLL")
    a("--nll-probes", type=int, default=4, help=f"fixed Hutchinson probes for D > {EXACT_DIV_MAX_DIM}")
    a("--ode-tol", type=float, default=1e-4, help="RK45 rtol = atol (NLL and ODE samples)")
    a("--n-prof", type=int, default=256, help="points for the residual and conservativity profiles")
    a("--eval-probes", type=int, default=8,
      help="probes of the evaluated residual and conservativity")
    a("--residual-times", type=float, nargs="+", default=list(RESIDUAL_TIMES),
      help="times of the residual and conservativity profiles")
    a("--n-samples", type=int, default=1000, help="samples for MMD, SW2 and the ODE-SDE gap")
    a("--sde-steps", type=int, default=250, help="reverse-SDE (Euler-Maruyama) steps")
    a("--eval-seed", type=int, default=12345, help="seed of the held-out sets")
    a("--images", action=argparse.BooleanOptionalAction, default=True, help="the digits part")
    a("--image-preset", choices=("small/ddpmpp",), default="small/ddpmpp")
    a("--image-pretrain-steps", type=int, default=3000, help="DSM pretraining steps (the cap)")
    a("--image-eval-every", type=int, default=250, help="steps between held-out DSM evaluations")
    a("--image-warmup", type=int, default=100, help="linear lr warm-up steps of the pretraining")
    a("--image-ft-steps", type=int, default=300, help="fine-tuning steps per config")
    a("--image-seeds", type=int, default=2, help="fine-tuning seeds (one shared checkpoint)")
    a("--image-alpha", type=float, default=1e-3, help="FP alpha (per-dimension scale)")
    a("--image-form", choices=FORMS, default="div")
    a("--image-batch", type=int, default=32)
    a("--image-fp-batch", type=int, default=4)
    a("--image-lr", type=float, default=1e-3)
    a("--image-n-heldout", type=int, default=256, help="held-out images (bits/dim)")
    a("--image-bpd-probes", type=int, default=4, help="fixed Hutchinson probes of bits/dim")
    a("--image-bpd-tol", type=float, default=1e-3, help="RK45 rtol = atol of bits/dim")
    a("--image-n-prof", type=int, default=16, help="held-out images for the residual profile")
    a("--image-n-samples", type=int, default=64, help="samples in the PNG grid")
    a("--image-sde-steps", type=int, default=200, help="Euler-Maruyama steps of the samples")
    a("--resume", action="store_true",
      help="reuse the tasks an interrupted run with the same settings saved in "
           "--out/fp_study_parts/ and run only the rest")
    a("--workers", type=int, default=2, help="worker processes (1: in this process)")
    a("--threads", type=int, default=1,
      help="torch threads per worker (1: on a loaded 2-core machine more threads run slower)")
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = p.parse_known_args(argv)
    if pre.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.ft_steps < 1 or args.workers < 1:
        p.error("--seeds, --ft-steps and --workers must be >= 1")
    if args.seeds < 2:
        log.warning("one seed: no confidence intervals")
    if args.fp_batch < 2 and args.beta_consistent > 0:
        p.error("the consistent scalar term needs --fp-batch >= 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    argl = sys.argv[1:] if argv is None else list(argv)
    cmd = "python experiments/fp_study.py" + (" " + shlex.join(argl) if argl else "")
    est = estimate_seconds(args)
    log.info("estimated %.0f worker-minutes (2-D %.0f, digits %.0f): about %.0f min on %d "
             "worker(s)", est["total_worker_s"] / 60, est["vector_worker_s"] / 60,
             est["images_worker_s"] / 60, est["wall_s"] / 60, args.workers)
    t_start = time.perf_counter()
    tasks = [{"dataset": d, "seed": s} for d in args.datasets for s in range(args.seeds)]
    bar = tqdm(total=count_units(args, len(tasks)), desc="fp_study", unit="model",
               mininterval=1.0, dynamic_ncols=True)
    parts = Parts(args)
    try:
        vec_results, image = run_tasks(args, tasks, bar, parts)
    finally:
        bar.close()
    t_run = time.perf_counter() - t_start
    phase = {}
    for r in vec_results + image.get("finetune", []):
        for k, v in r["phase_s"].items():
            phase[k] = phase.get(k, 0.0) + v
    for k, v in image.get("pretrain_phase_s", {}).items():
        phase[k] = phase.get(k, 0.0) + v
    summary = summarize(args, vec_results)
    images_summary = summarize_images(args, image) if args.images else {}
    results = {"quick": args.quick, "label": QUICK_LABEL if args.quick else "full run",
               "command": cmd, "config": vars_for_workers(args),
               "configs": [c._asdict() for c in make_configs(args)],
               "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
               "machine": machine(), "estimate": est, "phase_worker_s": phase,
               "parallel_wall_s": t_run, "resumed_tasks": parts.resumed,
               "summary": summary, "images_summary": images_summary,
               "tasks": sorted(vec_results, key=lambda r: (r["dataset"], r["seed"]))}
    t0 = time.perf_counter()
    results["total_s"] = time.perf_counter() - t_start
    write_markdown(results, args, args.out / "fp_study.md")
    plot(results, args, args.out / "fp_study.png")
    if args.images:
        plot_digits(image, args, args.out / "fp_study_digits.png")
    results["report_s"] = time.perf_counter() - t0
    results["total_s"] = time.perf_counter() - t_start
    results["verdict"] = verdict(args, summary, images_summary)
    (args.out / "fp_study.json").write_text(json.dumps(_jsonable(results), indent=1))
    write_markdown(results, args, args.out / "fp_study.md")
    parts.clear()
    log.info("done in %.1f min (estimated %.1f); wrote %s", results["total_s"] / 60,
             est["wall_s"] / 60, args.out)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

"""Samplers for score-based diffusion: reverse SDE, predictor-corrector, probability-flow ODE.

    sample(score_fn, sde, shape, *, method="pc", steps=None, generator=None, **options)
        -> SampleResult(samples, nfe)

Methods (``SAMPLERS``). These seven integrate from t = T down to t = eps on a float64 grid
t_0 = T > t_1 > ... > t_steps = eps (uniform in t, as Score SDE):

| method | what one step t -> t' (dt = t - t' > 0) does | NFE per step |
|---|---|---|
| euler_maruyama | reverse SDE: x += (g^2 s - f x) dt + g sqrt(dt) z | 1 |
| reverse_diffusion | ancestral step with the exact forward transition t' -> t, x_t = a x_t' + sqrt(v) z (a = alpha(t)/alpha(t'), v = sigma(t)^2 - a^2 sigma(t')^2): x = (2 - a) x + v s + sqrt(v) z (Score SDE's ReverseDiffusionPredictor; VE: SMLD, VP: DDPM) | 1 |
| pc | Langevin corrector (snr, corrector_steps) at t, then the reverse-diffusion predictor (Score SDE's PC sampler) | 1 + corrector_steps |
| pc_lml | pc with the damped second-order (Levenberg-Marquardt) Langevin corrector: x += eps M s + sqrt(2 eps) M^(1/2) z, M from exact J v products along `rank` directions (docs/MATH.md 12) | 1 + corrector_steps (1 + rank) |
| ode | probability-flow ODE dx/dt = f x - 1/2 g^2 s (docs/MATH.md 7), adaptive Dormand-Prince RK45 (rtol, atol) | adaptive |
| ode_euler | the same ODE with fixed Euler steps | 1 |
| ode_heun | the same ODE with fixed Heun (trapezoidal RK2) steps | 2 |

pc_lml's options (defaults first): ``snr`` 0.16 and ``corrector_steps`` 1 as pc; ``rank`` 1,
the k directions per corrector step (at most D); ``damping`` 1.0, lambda in units of the mean
curvature |s|^2 / D (large: the plain Langevin corrector); ``directions`` "random" (fresh
Gaussian probes each step) or "power" (each step's J Q, one subspace-iteration step towards
the stiffest directions). Each corrector step is one jet pass with 1 + rank rows, giving s and
J q_1..q_k together; NFE counts it as 1 + rank evaluations (its linear layers run over that
many rows). The Hessian's position dependence is not corrected for (no div M term, no
Metropolis step), as in every Newton-type Langevin corrector.

Two fast probability-flow samplers build their own float64 grid from T, eps and ``steps``,
and for them ``steps`` is the number of score evaluations, exactly (docs/MATH.md 10):

| method | what it does | NFE per step |
|---|---|---|
| dpm_solver | exponential integrator in log-SNR time lambda = log(alpha/sigma): the linear part exactly, the prediction as a polynomial in lambda (DPM-Solver, DPM-Solver++; Lu et al. 2022); VE, VP, sub-VP alike | 1 (multistep) or order |
| edm_heun | EDM's deterministic Heun (Karras et al. 2022, S_churn = 0) on y = x/alpha in sigma_hat = sigma/alpha time, dy/dsigma_hat = (y - x_0)/sigma_hat, sigma_hat^(1/rho) uniform (VE: EDM's sigma-time; VP, sub-VP: its scaled form) | 2 (an Euler last step when steps is odd) |

Their options (defaults first):

- dpm_solver: ``order`` 3, 2 or 1. ``multistep`` True: one evaluation per step, the
  polynomial through the last `order` predictions (DPM-Solver++(kM)); False: `order`
  evaluations per step at lambda + r h, r = 1/2 or (1/3, 2/3) (DPM-Solver-k), steps % order
  left over as one lower-order last step. ``prediction`` "data" (x_0, DPM-Solver++) or "noise"
  (eps, DPM-Solver). ``schedule`` "logsnr" (uniform in lambda), "time_uniform",
  "time_quadratic" (uniform in sqrt(t)).
- edm_heun: ``rho`` 7.0, from sigma_hat(T) to sigma_hat(eps).

Default steps: 20 for dpm_solver, 34 for edm_heun (with the denoising step EDM's 35 NFE).
Both need sigma(eps) > 0 (eps > 0 for VP and sub-VP) and refuse steps < order.

Denoising (``denoise=True``, the default): after reaching eps the sample is replaced by the
Tweedie posterior mean E[x_0 | x_eps] = (x + sigma(eps)^2 s(x, eps)) / alpha(eps), i.e.
x + sigma^2 s for VE (Score SDE's noise_removal); one more score evaluation. The stochastic
samplers also drop the noise of their last step, as Score SDE returns x_mean.

The ODE solver ``odeint_rk45`` is plain torch (float64 times, the state in any dtype, no
NumPy round trip); it is shared with ``fpkern.likelihood``. It is kept in place of
torchdiffeq's dopri5, the same method under another step controller, which measured worse
on the tests' problems (experiments/ode_solver.py, read in experiments/README.md).
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Callable, NamedTuple

import torch

from fpkern._checks import bcast

from fpkern.jet import JetUnsupported, Layout
from fpkern.ops import forward_mode
from fpkern.ops.jet_pass import jet_pass
from fpkern.sde import LinearSDE

__all__ = ["SAMPLERS", "SampleResult", "sample", "time_grid", "odeint_rk45", "ODEResult",
           "probability_flow_drift", "tweedie_denoise", "score_prediction"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


class SampleResult(NamedTuple):
    """samples: [*shape]; nfe: the number of score evaluations (the batch counts once)."""

    samples: torch.Tensor
    nfe: int


class ODEResult(NamedTuple):
    """y: the state at t1; nfe: right-hand-side evaluations; steps / rejected: step counts."""

    y: torch.Tensor
    nfe: int
    steps: int
    rejected: int



def time_grid(sde: LinearSDE, steps: int, eps: float) -> torch.Tensor:
    """float64 grid of steps + 1 times from sde.T down to eps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps!r}")
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)


def _tvec(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _coef(fn, t: float) -> float:
    """A scalar SDE coefficient evaluated in float64."""
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


def probability_flow_drift(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor,
                           t: torch.Tensor) -> torch.Tensor:
    """f(t) x - 1/2 g(t)^2 s(x, t), the probability-flow ODE's velocity (docs/MATH.md 7)."""
    f, g2 = sde.f(t).to(x.dtype), sde.g2(t).to(x.dtype)
    return bcast(f, x) * x - 0.5 * bcast(g2, x) * score_fn(x, t)


def score_prediction(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: float,
                     kind: str) -> torch.Tensor:
    """The score s(x, t) as the prediction a diffusion network makes (one score evaluation).

    kind "noise": eps = -sigma(t) s, the noise in x = alpha x_0 + sigma eps; kind "data":
    x_0 = E[x_0 | x_t = x] = (x + sigma(t)^2 s) / alpha(t) (Tweedie). The one place where
    fpkern turns a score into either prediction (docs/MATH.md 1.3 and 10).
    """
    if kind == "noise":
        return -_coef(sde.sigma, t) * score_fn(x, _tvec(t, x))
    if kind == "data":
        sigma2, alpha = _coef(sde.sigma2, t), _coef(sde.alpha, t)
        return (x + sigma2 * score_fn(x, _tvec(t, x))) / alpha
    raise ValueError(f"unknown prediction {kind!r}; valid names: {list(_PREDICTIONS)}")


def tweedie_denoise(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x_0 | x_t] = (x + sigma(t)^2 s(x, t)) / alpha(t) (one score evaluation)."""
    return score_prediction(score_fn, sde, x, t, "data")


# ---- one-step updates: (x, t, t_next) -> (x, x_mean) -------------------------------------
def _transition(sde: LinearSDE, t: float, t_next: float) -> tuple[float, float]:
    """(a, v) of the forward transition t_next -> t: x_t = a x_{t_next} + sqrt(v) z."""
    a = math.exp(_coef(sde.log_alpha, t) - _coef(sde.log_alpha, t_next))
    v = _coef(sde.sigma2, t) - a * a * _coef(sde.sigma2, t_next)
    return a, max(v, 0.0)


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise like x from `generator` (drawn on the generator's device, moved to x's)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)


def _em_step(score_fn, sde, x, t, t_next, generator):
    dt = t - t_next
    f, g2 = _coef(sde.f, t), _coef(sde.g2, t)
    mean = x + (g2 * score_fn(x, _tvec(t, x)) - f * x) * dt
    return mean + math.sqrt(g2 * dt) * _randn(x, generator), mean


def _rd_step(score_fn, sde, x, t, t_next, generator):
    a, v = _transition(sde, t, t_next)
    mean = (2.0 - a) * x + v * score_fn(x, _tvec(t, x))
    return mean + math.sqrt(v) * _randn(x, generator), mean


def _langevin(score_fn, sde, x, t, t_next, generator, snr, n_steps):
    """Score SDE's LangevinCorrector: step 2 alpha (snr |z| / |s|)^2, alpha = a^2 (1 for VE)."""
    a, _ = _transition(sde, t, t_next)
    alpha = a * a
    tv = _tvec(t, x)
    for _ in range(n_steps):
        grad = score_fn(x, tv)
        noise = _randn(x, generator)
        grad_norm = grad.flatten(1).norm(dim=1).mean()
        noise_norm = noise.flatten(1).norm(dim=1).mean()
        step = 2 * alpha * (snr * noise_norm / grad_norm) ** 2
        x = x + step * grad + torch.sqrt(2 * step) * noise
    return x


def _ode_euler_step(score_fn, sde, x, t, t_next):
    return x + (t_next - t) * probability_flow_drift(score_fn, sde, x, _tvec(t, x))


def _ode_heun_step(score_fn, sde, x, t, t_next):
    h = t_next - t
    d1 = probability_flow_drift(score_fn, sde, x, _tvec(t, x))
    x1 = x + h * d1
    d2 = probability_flow_drift(score_fn, sde, x1, _tvec(t_next, x))
    return x + 0.5 * h * (d1 + d2)


# ---- samplers: (score_fn, sde, x_T, grid, generator, **opts) -> (x, nfe) ------------------
def _euler_maruyama(score_fn, sde, x, grid, generator):
    for i in range(len(grid) - 1):
        x, mean = _em_step(score_fn, sde, x, float(grid[i]), float(grid[i + 1]), generator)
    return mean, len(grid) - 1


def _reverse_diffusion(score_fn, sde, x, grid, generator):
    for i in range(len(grid) - 1):
        x, mean = _rd_step(score_fn, sde, x, float(grid[i]), float(grid[i + 1]), generator)
    return mean, len(grid) - 1


def _pc(score_fn, sde, x, grid, generator, *, snr=0.16, corrector_steps=1):
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be a non-negative int, got {corrector_steps!r}")
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x = _langevin(score_fn, sde, x, t, t_next, generator, snr, corrector_steps)
        x, mean = _rd_step(score_fn, sde, x, t, t_next, generator)
    return mean, (len(grid) - 1) * (1 + corrector_steps)


# ---- the damped second-order Langevin corrector (LML; docs/MATH.md 12) -------------------
_DIRECTIONS = ("random", "power")


class _Preconditioner(NamedTuple):
    """M = I - W diag(c) W^T per sample, lambda times the inverse of the damped curvature
    lambda I + W diag(tau_+) W^T (Woodbury); W [B, D, k] orthonormal, c = tau_+/(lambda + tau_+)
    in [0, 1). Its symmetric square root is I - W diag(1 - sqrt(1 - c)) W^T (MATH.md 12.2)."""

    W: torch.Tensor
    c: torch.Tensor

    def apply(self, v: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """M^power v for power 1 or 1/2; v shaped like x."""
        coef = self.c if power == 1.0 else 1.0 - torch.sqrt(1.0 - self.c)
        vf = v.reshape(v.shape[0], -1, 1)
        proj = self.W.transpose(1, 2) @ vf                                  # [B, k, 1]
        return (vf - self.W @ (coef[..., None] * proj)).reshape(v.shape)


def _direction_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator for the directions, seeded from `generator`'s state without drawing from
    it: every other draw of pc_lml (prior, corrector and predictor noise) is then pc's, and
    the two samplers see common random numbers. None (the global generator) stays None."""
    if generator is None:
        return None
    seed = zlib.crc32(generator.get_state().numpy().tobytes())
    return torch.Generator(device=generator.device).manual_seed(seed)


def _random_directions(x: torch.Tensor, k: int, generator) -> torch.Tensor:
    """k Gaussian directions per sample, [k, *x.shape], from `generator` (as _randn)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn((k,) + tuple(x.shape), generator=generator, dtype=x.dtype,
                       device=dev).to(x.device)


def _orthonormal(V: torch.Tensor) -> torch.Tensor:
    """Per-sample orthonormal basis Q [B, D, k] of the directions V [k, B, *shape] (QR)."""
    A = V.reshape(V.shape[0], V.shape[1], -1).permute(1, 2, 0)
    return torch.linalg.qr(A).Q


def _as_rows(Q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, D, k] -> [k, *x.shape], the tangent-row layout of a jet pass."""
    return Q.permute(2, 0, 1).reshape((Q.shape[2],) + tuple(x.shape))


_JVP_FALLBACK_LOGGED: set[str] = set()


def _score_and_jvps(score_fn, x: torch.Tensor, t: torch.Tensor, V: torch.Tensor):
    """(s, [J v_i]_i), J = ds/dx, from one jet pass with 1 + k rows (docs/MATH.md 8); a
    score_fn without jet rules takes the generic torch.func path (one jvp per direction)."""
    try:
        rows = jet_pass(score_fn, x, t, V, time=False, layout=Layout(n1=V.shape[0]))
        return rows[0], rows[1:]
    except JetUnsupported as exc:
        key = type(score_fn).__qualname__
        if key not in _JVP_FALLBACK_LOGGED:
            _JVP_FALLBACK_LOGGED.add(key)
            log.warning("pc_lml: %s; J v by torch.func.jvp (slower)", exc)
        return forward_mode.directional(score_fn, x, t, V)


def _lml_preconditioner(Q: torch.Tensor, JQ: torch.Tensor, lam) -> _Preconditioner:
    """The damped low-rank preconditioner from exact products (MATH.md 12.1): Rayleigh-Ritz
    T = sym(Q^T H Q) with H = -J, T = U diag(tau) U^T, negative curvature clipped to 0;
    lam: the damping lambda (a float or a 0-dim tensor)."""
    HQ = -JQ.reshape(JQ.shape[0], JQ.shape[1], -1).permute(1, 2, 0)         # [B, D, k]
    T = Q.transpose(1, 2) @ HQ
    tau, U = torch.linalg.eigh(0.5 * (T + T.transpose(1, 2)))
    tau = tau.clamp(min=0.0)
    c = torch.where(tau > 0, tau / (lam + tau), torch.zeros_like(tau))
    return _Preconditioner(Q @ U, c)


def _curvature_scale(s: torch.Tensor) -> torch.Tensor:
    """h_bar = mean over the batch of |s|^2 / D: E_q |s|^2 = E_q tr H (integration by parts),
    so h_bar estimates the mean eigenvalue of H = -grad^2 log q_t; lambda = damping h_bar."""
    return s.flatten(1).pow(2).sum(1).mean() / s[0].numel()


def _lml_move(x, s, pre: _Preconditioner, z, step):
    """x + step M s + sqrt(2 step) M^(1/2) z: preconditioned Langevin (MATH.md 12.3); step a
    float or a 0-dim tensor (kept on the device: no synchronisation per step)."""
    return x + step * pre.apply(s) + (2.0 * step) ** 0.5 * pre.apply(z, 0.5)


def _lml_step_size(s, z, pre: _Preconditioner, alpha: float, snr: float) -> torch.Tensor:
    """Score SDE's rule on the preconditioned terms: 2 alpha (snr |M^(1/2) z| / |M s|)^2 with
    batch-mean norms; invariant to the scale of M, and the Langevin corrector's when M = I."""
    drift = pre.apply(s).flatten(1).norm(dim=1).mean()
    noise = pre.apply(z, 0.5).flatten(1).norm(dim=1).mean()
    return 2 * alpha * (snr * noise / drift) ** 2


def _lml(score_fn, sde, x, t, t_next, generator, snr, n_steps, rank, damping, V, dir_gen=None):
    """n_steps LML corrector steps at t, noise from `generator`. V: the directions of the
    first step ("power"), or None for fresh Gaussian ones from `dir_gen`; returns (x, the next
    step's directions: J Q for "power", else None)."""
    a, _ = _transition(sde, t, t_next)
    tv = _tvec(t, x)
    power = V is not None
    for _ in range(n_steps):
        Q = _orthonormal(V if power else _random_directions(x, rank, dir_gen))
        s, JQ = _score_and_jvps(score_fn, x, tv, _as_rows(Q, x))
        z = _randn(x, generator)
        pre = _lml_preconditioner(Q, JQ, damping * _curvature_scale(s))
        x = _lml_move(x, s, pre, z, _lml_step_size(s, z, pre, a * a, snr))
        V = JQ if power else None
    return x, V


def _check_lml(x, snr, corrector_steps, rank, damping, directions) -> None:
    """pc_lml's options: pc's two, then rank <= D, a positive finite damping, directions."""
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    steps = corrector_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"corrector_steps must be a non-negative int, got {corrector_steps!r}")
    dim = x[0].numel()
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim:
        raise ValueError(f"rank must be an int in [1, D={dim}] (directions per corrector "
                         f"step), got {rank!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or \
            not (damping > 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a positive finite number, got {damping!r}")
    if directions not in _DIRECTIONS:
        raise ValueError(f"unknown directions {directions!r}; valid names: {list(_DIRECTIONS)}")


def _pc_lml(score_fn, sde, x, grid, generator, *, snr=0.16, corrector_steps=1, rank=1,
            damping=1.0, directions="random"):
    """Predictor-corrector with the LML corrector (MATH.md 12) and the reverse-diffusion
    predictor; NFE counts a jet pass of 1 + rank rows as 1 + rank evaluations."""
    _check_lml(x, snr, corrector_steps, rank, damping, directions)
    dir_gen = _direction_generator(generator)
    V = _random_directions(x, rank, dir_gen) if directions == "power" else None
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x, V = _lml(score_fn, sde, x, t, t_next, generator, snr, corrector_steps, rank,
                    damping, V, dir_gen)
        x, mean = _rd_step(score_fn, sde, x, t, t_next, generator)
    return mean, (len(grid) - 1) * (1 + corrector_steps * (rank + 1))


def _ode(score_fn, sde, x, grid, generator, *, rtol=1e-5, atol=1e-5):
    def rhs(t, y):
        return probability_flow_drift(score_fn, sde, y, _tvec(t, y))

    res = odeint_rk45(rhs, x, float(grid[0]), float(grid[-1]), rtol=rtol, atol=atol)
    return res.y, res.nfe


def _ode_euler(score_fn, sde, x, grid, generator):
    for i in range(len(grid) - 1):
        x = _ode_euler_step(score_fn, sde, x, float(grid[i]), float(grid[i + 1]))
    return x, len(grid) - 1


def _ode_heun(score_fn, sde, x, grid, generator):
    for i in range(len(grid) - 1):
        x = _ode_heun_step(score_fn, sde, x, float(grid[i]), float(grid[i + 1]))
    return x, 2 * (len(grid) - 1)


# ---- fast samplers: exponential integrators in log-SNR time and EDM's Heun (MATH.md 10) ----
_PREDICTIONS = ("data", "noise")
_SCHEDULES = ("logsnr", "time_uniform", "time_quadratic")
_RATIOS = {1: (), 2: (1 / 2,), 3: (1 / 3, 2 / 3)}   # single-step intermediate points, r h


class _Node(NamedTuple):
    """A time of the solve with its float64 coefficients; lam = log(alpha / sigma)."""

    t: float
    alpha: float
    sigma: float
    lam: float


def _log_snr(sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = log alpha(t) - log sigma(t), half the log signal-to-noise ratio."""
    return sde.log_alpha(t) - torch.log(sde.sigma(t))


def _nodes(sde: LinearSDE, ts: torch.Tensor) -> list[_Node]:
    ts = ts.to(torch.float64)
    log_alpha, sigma = sde.log_alpha(ts), sde.sigma(ts)
    lam = log_alpha - torch.log(sigma)
    return [_Node(*map(float, row)) for row in zip(ts, log_alpha.exp(), sigma, lam)]


def _time_of_log_snr(sde: LinearSDE, lam: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """t in [lo, hi] with lambda(t) = lam, by bisection (lambda decreases in t); float64.
    Generic over LinearSDE; 64 halvings bring [lo, hi] below float64 resolution."""
    a = torch.full_like(lam, lo, dtype=torch.float64)
    b = torch.full_like(lam, hi, dtype=torch.float64)
    for _ in range(64):
        mid = 0.5 * (a + b)
        early = _log_snr(sde, mid) > lam            # lambda(mid) above the target: t > mid
        a, b = torch.where(early, mid, a), torch.where(early, b, mid)
    return 0.5 * (a + b)


def _check_log_snr(sde, t0: float, eps: float, method: str) -> None:
    """The exponential integrators need finite lambda at both ends, decreasing in t."""
    if not isinstance(sde, LinearSDE):
        raise ValueError(f"{method} needs a LinearSDE (VE, VP or sub-VP: alpha(t), sigma(t)), "
                         f"got sde={type(sde).__name__}")
    lam = _log_snr(sde, torch.tensor([t0, eps], dtype=torch.float64))
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"{method} needs sigma(eps) > 0 (finite log-SNR at the last time); "
                         f"sde={sde!r} has sigma(eps={eps!r}) = "
                         f"{_coef(sde.sigma, eps):.3g}: use eps > 0")
    if not float(lam[1]) > float(lam[0]):
        raise ValueError(f"{method} needs a log-SNR that decreases in t; sde={sde!r} has "
                         f"lambda(T)={float(lam[0]):.4g}, lambda(eps)={float(lam[1]):.4g}")


def _check_steps(steps: int, order: int, method: str) -> None:
    if steps < order:
        raise ValueError(f"steps={steps} is fewer than order={order}: {method} of order "
                         f"{order} needs steps >= {order} network evaluations")


def _phi(k: int, h: float) -> float:
    """phi_k(h) = sum_j h^j / (j + k)! (phi_0 = e^h, phi_{k+1} = (phi_k - 1/k!) / h); the
    series where the recurrence would cancel."""
    if abs(h) < 1.0:
        return sum(h ** j / math.factorial(j + k) for j in range(25))
    p = math.exp(h)
    for j in range(k):
        p = (p - 1.0 / math.factorial(j)) / h
    return p


def _newton(taus: list[float], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Coefficients c_k of the polynomial sum_k c_k tau^k through (tau_j, m_j), tau_0 = 0."""
    m0 = values[0]
    if len(values) == 1:
        return [m0]
    d01 = (values[1] - m0) / taus[1]
    if len(values) == 2:
        return [m0, d01]
    d012 = ((values[2] - values[1]) / (taus[2] - taus[1]) - d01) / taus[2]
    return [m0, d01 - taus[1] * d012, d012]


def _ei_step(x: torch.Tensor, coeffs: list[torch.Tensor], a: _Node, b: _Node,
             kind: str) -> torch.Tensor:
    """x at b from x at a, with the prediction taken as sum_k c_k (lambda - lambda_a)^k and
    the exponentially weighted integral done exactly (MATH.md 10.2, h = lambda_b - lambda_a):
    noise: x_b = (alpha_b/alpha_a) x - sigma_b sum_k k! h^(k+1) phi_(k+1)(h) c_k;
    data:  x_b = (sigma_b/sigma_a) x + alpha_b sum_k k! h^(k+1) phi_(k+1)(-h) c_k."""
    h = b.lam - a.lam
    if kind == "noise":
        out = (b.alpha / a.alpha) * x
        w = [-b.sigma * math.factorial(k) * h ** (k + 1) * _phi(k + 1, h) for k in range(3)]
    else:
        out = (b.sigma / a.sigma) * x
        w = [b.alpha * math.factorial(k) * h ** (k + 1) * _phi(k + 1, -h) for k in range(3)]
    for wk, c in zip(w, coeffs):
        out = out + wk * c
    return out


def _dpm_grid(sde: LinearSDE, intervals: int, t0: float, eps: float, schedule: str):
    """intervals + 1 float64 times from t0 down to eps: uniform in lambda, t or sqrt(t)."""
    if schedule == "time_uniform":
        ts = torch.linspace(t0, eps, intervals + 1, dtype=torch.float64)
    elif schedule == "time_quadratic":
        ts = torch.linspace(math.sqrt(t0), math.sqrt(eps), intervals + 1, dtype=torch.float64) ** 2
    else:
        lam = _log_snr(sde, torch.tensor([t0, eps], dtype=torch.float64))
        ts = _time_of_log_snr(sde, torch.linspace(float(lam[0]), float(lam[1]), intervals + 1,
                                                  dtype=torch.float64), eps, t0)
    ts[0], ts[-1] = t0, eps
    return ts


def _single_step_plan(sde, n: int, order: int, t0: float, eps: float, schedule: str):
    """(a, intermediate nodes, b) per step: n // order steps of order, then one of order
    n % order if that is not 0, so that the orders add up to n evaluations."""
    orders = [order] * (n // order) + ([n % order] if n % order else [])
    nodes = _nodes(sde, _dpm_grid(sde, len(orders), t0, eps, schedule))
    lam = [a.lam + r * (b.lam - a.lam) for k, a, b in zip(orders, nodes[:-1], nodes[1:])
           for r in _RATIOS[k]]
    mids = iter(_nodes(sde, _time_of_log_snr(sde, torch.tensor(lam, dtype=torch.float64),
                                             eps, t0)) if lam else [])
    return [(a, [next(mids) for _ in _RATIOS[k]], b)
            for k, a, b in zip(orders, nodes[:-1], nodes[1:])]


def _dpm_single(model, x, a: _Node, mids: list[_Node], b: _Node, kind: str) -> torch.Tensor:
    """One single-step DPM-Solver step a -> b of order 1 + len(mids) (that many evaluations):
    predictions at a and at the intermediate points mids (lambda_a + r h, r of _RATIOS), each
    reached with the polynomial so far; the last one and a fix the final polynomial."""
    m0 = model(x, a)
    coeffs = [m0]
    for node in mids:
        u = _ei_step(x, coeffs, a, node, kind)
        coeffs = _newton([0.0, node.lam - a.lam], [m0, model(u, node)])
    return _ei_step(x, coeffs, a, b, kind)


def _dpm_solver(score_fn, sde, x, grid, generator, *, order=3, multistep=True,
                prediction="data", schedule="logsnr"):
    """DPM-Solver (noise) / DPM-Solver++ (data), single-step or multistep, order 1-3, with
    exactly len(grid) - 1 score evaluations on its own grid from grid[0] to grid[-1]."""
    if isinstance(order, bool) or order not in _RATIOS:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if not isinstance(multistep, bool):
        raise ValueError(f"multistep must be True or False, got {multistep!r}")
    if prediction not in _PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid names: {list(_PREDICTIONS)}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid names: {list(_SCHEDULES)}")
    n, t0, eps = len(grid) - 1, float(grid[0]), float(grid[-1])
    _check_steps(n, order, "dpm_solver")
    _check_log_snr(sde, t0, eps, "dpm_solver")

    def model(y, node):
        return score_prediction(score_fn, sde, y, node.t, prediction)

    if multistep:   # one evaluation per interval; the first order - 1 steps warm up
        nodes = _nodes(sde, _dpm_grid(sde, n, t0, eps, schedule))
        hist: list[tuple[_Node, torch.Tensor]] = []
        for a, b in zip(nodes[:-1], nodes[1:]):
            hist = (hist + [(a, model(x, a))])[-order:]
            taus = [node.lam - a.lam for node, _ in reversed(hist)]
            x = _ei_step(x, _newton(taus, [m for _, m in reversed(hist)]), a, b, prediction)
        return x, n
    for a, mids, b in _single_step_plan(sde, n, order, t0, eps, schedule):
        x = _dpm_single(model, x, a, mids, b, prediction)
    return x, n


def _edm_heun(score_fn, sde, x, grid, generator, *, rho=7.0):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0) on
    y = x / alpha in noise-level time sigma_hat = sigma / alpha, dy/dsigma_hat = (y - x_0) /
    sigma_hat; len(grid) - 1 evaluations (an Euler last step when that is odd)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    n, t0, eps = len(grid) - 1, float(grid[0]), float(grid[-1])
    _check_steps(n, 2, "edm_heun")
    _check_log_snr(sde, t0, eps, "edm_heun")
    intervals = (n + 1) // 2
    lam = _log_snr(sde, torch.tensor([t0, eps], dtype=torch.float64))
    hi, lo = math.exp(-float(lam[0]) / rho), math.exp(-float(lam[1]) / rho)
    frac = torch.arange(intervals + 1, dtype=torch.float64) / intervals
    sig = (hi + frac * (lo - hi)) ** rho                  # EDM eq. 5: sigma_hat^(1/rho) linear
    ts = _time_of_log_snr(sde, -torch.log(sig), eps, t0)
    ts[0], ts[-1] = t0, eps
    nodes = _nodes(sde, ts)

    def slope(y, node):   # (y - D(y; sigma_hat)) / sigma_hat, D the data prediction at x = alpha y
        x0 = score_prediction(score_fn, sde, node.alpha * y, node.t, "data")
        return (y - x0) / math.exp(-node.lam)

    y = x / nodes[0].alpha
    for i, (a, b) in enumerate(zip(nodes[:-1], nodes[1:])):
        ds = math.exp(-b.lam) - math.exp(-a.lam)
        d1 = slope(y, a)
        y_euler = y + ds * d1
        y = y_euler if 2 * i + 2 > n else y + 0.5 * ds * (d1 + slope(y_euler, b))
    return nodes[-1].alpha * y, n


SAMPLERS = {
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "pc": _pc,
    "pc_lml": _pc_lml,
    "ode": _ode,
    "ode_euler": _ode_euler,
    "ode_heun": _ode_heun,
    "dpm_solver": _dpm_solver,
    "edm_heun": _edm_heun,
}

_OPTIONS = {"pc": ("snr", "corrector_steps"), "ode": ("rtol", "atol"),
            "pc_lml": ("snr", "corrector_steps", "rank", "damping", "directions"),
            "dpm_solver": ("order", "multistep", "prediction", "schedule"), "edm_heun": ("rho",)}
# "ode" ignores the grid's interior; dpm_solver and edm_heun build their own grids, and their
# steps count score evaluations: 20 (DPM-Solver's suggestion), 34 (+1 denoise: EDM's 35 NFE)
_DEFAULT_STEPS = {"ode": 1, "dpm_solver": 20, "edm_heun": 34}


def sample(score_fn: ScoreFn, sde: LinearSDE, shape, *, method: str = "pc",
           steps: int | None = None, generator: torch.Generator | None = None,
           eps: float = 1e-3, denoise: bool = True, x_T: torch.Tensor | None = None,
           device=None, dtype: torch.dtype = torch.float32, **options) -> SampleResult:
    """Draw samples of shape [B, ...] by integrating from the prior at T down to eps.

    method: a key of SAMPLERS. steps: grid intervals (default sde.N; unused by "ode"); for
    dpm_solver and edm_heun the score evaluations before denoising (default 20 and 34).
    generator: the one random source (prior and noise). eps: last time (Score SDE: 1e-3 for
    sampling). denoise: Tweedie step at eps. x_T: start here instead of a prior sample.
    options: per method, pc: snr=0.16, corrector_steps=1; pc_lml: those and rank=1,
    damping=1.0, directions="random"; ode: rtol=1e-5, atol=1e-5;
    dpm_solver: order=3, multistep=True, prediction="data", schedule="logsnr"; edm_heun: rho=7.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; valid names: {sorted(SAMPLERS)}")
    valid = _OPTIONS.get(method, ())
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid names: "
                         f"{list(valid)}")
    steps = _DEFAULT_STEPS.get(method, sde.N) if steps is None else steps
    grid = time_grid(sde, steps, eps)
    with torch.no_grad():
        if x_T is None:
            x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
            x = x_T.detach().clone()
        x, nfe = SAMPLERS[method](score_fn, sde, x, grid, generator, **options)
        if denoise:
            x = tweedie_denoise(score_fn, sde, x, float(grid[-1]))
            nfe += 1
    return SampleResult(x, int(nfe))


# ---- adaptive Dormand-Prince RK45 (scipy.integrate.RK45's controller, in torch) ----------
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def _initial_step(func, t0, y0, f0, direction, rtol, atol, span):
    """scipy's select_initial_step (Hairer, Norsett & Wanner, II.4)."""
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = func(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, span)


def odeint_rk45(func: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor,
                t0: float, t1: float, *, rtol: float = 1e-5, atol: float = 1e-5,
                first_step: float | None = None, max_steps: int = 100_000) -> ODEResult:
    """Solve dy/dt = func(t, y) from t0 to t1 (either direction) with adaptive RK45.

    The error norm is the RMS over every element of y (the whole batch, as Score SDE's
    solve_ivp on the flattened batch), scaled by atol + rtol max(|y|, |y_new|). Times are
    Python floats (float64); func receives t as a float.
    """
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got {rtol!r}, {atol!r}")
    t0, t1 = float(t0), float(t1)
    if t0 == t1:
        return ODEResult(y0, 0, 0, 0)
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    y, t = y0, t0
    f = func(t, y)
    nfe = 1
    if first_step is None:
        h = _initial_step(func, t, y, f, direction, rtol, atol, span)
        nfe += 1
    else:
        if not first_step > 0:
            raise ValueError(f"first_step must be positive, got {first_step!r}")
        h = min(float(first_step), span)
    steps = rejected = 0
    while direction * (t1 - t) > 0:
        if steps + rejected >= max_steps:
            raise RuntimeError(f"odeint_rk45: no convergence after {max_steps} steps at t={t:.6g} "
                               f"(h={h:.3g}); loosen rtol/atol or raise max_steps")
        step_rejected = False
        while True:
            h = min(h, abs(t1 - t))
            hs = direction * h
            t_new = t1 if h == abs(t1 - t) else t + hs
            K = [f]
            for c, a in zip(_C[1:], _A[1:]):
                dy = sum(ai * k for ai, k in zip(a, K))
                K.append(func(t + c * hs, y + hs * dy))
            y_new = y + hs * sum(b * k for b, k in zip(_B, K) if b != 0.0)
            f_new = func(t_new, y_new)
            K.append(f_new)
            nfe += 6
            err = hs * sum(e * k for e, k in zip(_E, K) if e != 0.0)
            scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
            err_norm = _rms(err / scale)
            if not math.isfinite(err_norm):
                raise FloatingPointError(f"odeint_rk45: non-finite state at t={t:.6g}")
            if err_norm < 1:
                factor = _MAX_FACTOR if err_norm == 0 else min(_MAX_FACTOR, _SAFETY * err_norm ** -0.2)
                if step_rejected:
                    factor = min(1.0, factor)
                break
            h *= max(_MIN_FACTOR, _SAFETY * err_norm ** -0.2)
            step_rejected = True
            rejected += 1
            if h < 1e-14 * max(1.0, abs(t)):
                raise RuntimeError(f"odeint_rk45: step size underflow at t={t:.6g}")
        t, y, f = t_new, y_new, f_new
        h *= factor
        steps += 1
    return ODEResult(y, nfe, steps, rejected)

"""Samplers for score-based diffusion: reverse SDE, predictor-corrector, probability-flow ODE.

    sample(score_fn, sde, shape, *, method="pc", steps=None, generator=None, **options)
        -> SampleResult(samples, nfe)

Methods (``SAMPLERS``), every one integrating from t = T down to t = eps on a float64 grid
t_0 = T > t_1 > ... > t_steps = eps (uniform in t, as Score SDE):

| method | what one step t -> t' (dt = t - t' > 0) does | NFE per step |
|---|---|---|
| euler_maruyama | reverse SDE: x += (g^2 s - f x) dt + g sqrt(dt) z | 1 |
| reverse_diffusion | ancestral step with the exact forward transition t' -> t, x_t = a x_t' + sqrt(v) z (a = alpha(t)/alpha(t'), v = sigma(t)^2 - a^2 sigma(t')^2): x = (2 - a) x + v s + sqrt(v) z (Score SDE's ReverseDiffusionPredictor; VE: SMLD, VP: DDPM) | 1 |
| pc | Langevin corrector (snr, corrector_steps) at t, then the reverse-diffusion predictor (Score SDE's PC sampler) | 1 + corrector_steps |
| ode | probability-flow ODE dx/dt = f x - 1/2 g^2 s (docs/MATH.md 7), adaptive Dormand-Prince RK45 (rtol, atol) | adaptive |
| ode_euler | the same ODE with fixed Euler steps | 1 |
| ode_heun | the same ODE with fixed Heun (trapezoidal RK2) steps | 2 |

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

import math
from typing import Callable, NamedTuple

import torch

from fpkern._checks import bcast

from fpkern.sde import LinearSDE

__all__ = ["SAMPLERS", "SampleResult", "sample", "time_grid", "odeint_rk45", "ODEResult",
           "probability_flow_drift", "tweedie_denoise"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def tweedie_denoise(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x_0 | x_t] = (x + sigma(t)^2 s(x, t)) / alpha(t) (one score evaluation)."""
    sigma2, alpha = _coef(sde.sigma2, t), _coef(sde.alpha, t)
    return (x + sigma2 * score_fn(x, _tvec(t, x))) / alpha


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


SAMPLERS = {
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "pc": _pc,
    "ode": _ode,
    "ode_euler": _ode_euler,
    "ode_heun": _ode_heun,
}

_OPTIONS = {"pc": ("snr", "corrector_steps"), "ode": ("rtol", "atol")}
_DEFAULT_STEPS = {"ode": 1}   # the adaptive solver ignores the grid's interior


def sample(score_fn: ScoreFn, sde: LinearSDE, shape, *, method: str = "pc",
           steps: int | None = None, generator: torch.Generator | None = None,
           eps: float = 1e-3, denoise: bool = True, x_T: torch.Tensor | None = None,
           device=None, dtype: torch.dtype = torch.float32, **options) -> SampleResult:
    """Draw samples of shape [B, ...] by integrating from the prior at T down to eps.

    method: a key of SAMPLERS. steps: grid intervals (default sde.N; unused by "ode").
    generator: the one random source (prior and noise). eps: last time (Score SDE: 1e-3 for
    sampling). denoise: Tweedie step at eps. x_T: start here instead of a prior sample.
    options: per method, pc: snr=0.16, corrector_steps=1; ode: rtol=1e-5, atol=1e-5.
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

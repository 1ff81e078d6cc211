"""Forward SDEs with linear drift: VE, VP and sub-VP (docs/MATH.md section 1).

Each SDE has the Score SDE interface (``T``, ``N``, ``sde``, ``marginal_prob``,
``prior_sampling``, ``prior_logp``, ``discretize``, ``reverse``) plus the scalar
coefficients the FPE residual needs, as functions of a time tensor ``t`` of shape
``[B]``:

    f(t)      drift coefficient, dx = f(t) x dt + g(t) dW
    g2(t)     squared diffusion g(t)^2
    alpha(t)  mean scale of the marginal, x_t = alpha(t) x_0 + sigma(t) z
    sigma(t)  standard deviation of the marginal

All of them are finite and accurate for every t in [0, T]: 1 - alpha^2 is computed as
-expm1(2 log alpha), which keeps its digits as t -> 0.
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch

from fpkern._checks import bcast, check_time

__all__ = ["LinearSDE", "VESDE", "VPSDE", "SubVPSDE", "ReverseSDE", "SDES", "get_sde"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]



class LinearSDE(abc.ABC):
    """dx = f(t) x dt + g(t) dW on t in [0, T], discretised with N steps for sampling."""

    T: float = 1.0

    def __init__(self, N: int = 1000):
        if int(N) < 1:
            raise ValueError(f"N must be a positive number of steps, got {N}")
        self.N = int(N)

    # ---- scalar coefficients (per-sample tensors of shape [B]) -------------------
    @abc.abstractmethod
    def f(self, t: torch.Tensor) -> torch.Tensor:
        """Drift coefficient f(t)."""

    @abc.abstractmethod
    def g2(self, t: torch.Tensor) -> torch.Tensor:
        """Squared diffusion coefficient g(t)^2."""

    @abc.abstractmethod
    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log of the marginal mean scale alpha(t)."""

    @abc.abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Marginal standard deviation sigma(t)."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior at t = T."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        """Marginal variance sigma(t)^2, smooth in t (its derivative is finite at t = 0)."""
        return self.sigma(t) ** 2

    def g(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.g2(t))

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), g(t)^2), the pair the FPE residual uses."""
        return self.f(t), self.g2(t)

    # ---- Score SDE interface ----------------------------------------------------
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(t) x (shape of x) and diffusion g(t) (shape [B])."""
        return bcast(self.f(t), x) * x, self.g(t)

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha(t) x_0 (shape of x) and std sigma(t) (shape [B]) of p_t(x_t | x_0)."""
        return bcast(self.alpha(t), x) * x, self.sigma(t)

    def prior_sampling(self, shape, *, generator: torch.Generator | None = None,
                       device=None, dtype=None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        z = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
        return self.prior_std * z.to(device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I), summed over every dimension but the batch."""
        d = z[0].numel()
        s2 = self.prior_std ** 2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Euler-Maruyama step of size T/N: (f, G) with x_{i+1} = x_i + f + G z."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, score_fn, probability_flow)

    def check_time(self, t: torch.Tensor, *, name: str = "t") -> None:
        check_time(t, self.T, name=name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()}, N={self.N})"

    def _params(self) -> str:
        return ""


class ReverseSDE:
    """The reverse-time SDE (or probability-flow ODE) of a forward SDE and a score."""

    def __init__(self, forward: LinearSDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward_sde = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.T = forward.T
        self.N = forward.N

    def _weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drift, diffusion = self.forward_sde.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - bcast(diffusion ** 2, x) * score * self._weight()
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, G = self.forward_sde.discretize(x, t)
        rev_f = f - bcast(G ** 2, x) * self.score_fn(x, t) * self._weight()
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class VESDE(LinearSDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def f(self, t):
        return 0.0 * t   # keeps t's graph, so derivatives in t are defined (and zero)

    def g2(self, t):
        return 2 * self._log_ratio * self.sigma(t) ** 2

    def log_alpha(self, t):
        return 0.0 * t

    def sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    @property
    def prior_std(self):
        return self.sigma_max

    def discrete_sigmas(self, device=None, dtype=torch.float64) -> torch.Tensor:
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max),
                                        self.N, device=device, dtype=dtype))

    def discretize(self, x, t):
        """SMLD (NCSN) discretisation, as Score SDE's VESDE."""
        sigmas = self.discrete_sigmas(device=t.device, dtype=t.dtype)
        step = (t * (self.N - 1) / self.T).long()
        sigma = sigmas[step]
        prev = torch.where(step == 0, torch.zeros_like(t), sigmas[(step - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma ** 2 - prev ** 2)

    def _params(self):
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"


class VPSDE(LinearSDE):
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min), f = -beta / 2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def log_alpha(self, t):
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def one_minus_alpha2(self, t):
        """1 - alpha(t)^2 without cancellation near t = 0."""
        return -torch.expm1(2 * self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(self.one_minus_alpha2(t))

    def sigma2(self, t):
        return self.one_minus_alpha2(t)

    @property
    def prior_std(self):
        return 1.0

    def discretize(self, x, t):
        """DDPM discretisation, as Score SDE's VPSDE."""
        betas = torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N,
                               device=t.device, dtype=t.dtype)
        step = (t * (self.N - 1) / self.T).long()
        beta = betas[step]
        f = bcast(torch.sqrt(1 - beta), x) * x - x
        return f, torch.sqrt(beta)

    def _params(self):
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"


class SubVPSDE(VPSDE):
    """sub-VP: the VP drift with g^2 = beta (1 - alpha^4) and sigma = 1 - alpha^2."""

    def g2(self, t):
        return self.beta(t) * -torch.expm1(4 * self.log_alpha(t))

    def sigma(self, t):
        return self.one_minus_alpha2(t)

    def sigma2(self, t):
        return self.one_minus_alpha2(t) ** 2

    def discretize(self, x, t):
        return LinearSDE.discretize(self, x, t)


SDES: dict[str, type[LinearSDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def get_sde(name: str, **kwargs) -> LinearSDE:
    """Build an SDE by name ('ve', 'vp' or 'subvp') with keyword parameters."""
    try:
        cls = SDES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown SDE {name!r}; valid names: {sorted(SDES)}") from None
    return cls(**kwargs)

"""Adapters: networks from other codebases as score functions s(x, t) = grad_x log q_t(x).

Each adapter is an ``nn.Module`` with ScoreFn's interface (``input_shape``, ``labels(t)``,
``forward(x, t)`` -> a score of x's shape), so every fpkern op and loss takes it; the
network itself never sees a score convention (docs/MATH.md section 1 for the SDEs).

| adapter | the network computes | score |
|---|---|---|
| ``NoisePredictionScore(net, sde)`` | eps_hat(x_t, timestep): diffusers ``UNet2DModel``, ``DiTTransformer2DModel``, any DDPM epsilon network | -eps_hat / sigma(t) |
| ``DenoiserScore(net, sde)`` | D(x; sigma) ~ E[x_0 given x = x_0 + sigma n] (EDM) | (alpha D(x / alpha; sigma / alpha) - x) / sigma^2 |
| ``EnergyScore(net)`` | E(x, t), one value per sample [B] (``kind="log_density"``: log q(x, t)) | -grad_x E (grad_x log q) |

Time conventions:

- ``NoisePredictionScore``: diffusers models are trained on the integer timesteps
  0 .. N - 1 of a ``DDPMScheduler`` (N = ``num_train_timesteps``, default 1000), so time
  t in [0, T] is passed as the timestep (N - 1) t / T: 999 t, as Score SDE's continuously
  trained VP networks take it. The DDPM schedule betas = linspace(beta_start, beta_end, N)
  is the VP SDE with beta_min = N beta_start and beta_max = N beta_end; pass the
  scheduler (``schedule=``) and the adapter refuses an SDE that is not it.
- ``DenoiserScore``: x_t = alpha x_0 + sigma z, so x_t / alpha is x_0 plus noise of std
  sigma / alpha: the denoiser gets that input and that noise level (EDM's scaled
  formulation, s(t) = alpha); Tweedie's formula gives the score. Under a VE SDE alpha = 1.
- ``EnergyScore``: the network takes t itself; s = -grad_x sum_b E(x, t)_b, so samples
  must not interact (no batch statistics). The gradient is a reverse pass with
  ``create_graph`` (``torch.func.grad`` inside torch.func transforms and forward-mode AD):
  it stays differentiable, for the parameter gradient of a loss on s and for the
  residual's derivatives of s (forward mode, vmap and reverse mode compose with it).

Derivatives: when an op differentiates the network with respect to its input (x or t
requiring grad, a ``torch.func`` transform, forward-mode AD), the adapter runs it with the
math attention backend (``sdpa_kernel(SDPBackend.MATH)``): CPU flash attention has neither
a forward-mode rule nor a double backward. It also works around two normalisation rules
of torch's: ``group_norm`` gets a contiguous input (its forward-mode rule views the input,
which fails on the strided view an attention block returns), and ``layer_norm`` runs as
mean, variance and rsqrt, because its derivative rules are not correctly differentiable
again: second directional derivatives through them, by nested JVPs (the Laplacian, exact
Jacobians) or by reverse mode nested three deep (method "naive"'s laplacian form), come out
wrong (pytorch/pytorch#196700). A plain forward (a DSM step) runs unchanged, and so does a
pass on Jets (method "fused"), where the jet rules take the attention and the norms.

Checks, at every call: x's per-sample shape, t's range, and what the network returns (a
tensor, or an output with ``.sample`` as diffusers models return, of the expected shape
and x's dtype), each error naming the adapter and the fix.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from fpkern._autodiff import autodiff_backends
from fpkern._checks import bcast, check_batch, check_choice, check_floating
from fpkern.jet import Jet, JetUnsupported
from fpkern.sde import LinearSDE, VPSDE

__all__ = ["NoisePredictionScore", "DenoiserScore", "EnergyScore", "check_schedule",
           "derivative_kernels", "ENERGY_KINDS"]

#: EnergyScore kinds: what the network's one value per sample is.
ENERGY_KINDS = ("energy", "log_density")


# ---- running a foreign network under derivatives ------------------------------------------

def _forward_mode_active() -> bool:
    """Whether a torch.func transform or a forward-AD dual level is active."""
    functorch = getattr(torch._C, "_functorch", None)
    level = getattr(functorch, "maybe_current_level", None)
    if level is None or level() is not None:
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


@contextlib.contextmanager
def derivative_kernels(x: torch.Tensor, t: torch.Tensor):
    """The context a network runs in at (x, t): the math attention backend and
    normalisations that differentiate correctly to any order (fpkern._autodiff) when a
    derivative with respect to x or t is being taken; nothing for a plain forward or a pass
    on Jets (module docstring)."""
    if (isinstance(x, Jet) or isinstance(t, Jet)
            or not (x.requires_grad or t.requires_grad or _forward_mode_active())):
        yield
        return
    with autodiff_backends():
        yield


def _unwrap(out: Any, who: str) -> torch.Tensor:
    """The tensor a network returned: itself, ``.sample`` (diffusers outputs) or out[0]."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"{who}: the network returned {type(out).__name__}; expected a tensor, an "
                    f"output with a .sample tensor (diffusers) or a tuple starting with one")


def _dtype_ok(out: torch.Tensor, x: torch.Tensor) -> bool:
    """x's dtype, or (a network under autocast) the autocast dtype of x's device."""
    if out.dtype == x.dtype:
        return True
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and out.dtype == torch.get_autocast_dtype(dev)


def _check_dtype(out: torch.Tensor, x: torch.Tensor, who: str) -> None:
    if not _dtype_ok(out, x):
        raise ValueError(f"{who}: the network returned {out.dtype} for x of {x.dtype}; run the "
                         f"network in x's dtype (net.to({x.dtype}))")


def _input_shape(net, input_shape) -> tuple[int, ...]:
    """The per-sample shape of x: given, the network's ``input_shape``, or a diffusers
    config's (in_channels, sample_size, sample_size)."""
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
    elif getattr(net, "input_shape", None) is not None:
        shape = tuple(int(d) for d in net.input_shape)
    else:
        cfg = getattr(net, "config", None)
        channels = getattr(cfg, "in_channels", None)
        size = getattr(cfg, "sample_size", None)
        if channels is None or size is None:
            raise ValueError(f"input_shape is needed for {type(net).__name__}, which has neither "
                             f"an input_shape attribute nor a diffusers config with in_channels "
                             f"and sample_size")
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(channels),) + tuple(int(d) for d in size)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive sizes, got {shape}")
    return shape


class _Adapter(nn.Module):
    """What the adapters share: the network (a submodule when it is one, so its parameters
    are the adapter's), the SDE, x's per-sample shape, the keyword arguments of every call,
    the input checks and the call itself."""

    def __init__(self, net, sde: LinearSDE | None, input_shape, net_kwargs):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be a callable network, got {type(net).__name__}")
        if sde is not None and not isinstance(sde, LinearSDE):
            raise TypeError(f"sde must be a fpkern.sde.LinearSDE, got {type(sde).__name__}")
        if net_kwargs is not None and not isinstance(net_kwargs, Mapping):
            raise TypeError(f"net_kwargs must be a mapping of keyword arguments, got "
                            f"{type(net_kwargs).__name__}")
        self.net = net
        self.sde = sde
        self._shape = _input_shape(net, input_shape)
        self.net_kwargs = dict(net_kwargs or {})

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    def _check(self, x: torch.Tensor, t: torch.Tensor) -> None:
        check_floating(x, "x")
        check_batch(x, t)
        if tuple(x.shape[1:]) != self._shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self._shape))}] for "
                             f"{type(self).__name__}, got {tuple(x.shape)}")
        if self.sde is not None:
            self.sde.check_time(t)

    def _call(self, x: torch.Tensor, t: torch.Tensor, *args) -> torch.Tensor:
        """net(*args, **net_kwargs) in derivative_kernels(x, t), its tensor unwrapped."""
        with derivative_kernels(x, t):
            out = self.net(*args, **self.net_kwargs)
        return _unwrap(out, type(self).__name__)

    def _same_shape(self, out: torch.Tensor, x: torch.Tensor, what: str) -> None:
        if out.shape != x.shape:
            raise ValueError(f"{type(self).__name__}: the network returned shape "
                             f"{tuple(out.shape)} for x of shape {tuple(x.shape)}; {what} must "
                             f"have x's shape")
        _check_dtype(out, x, type(self).__name__)


# ---- noise prediction (diffusers) ---------------------------------------------------------

def check_schedule(schedule, sde: LinearSDE) -> int:
    """The number of training timesteps of a DDPM noise schedule (a diffusers scheduler or
    its config mapping), after checking that it is `sde`: epsilon prediction, linear betas
    from beta_start to beta_end over N steps = VPSDE(beta_min=N beta_start,
    beta_max=N beta_end). Raises ValueError naming the field that differs."""
    cfg = getattr(schedule, "config", schedule)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"schedule must be a diffusers scheduler or its config mapping, got "
                        f"{type(schedule).__name__}")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"schedule has prediction_type {prediction!r}; NoisePredictionScore "
                         f"takes networks that predict the noise ('epsilon')")
    kind = cfg.get("beta_schedule", "linear")
    if kind != "linear" or cfg.get("trained_betas") is not None:
        raise ValueError(f"schedule has beta_schedule {kind!r}"
                         f"{' with trained_betas' if cfg.get('trained_betas') is not None else ''}"
                         f"; only linear betas are a VP SDE (fpkern.sde.VPSDE)")
    if type(sde) is not VPSDE:
        raise ValueError(f"a DDPM schedule with linear betas is the VP SDE, but sde is "
                         f"{type(sde).__name__}; use VPSDE(beta_min=N beta_start, "
                         f"beta_max=N beta_end)")
    n = int(cfg.get("num_train_timesteps", 1000))
    bmin, bmax = n * float(cfg.get("beta_start", 1e-4)), n * float(cfg.get("beta_end", 0.02))
    if not (math.isclose(bmin, sde.beta_min, rel_tol=1e-6)
            and math.isclose(bmax, sde.beta_max, rel_tol=1e-6)):
        raise ValueError(f"schedule betas linspace({cfg.get('beta_start', 1e-4)}, "
                         f"{cfg.get('beta_end', 0.02)}, {n}) are VPSDE(beta_min={bmin:.6g}, "
                         f"beta_max={bmax:.6g}), but sde is {sde!r}")
    return n


class NoisePredictionScore(_Adapter):
    """s(x, t) = -eps_hat(x, (N - 1) t / T) / sigma(t) for a noise-prediction network under a
    VP or sub-VP SDE (module docstring: the timestep convention and the schedule check).

    ``net(x, timesteps, **net_kwargs)``, the timesteps fractional ((N - 1) t / T, as Score
    SDE feeds its DDPM networks 999 t): diffusers' ``UNet2DModel`` and
    ``DiTTransformer2DModel`` as they are (DiT's class labels in ``net_kwargs``, e.g.
    ``{"class_labels": torch.tensor([0])}``, tensors that broadcast over any batch).
    ``learned_sigma``: the network returns 2C channels, the noise and a variance (DiT's and
    ADM's checkpoints); the first C are the noise. ``input_shape`` defaults to the network's
    (``input_shape`` or diffusers' in_channels and sample_size).
    """

    def __init__(self, net, sde: LinearSDE, *, input_shape=None,
                 num_train_timesteps: int | None = None, schedule=None,
                 learned_sigma: bool = False, net_kwargs: Mapping[str, Any] | None = None):
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde must be a VPSDE or SubVPSDE (x_t = alpha x_0 + sigma eps), got "
                            f"{type(sde).__name__}; for VE networks use ScoreFn or DenoiserScore")
        super().__init__(net, sde, input_shape, net_kwargs)
        n = check_schedule(schedule, sde) if schedule is not None else None
        if num_train_timesteps is not None and n is not None and int(num_train_timesteps) != n:
            raise ValueError(f"num_train_timesteps={num_train_timesteps} but the schedule has "
                             f"{n} training timesteps")
        n = n if n is not None else (1000 if num_train_timesteps is None else num_train_timesteps)
        if isinstance(n, bool) or int(n) != n or int(n) < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {n!r}")
        self.num_train_timesteps = int(n)
        self.learned_sigma = bool(learned_sigma)

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the network takes: (N - 1) t / T, in [0, N - 1]."""
        return t * ((self.num_train_timesteps - 1) / self.sde.T)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t), the std the predicted noise is divided by."""
        return self.sde.sigma(t)

    def _noise(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        if self.learned_sigma:
            want = (x.shape[0], 2 * C) + tuple(x.shape[2:])
            if out.shape != want:
                raise ValueError(f"NoisePredictionScore(learned_sigma=True): the network returned "
                                 f"shape {tuple(out.shape)}; a noise and a variance need "
                                 f"{want}")
            _check_dtype(out, x, type(self).__name__)
            return out[:, :C]
        if out.dim() == x.dim() and out.shape[1] == 2 * C and out.shape[2:] == x.shape[2:]:
            raise ValueError(f"NoisePredictionScore: the network returned shape "
                             f"{tuple(out.shape)}, twice x's {C} channels: a network that also "
                             f"predicts the variance (learned sigma, as DiT's checkpoints do) "
                             f"needs learned_sigma=True")
        self._same_shape(out, x, "the predicted noise")
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check(x, t)
        eps = self._noise(self._call(x, t, x, self.labels(t).to(x.dtype)), x)
        return -eps / bcast(self.std(t).to(x.dtype), eps)

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, num_train_timesteps={self.num_train_timesteps}, "
                f"learned_sigma={self.learned_sigma}")


# ---- denoisers (EDM) ----------------------------------------------------------------------

class DenoiserScore(_Adapter):
    """s(x, t) = (alpha D(x / alpha; sigma / alpha) - x) / sigma^2 for a denoiser
    ``net(x, sigma [B], **net_kwargs)`` trained on x_0 + sigma n (EDM's networks with their
    preconditioning), under any fpkern SDE (module docstring)."""

    def __init__(self, net, sde: LinearSDE, *, input_shape=None,
                 net_kwargs: Mapping[str, Any] | None = None):
        if not isinstance(sde, LinearSDE):
            raise TypeError(f"sde must be a fpkern.sde.LinearSDE, got {type(sde).__name__}")
        super().__init__(net, sde, input_shape, net_kwargs)

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level the denoiser takes: sigma(t) / alpha(t)."""
        return self.sde.sigma(t) / self.sde.alpha(t)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sde.sigma(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check(x, t)
        alpha = bcast(self.sde.alpha(t).to(x.dtype), x)
        sigma = bcast(self.std(t).to(x.dtype), x)
        d = self._call(x, t, x / alpha, self.labels(t).to(x.dtype))
        self._same_shape(d, x, "the denoised image D(x; sigma)")
        return (alpha * d - x) / sigma ** 2

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}"


# ---- energies and log-densities -----------------------------------------------------------

class EnergyScore(_Adapter):
    """s(x, t) = -grad_x E(x, t) (``kind="energy"``) or grad_x log q(x, t)
    (``kind="log_density"``) for ``net(x, t, **net_kwargs)`` returning one value per sample,
    shape [B]. ``sde`` (optional) only checks t's range. ``input_shape`` is needed unless
    the network has one.

    The gradient is a reverse pass of the batch sum with ``create_graph`` (or
    ``torch.func.grad`` inside torch.func transforms), differentiable to any order. There
    is no jet rule for it: the vector residual's method "fused" runs the generic torch.func
    path. The scalar log-density FPE, ``fpkern.ops.log_density_fpe(adapter, x, t, sde)``,
    runs the network itself on Jets (``log_density``) in one forward pass.
    """

    def __init__(self, net, sde: LinearSDE | None = None, *, input_shape=None,
                 kind: str = "energy", net_kwargs: Mapping[str, Any] | None = None):
        check_choice("kind", kind, ENERGY_KINDS)
        super().__init__(net, sde, input_shape, net_kwargs)
        self.kind = kind

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network takes: t itself."""
        return t

    def value(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network returns at (x, t): E or log q, shape [B] (checked)."""
        out = self._call(x, t, x, self.labels(t).to(x.dtype))
        if out.shape != (x.shape[0],):
            hint = ("; a column [B, 1] holds the right values: return out.squeeze(-1) from the "
                    "network" if out.shape == (x.shape[0], 1) else "")
            raise ValueError(f"EnergyScore: the network returned shape {tuple(out.shape)} for a "
                             f"batch of {x.shape[0]}; it must return one value ({self.kind}) "
                             f"per sample, shape [B]{hint}")
        _check_dtype(out, x, type(self).__name__)
        return out

    def log_density(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(x, t) up to a constant in x, shape [B]: -E (``kind="energy"``) or the
        network's value (``"log_density"``). Runs on Jets (fpkern.ops.log_density_fpe)."""
        self._check(x, t)
        u = self.value(x, t)
        return -u if self.kind == "energy" else u

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if isinstance(x, Jet) or isinstance(t, Jet):
            raise JetUnsupported("EnergyScore: the gradient of an energy network has no jet "
                                 "rule; its scalar FPE runs on Jets: "
                                 "fpkern.ops.log_density_fpe")
        self._check(x, t)
        grad = self._grad(x, t)
        return -grad if self.kind == "energy" else grad

    def _grad(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x of the batch sum of the network's value, with a graph when grad mode is on
        or x requires grad (an outer derivative in x)."""
        if _forward_mode_active():
            return torch.func.grad(lambda y: self.value(y, t).sum())(x)
        outer = x.requires_grad
        keep = torch.is_grad_enabled() or outer
        y = x if outer else x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.value(y, t).sum(), y, create_graph=keep)
        return grad

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, sde={self.sde!r}"

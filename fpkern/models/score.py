"""ScoreFn: the one place that turns a raw network into the score s(x, t) = grad_x log q_t(x).

Conventions, as Score SDE's ``get_score_fn`` for continuous training (docs/MATH.md section 1):

| network | SDE | labels | score |
|---|---|---|---|
| Score SDE (NCSN++, DDPM++, DDPM) | VE | sigma(t) | net(x, labels) (NCSN++ with ``scale_by_sigma`` divides by sigma inside) |
| Score SDE | VP, sub-VP | 999 t | -net(x, labels) / sigma(t) |
| MLP (``output_type = "noise"``) | any | t | -net(x, t) / sigma(t) |

With ``continuous=False`` the discrete Score SDE conventions apply (VE: label
round((T - t)(N - 1)), noise levels counted from the largest; VP: label t (N - 1) and the
DDPM std sqrt(1 - prod(1 - beta_i)); sub-VP keeps the continuous ones, as in Score SDE).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fpkern._checks import bcast, check_batch, check_floating
from fpkern.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

__all__ = ["ScoreFn", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("score_sde", "noise")



class ScoreFn(nn.Module):
    """``forward(x [B, ...], t [B]) -> score`` of shape x, for a raw network and an SDE.

    ``net`` must expose ``input_shape`` (the per-sample shape of x) and ``output_type``
    (one of ``OUTPUT_TYPES``). The wrapper never changes the network's train/eval mode.
    """

    def __init__(self, net: nn.Module, sde: LinearSDE, *, continuous: bool = True):
        super().__init__()
        if not isinstance(sde, (VESDE, VPSDE)):
            raise TypeError(f"sde must be a VESDE, VPSDE or SubVPSDE, got {type(sde).__name__}")
        output_type = getattr(net, "output_type", None)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"network {type(net).__name__} has output_type {output_type!r}; "
                             f"valid: {list(OUTPUT_TYPES)}")
        if not hasattr(net, "input_shape"):
            raise ValueError(f"network {type(net).__name__} must define input_shape")
        self.net = net
        self.sde = sde
        self.continuous = bool(continuous)
        self.output_type = output_type

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.net.input_shape)

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The conditioning labels the raw network takes for times t [B]."""
        sde = self.sde
        if self.output_type == "noise":
            return t
        if isinstance(sde, VESDE):
            if self.continuous:
                return sde.sigma(t)
            return torch.round((sde.T - t) * (sde.N - 1)).long()
        if self.continuous or isinstance(sde, SubVPSDE):
            return t * 999
        return t * (sde.N - 1)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """The std the raw output is divided by (VP-type and noise-predicting networks)."""
        sde = self.sde
        if (self.output_type == "score_sde" and not self.continuous
                and type(sde) is VPSDE):
            betas = torch.linspace(sde.beta_min / sde.N, sde.beta_max / sde.N, sde.N,
                                   dtype=torch.float64, device=t.device)
            s = torch.sqrt(-torch.expm1(torch.cumsum(torch.log1p(-betas), 0)))
            return s[(t * (sde.N - 1)).long()].to(t.dtype)
        return sde.sigma(t)

    def _check(self, x: torch.Tensor, t: torch.Tensor) -> None:
        check_floating(x, "x")
        check_batch(x, t)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}] "
                             f"for this network, got {tuple(x.shape)}")
        self.sde.check_time(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check(x, t)
        labels = self.labels(t)
        if labels.is_floating_point():
            labels = labels.to(x.dtype)
        out = self.net(x, labels)
        if self.output_type == "score_sde" and isinstance(self.sde, VESDE):
            return out
        return -out / bcast(self.std(t).to(x.dtype), out)

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, continuous={self.continuous}"

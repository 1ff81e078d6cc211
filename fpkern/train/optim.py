"""The training loop's optimizer: Adam (betas 0.9 / 0.999, eps 1e-8, as Score SDE), fused.

torch's fused Adam updates every parameter in one kernel per step, where the default
multi-tensor path loops over the tensors: on networks of a few hundred small tensors that
loop is a noticeable share of a plain DSM step (timings: benchmarks/results/README.md,
"Design notes"). The fused kernel exists for CPU and CUDA floating-point parameters;
anything else (parameters on several kinds of device included) gets the default
implementation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["adam"]

_FUSED_DEVICES = ("cpu", "cuda")


def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam over ``params``, fused when all of them are floating point on CPU or CUDA."""
    params = list(params)
    devices = {p.device.type for p in params}
    fused = (len(devices) == 1 and devices <= set(_FUSED_DEVICES)
             and all(p.is_floating_point() for p in params))
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)

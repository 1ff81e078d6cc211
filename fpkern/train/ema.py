"""Exponential moving average of a network's weights (Score SDE's ExponentialMovingAverage)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA:
    """A frozen copy of ``net`` tracking p_ema <- d p_ema + (1 - d) p after each step, with
    Score SDE's warm-up d = min(decay, (1 + n) / (10 + n)), n the number of updates.
    Buffers are copied as they are. The update is one multi-tensor lerp over all parameters,
    the elementwise result of a per-tensor loop bit for bit, at a fraction of the loop's
    per-tensor overhead (benchmarks/results/README.md, "Design notes")."""

    def __init__(self, net: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(net).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module, num_updates: int) -> None:
        d = min(self.decay, (1 + num_updates) / (10 + num_updates))
        ema = list(self.module.parameters())
        if ema:
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - d)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(net.buffers()))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

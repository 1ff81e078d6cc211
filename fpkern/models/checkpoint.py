"""Read and write Score SDE checkpoints: ``{"model", "ema", "optimizer", "step"}``.

Score SDE saves ``model`` as the state_dict of a ``DataParallel`` wrapper (keys prefixed
``module.``) and ``ema`` as its ``ExponentialMovingAverage.state_dict()``:
``{"decay", "num_updates", "shadow_params"}`` where ``shadow_params`` is a list holding one
tensor per trainable parameter, in ``parameters()`` order (the Gaussian Fourier ``W`` is not
trainable and has no shadow). fpkern's networks register parameters in Score SDE's order,
so the list maps onto them one to one. An ``ema`` entry that is itself a name-keyed
state_dict is accepted too.

The ``model`` entry holds the networks' ``sigmas`` buffer too (``module.sigmas``, Score SDE's
``get_sigmas(config)``, float64), which fpkern's networks carry in the same place. Keys and
shapes are checked before anything is loaded, and ``sigmas`` against the configuration the
network was built from: a mismatch raises ``CheckpointMismatchError`` listing the first
differences.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from fpkern.models.ncsnpp import ScoreSDENetwork, sigmas_mismatch
from fpkern.models.presets import from_score_sde_config

__all__ = ["CheckpointMismatchError", "load_score_sde_checkpoint", "save_score_sde_checkpoint",
           "check_state_dict", "strip_prefix"]

_SHOW = 10


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the network built from the config."""


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop ``prefix`` from every key that has it (DataParallel / DDP checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _report(what: str, missing: list[str], unexpected: list[str],
            shapes: list[tuple[str, Any, Any]]) -> str:
    lines = [f"{what} does not match the network: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(shapes)} with another shape"]
    if missing:
        lines.append("  missing: " + ", ".join(missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else ""))
    if unexpected:
        lines.append("  unexpected: " + ", ".join(unexpected[:_SHOW])
                     + (" ..." if len(unexpected) > _SHOW else ""))
    for k, want, got in shapes[:_SHOW]:
        lines.append(f"  {k}: network {want}, checkpoint {got}")
    if len(shapes) > _SHOW:
        lines.append(f"  ... and {len(shapes) - _SHOW} more shape differences")
    return "\n".join(lines)


def check_state_dict(net: nn.Module, state: Mapping[str, Any], *, what: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError unless ``state`` has exactly ``net``'s keys and shapes
    and, for a Score SDE network, the noise levels (``sigmas``) of its configuration."""
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{what} must be a mapping of tensors, got {type(state).__name__}")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(v.shape), _shape(state[k])) for k, v in expected.items()
              if k in state and _shape(state[k]) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(_report(what, missing, unexpected, shapes))
    if isinstance(net, ScoreSDENetwork) and (msg := sigmas_mismatch(net, state["sigmas"])):
        raise CheckpointMismatchError(f"{what}: {msg}")


def _trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


def _apply_ema(net: nn.Module, ema: Any) -> None:
    if isinstance(ema, Mapping) and "shadow_params" in ema:
        shadows = ema["shadow_params"]
        params = _trainable(net)
        if not isinstance(shadows, Sequence) or isinstance(shadows, (str, bytes)):
            raise CheckpointMismatchError("ema.shadow_params must be a list of tensors")
        n = min(len(shadows), len(params))
        shapes = [(name, tuple(p.shape), _shape(shadows[i]))
                  for i, (name, p) in enumerate(params[:n]) if _shape(shadows[i]) != tuple(p.shape)]
        missing = [name for name, _ in params[n:]]
        unexpected = [f"shadow_params[{i}]" for i in range(n, len(shadows))]
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(_report("checkpoint ema.shadow_params", missing,
                                                  unexpected, shapes))
        with torch.no_grad():
            for (_, p), s in zip(params, shadows):
                p.copy_(s)
        return
    if isinstance(ema, Mapping) and ema and all(isinstance(v, torch.Tensor) for v in ema.values()):
        state = strip_prefix(ema)
        check_state_dict(net, state, what="checkpoint ema")
        net.load_state_dict(state)
        return
    raise CheckpointMismatchError("checkpoint 'ema' entry is neither Score SDE's EMA state "
                                  "{decay, num_updates, shadow_params} nor a state_dict")


def load_score_sde_checkpoint(path: str | os.PathLike, cfg: Mapping[str, Any], *,
                              ema: bool = True, map_location: Any = "cpu") -> nn.Module:
    """Build the network of ``cfg`` and load a Score SDE checkpoint into it.

    ``ema=True`` loads ``model`` and then overwrites the trainable parameters with the EMA
    weights (what Score SDE samples and evaluates with); ``ema=False`` keeps the raw
    ``model`` weights. Read with ``torch.load(weights_only=True)``. The network is
    returned in training mode, as a new ``nn.Module`` is.
    """
    net = from_score_sde_config(cfg)
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointMismatchError(f"{os.fspath(path)} is not a Score SDE checkpoint "
                                      f"(expected keys model, ema, optimizer, step; got {keys})")
    state = strip_prefix(ckpt["model"]) if isinstance(ckpt["model"], Mapping) else ckpt["model"]
    check_state_dict(net, state, what="checkpoint model")
    net.load_state_dict(state)
    if ema:
        if "ema" not in ckpt:
            raise CheckpointMismatchError(f"{os.fspath(path)} has no 'ema' entry; pass ema=False")
        _apply_ema(net, ckpt["ema"])
    return net


def save_score_sde_checkpoint(path: str | os.PathLike, net: nn.Module, *,
                              ema_params: Sequence[torch.Tensor] | None = None,
                              ema_decay: float = 0.9999, num_updates: int = 0, step: int = 0,
                              optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write ``net`` in Score SDE's checkpoint layout (``module.`` keys, the ``sigmas``
    buffer among them, EMA shadow list), which load_score_sde_checkpoint and Score SDE read.

    ``ema_params``: one tensor per trainable parameter, in ``parameters()`` order; by
    default a copy of the current weights.
    """
    trainable = _trainable(net)
    if ema_params is None:
        ema_params = [p.detach().clone() for _, p in trainable]
    if len(ema_params) != len(trainable):
        raise ValueError(f"ema_params has {len(ema_params)} tensors, the network "
                         f"{len(trainable)} trainable parameters")
    torch.save({
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "model": {"module." + k: v.detach().clone() for k, v in net.state_dict().items()},
        "ema": {"decay": float(ema_decay), "num_updates": int(num_updates),
                "shadow_params": [t.detach().clone() for t in ema_params]},
        "step": int(step),
    }, path)

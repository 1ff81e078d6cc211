"""The network and SDE a training run uses, from its options: the one builder shared by the
training loop (fpkern.train) and the commands that rebuild a checkpointed model
(fpkern.sample, fpkern.evaluate)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn as nn

from fpkern.models.mlp import MLP
from fpkern.models.presets import from_score_sde_config, get_config, sde_from_config
from fpkern.sde import LinearSDE, get_sde

__all__ = ["BuiltModel", "build_model", "SDE_CONFIG_NAMES"]

#: Our SDE names -> the ``training.sde`` names of Score SDE configs.
SDE_CONFIG_NAMES = {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}


class BuiltModel(NamedTuple):
    net: nn.Module                         # the raw network net(x, labels)
    sde: LinearSDE                         # the forward SDE it is trained for
    data_config: dict[str, Any] | None     # the preset's data section (None for the MLP)
    config: dict[str, Any] | None          # the whole Score SDE config (None for the MLP)


def build_model(arch: str, *, preset: str | None = None, sde: str | None = None,
                mlp_width: int = 128, mlp_depth: int = 3) -> BuiltModel:
    """The network, SDE and configs for an architecture ('mlp' or an image preset's).

    arch 'mlp': a 2-D MLP of the given width and depth and the named SDE (default 'vp').
    Otherwise ``preset`` names an fpkern.models preset; a given ``sde`` replaces the
    preset's SDE family, with Score SDE's NCSN++ conventions for it (sigma scaling and
    Fourier embedding for VE, positional embedding and centered data otherwise).
    """
    if arch == "mlp":
        if preset is not None:
            raise ValueError("--preset applies to the image architectures, not mlp")
        return BuiltModel(MLP(2, width=mlp_width, depth=mlp_depth), get_sde(sde or "vp"),
                          None, None)
    cfg = get_config(preset)
    if sde is not None:
        if sde not in SDE_CONFIG_NAMES:
            raise ValueError(f"unknown sde {sde!r}; valid names: {sorted(SDE_CONFIG_NAMES)}")
        cfg["training"]["sde"] = SDE_CONFIG_NAMES[sde]
        if str(cfg["model"]["name"]) == "ncsnpp":  # Score SDE's conventions per SDE family
            ve = sde == "ve"
            cfg["model"].update(scale_by_sigma=ve, embedding_type="fourier" if ve else "positional")
            cfg["data"]["centered"] = not ve
    return BuiltModel(from_score_sde_config(cfg), sde_from_config(cfg), cfg["data"], cfg)

"""Score networks faithful to Score SDE (NCSN++, DDPM++, DDPM), an MLP for vector data,
an energy MLP, the ScoreFn wrapper that owns every label/output convention, adapters for networks from
elsewhere (fpkern.models.adapters), presets and checkpoints.

    net = from_preset("ve/cifar10_ncsnpp_continuous")        # raw net(x, labels)
    score = ScoreFn(net, sde_from_config(get_config(...)))    # score(x, t)
    score = NoisePredictionScore(unet, VPSDE())               # a diffusers UNet2DModel
"""

from fpkern.models.adapters import DenoiserScore, EnergyScore, NoisePredictionScore
from fpkern.models.build import BuiltModel, build_model
from fpkern.models.checkpoint import (CheckpointMismatchError, load_score_sde_checkpoint,
                                      save_score_sde_checkpoint)
from fpkern.models.ddpm import DDPM
from fpkern.models.energy import EnergyMLP
from fpkern.models.mlp import MLP
from fpkern.models.ncsnpp import DDPMpp, NCSNpp
from fpkern.models.presets import (MODELS, PRESETS, from_preset, from_score_sde_config,
                                   get_config, sde_from_config)
from fpkern.models.score import ScoreFn

__all__ = [
    "NCSNpp", "DDPMpp", "DDPM", "MLP", "ScoreFn", "MODELS", "PRESETS", "get_config",
    "from_preset", "from_score_sde_config", "sde_from_config", "load_score_sde_checkpoint",
    "save_score_sde_checkpoint", "CheckpointMismatchError", "build_model", "BuiltModel",
    "NoisePredictionScore", "DenoiserScore", "EnergyScore", "EnergyMLP",
]

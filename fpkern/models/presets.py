"""Score SDE configurations as plain nested dicts, and the one builder for them.

A config is ``{"model": {...}, "data": {...}, "training": {...}, "optim": {...}}`` with
Score SDE's field names; no ml_collections needed. ``from_score_sde_config`` builds the raw
network (``model.name``: 'ncsnpp' or 'ddpm'); ``from_preset`` does the same for a named
preset; ``sde_from_config`` builds the matching ``fpkern.sde`` object.

The CIFAR-10 presets transcribe Score SDE's ``configs/<path>.py`` over
``configs/default_cifar10_configs.py``. Note that every "ddpmpp" configuration uses the
``ncsnpp`` model class; only ``vp/ddpm/*`` and ``subvp/cifar10_ddpm_continuous`` use the
``ddpm`` class. The ``small/*`` presets (one channel, 16x16) are fpkern's own, sized to
train on a 2-core CPU in minutes.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping

import torch.nn as nn

from fpkern.models.ddpm import DDPM
from fpkern.models.ncsnpp import NCSNpp
from fpkern.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

__all__ = ["MODELS", "PRESETS", "SDE_NAMES", "get_config", "from_score_sde_config",
           "from_preset", "sde_from_config"]

MODELS: dict[str, type[nn.Module]] = {"ncsnpp": NCSNpp, "ddpm": DDPM}
SDE_NAMES: dict[str, type[LinearSDE]] = {"vesde": VESDE, "vpsde": VPSDE, "subvpsde": SubVPSDE}

# Score SDE model fields that do not change the architecture (or that the model classes
# accept under another section); tolerated in a config, ignored by the builder.
_NON_ARCH_MODEL_KEYS = {"name", "ema_rate", "beta_min", "beta_max"}
_DATA_KEYS = {"image_size": "image_size", "num_channels": "num_channels", "centered": "centered"}


def _default_cifar10() -> dict[str, Any]:
    """configs/default_cifar10_configs.py (model/data/training/optim sections)."""
    return {
        "training": {"batch_size": 128, "n_iters": 1300001, "likelihood_weighting": False,
                     "continuous": True, "reduce_mean": False},
        "data": {"dataset": "CIFAR10", "image_size": 32, "random_flip": True,
                 "centered": False, "uniform_dequantization": False, "num_channels": 3},
        "model": {"sigma_min": 0.01, "sigma_max": 50.0, "num_scales": 1000, "beta_min": 0.1,
                  "beta_max": 20.0, "dropout": 0.1, "embedding_type": "fourier"},
        "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 2e-4, "beta1": 0.9,
                  "eps": 1e-8, "warmup": 5000, "grad_clip": 1.0},
    }


_NCSNPP_VE = {  # ve/cifar10_ncsnpp_continuous.py
    "name": "ncsnpp", "scale_by_sigma": True, "ema_rate": 0.999, "normalization": "GroupNorm",
    "nonlinearity": "swish", "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 4,
    "attn_resolutions": (16,), "resamp_with_conv": True, "conditional": True, "fir": True,
    "fir_kernel": (1, 3, 3, 1), "skip_rescale": True, "resblock_type": "biggan",
    "progressive": "none", "progressive_input": "residual", "progressive_combine": "sum",
    "attention_type": "ddpm", "init_scale": 0.0, "fourier_scale": 16, "conv_size": 3,
}
_NCSNPP_VP = {  # vp/cifar10_ncsnpp_continuous.py: positional embedding, no scale_by_sigma
    **_NCSNPP_VE, "scale_by_sigma": False, "ema_rate": 0.9999, "embedding_type": "positional",
}
_DDPMPP = {  # vp/cifar10_ddpmpp_continuous.py: NCSN++ class without FIR / input pyramid
    **_NCSNPP_VP, "fir": False, "progressive_input": "none",
}
_DDPM = {  # vp/ddpm/cifar10_continuous.py
    "name": "ddpm", "scale_by_sigma": False, "ema_rate": 0.9999, "normalization": "GroupNorm",
    "nonlinearity": "swish", "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2,
    "attn_resolutions": (16,), "resamp_with_conv": True, "conditional": True,
}


def _cifar10(sde: str, model: dict, *, deep: bool = False) -> dict[str, Any]:
    cfg = _default_cifar10()
    cfg["training"]["sde"] = sde
    cfg["model"].update(model)
    if sde != "vesde":
        cfg["training"]["reduce_mean"] = True
        cfg["data"]["centered"] = True
    if deep:
        cfg["model"]["num_res_blocks"] = 8
        cfg["training"]["n_iters"] = 950001
    return cfg


def _small(sde: str, model: dict) -> dict[str, Any]:
    cfg = _cifar10(sde, model)
    cfg["data"].update(dataset="small16", image_size=16, num_channels=1, random_flip=False)
    # ~0.3M parameters: about 0.5 s per batch-32 training step on 2 CPU cores. No dropout,
    # so the FP residual of a fixed network is deterministic.
    cfg["model"].update(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                        dropout=0.0)
    cfg["training"].update(batch_size=32, n_iters=2001)
    cfg["optim"].update(warmup=100)
    if sde == "vesde":
        # sigma_max ~ the largest distance between two images in [0, 1]^256 (Song & Ermon 2020)
        cfg["model"]["sigma_max"] = 16.0
    return cfg


_PRESET_FACTORIES = {
    "ve/cifar10_ncsnpp_continuous": lambda: _cifar10("vesde", _NCSNPP_VE),
    "ve/cifar10_ncsnpp_deep_continuous": lambda: _cifar10("vesde", _NCSNPP_VE, deep=True),
    "vp/cifar10_ddpmpp_continuous": lambda: _cifar10("vpsde", _DDPMPP),
    "vp/cifar10_ddpmpp_deep_continuous": lambda: _cifar10("vpsde", _DDPMPP, deep=True),
    "vp/cifar10_ncsnpp_continuous": lambda: _cifar10("vpsde", _NCSNPP_VP),
    "vp/cifar10_ncsnpp_deep_continuous": lambda: _cifar10("vpsde", _NCSNPP_VP, deep=True),
    "vp/ddpm/cifar10_continuous": lambda: _cifar10("vpsde", _DDPM),
    "subvp/cifar10_ddpmpp_continuous": lambda: _cifar10("subvpsde", _DDPMPP),
    "subvp/cifar10_ddpmpp_deep_continuous": lambda: _cifar10("subvpsde", _DDPMPP, deep=True),
    "subvp/cifar10_ncsnpp_continuous": lambda: _cifar10("subvpsde", _NCSNPP_VP),
    "subvp/cifar10_ncsnpp_deep_continuous": lambda: _cifar10("subvpsde", _NCSNPP_VP, deep=True),
    "subvp/cifar10_ddpm_continuous": lambda: _cifar10("subvpsde", _DDPM),
    "small/ncsnpp": lambda: _small("vesde", _NCSNPP_VE),
    "small/ddpmpp": lambda: _small("vpsde", _DDPMPP),
}

#: Preset name -> config (a fresh deep copy is returned by ``get_config``).
PRESETS: dict[str, dict[str, Any]] = {name: f() for name, f in _PRESET_FACTORIES.items()}


def get_config(name: str) -> dict[str, Any]:
    """A deep copy of the named preset's config."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid names: {sorted(PRESETS)}") from None


def _section(cfg: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sec = cfg.get(name) if isinstance(cfg, Mapping) else None
    if not isinstance(sec, Mapping):
        raise ValueError(f"config must have a {name!r} section (a mapping)")
    return sec


def _options(cls: type) -> set[str]:
    return {p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def model_kwargs(cfg: Mapping[str, Any]) -> tuple[type[nn.Module], dict[str, Any]]:
    """(model class, keyword arguments) for a Score SDE-shaped config."""
    model, data = _section(cfg, "model"), _section(cfg, "data")
    training = cfg.get("training", {}) or {}
    name = str(model.get("name", "")).lower()
    if name not in MODELS:
        raise ValueError(f"unknown model.name {model.get('name')!r}; valid names: {sorted(MODELS)}")
    cls = MODELS[name]
    known = set().union(*(_options(c) for c in MODELS.values())) | _NON_ARCH_MODEL_KEYS
    unknown = sorted(set(model) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid names: {sorted(known)}")
    valid = _options(cls)
    kwargs = {k: v for k, v in model.items() if k in valid}
    for key, arg in _DATA_KEYS.items():
        if key in data and arg in valid:
            kwargs[arg] = data[key]
    if "continuous" in valid and "continuous" in training:
        kwargs["continuous"] = bool(training["continuous"])
    for k in ("ch_mult", "attn_resolutions", "fir_kernel"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    return cls, kwargs


def from_score_sde_config(cfg: Mapping[str, Any]) -> nn.Module:
    """The raw network of a Score SDE config, called as ``net(x, labels)`` (see ScoreFn)."""
    cls, kwargs = model_kwargs(cfg)
    return cls(**kwargs)


def from_preset(name: str) -> nn.Module:
    """The raw network of a named preset (``PRESETS``); same builder as from_score_sde_config."""
    return from_score_sde_config(get_config(name))


def sde_from_config(cfg: Mapping[str, Any]) -> LinearSDE:
    """The fpkern SDE of a config: ``training.sde`` with model.sigma_*/beta_*, N = num_scales."""
    training, model = _section(cfg, "training"), _section(cfg, "model")
    name = str(training.get("sde", "")).lower()
    if name not in SDE_NAMES:
        raise ValueError(f"unknown training.sde {training.get('sde')!r}; valid names: {sorted(SDE_NAMES)}")
    n = int(model.get("num_scales", 1000))
    if name == "vesde":
        return VESDE(sigma_min=model.get("sigma_min", 0.01), sigma_max=model.get("sigma_max", 50.0), N=n)
    return SDE_NAMES[name](beta_min=model.get("beta_min", 0.1), beta_max=model.get("beta_max", 20.0), N=n)

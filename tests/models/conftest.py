"""Shared helpers for the model tests: tiny Score SDE-shaped configs and a central
finite-difference check for forward-mode derivatives."""

from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # score_sde_spec


def tiny_config(name: str = "ncsnpp", sde: str = "vesde", **model) -> dict:
    """An 8x8, 2-channel config small enough for float64 derivative checks."""
    base = {
        "name": name, "nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,),
        "dropout": 0.0, "resamp_with_conv": True, "conditional": True, "fir": True,
        "fir_kernel": (1, 3, 3, 1), "skip_rescale": True, "resblock_type": "biggan",
        "progressive": "none", "progressive_input": "residual", "progressive_combine": "sum",
        "attention_type": "ddpm", "embedding_type": "fourier", "fourier_scale": 16,
        "init_scale": 0.0, "scale_by_sigma": sde == "vesde", "conv_size": 3,
        "nonlinearity": "swish", "normalization": "GroupNorm", "sigma_min": 0.01,
        "sigma_max": 50.0, "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0,
    }
    if name == "ddpm":
        for k in ("fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive",
                  "progressive_input", "progressive_combine", "attention_type",
                  "embedding_type", "fourier_scale", "init_scale", "conv_size"):
            base.pop(k)
        base["nf"] = 32          # DDPM's GroupNorm has 32 groups
    base.update(model)
    return {"model": base,
            "data": {"image_size": 8, "num_channels": 2, "centered": sde != "vesde"},
            "training": {"sde": sde, "continuous": True}}


def randomize_(net: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Replace every parameter by N(0, scale^2) noise so that no branch is (near) zero,
    as it is at Score SDE's initialisation (init_scale 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return net


def fd_directional(f, x: torch.Tensor, v: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central difference (f(x + h v) - f(x - h v)) / 2h, O(h^2) accurate."""
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float,
                        atol: float, what: str = "") -> None:
    """assert_close that names the first mismatching index."""
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: first mismatch at {idx}: {actual[idx].item()!r} vs "
                             f"{expected[idx].item()!r}; max abs err "
                             f"{(actual - expected).abs().max().item():.3e}")


@pytest.fixture
def cfg_factory():
    return lambda *a, **k: copy.deepcopy(tiny_config(*a, **k))

"""Every random state a training run may draw from: torch's CPU and CUDA generators,
numpy's and Python's global generators, and the run's own torch.Generator objects.

``seed_all`` seeds the global ones from one integer, ``capture_rng`` / ``restore_rng`` turn
them (and the named generators) into tensors and plain values for a checkpoint and back,
so that identical commands, and an interrupted-and-resumed run, draw the same numbers. fpkern
itself draws only from torch; numpy and ``random`` are seeded and saved for user data sets
and augmentations that draw from them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_all", "capture_rng", "restore_rng"]

_U64 = 1 << 64


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global RNG and Python's ``random``
    with the same integer (numpy takes it modulo 2^64, as two 32-bit words)."""
    torch.manual_seed(seed)
    s = seed % _U64
    np.random.seed([s & 0xFFFFFFFF, s >> 32])
    random.seed(seed)


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random state a step can touch, as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": [int(py_state[0]), [int(v) for v in py_state[1]], py_state[2]],
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Set every state ``capture_rng`` saved; ``generators`` are set in place."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

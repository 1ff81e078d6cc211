"""Training checkpoints: atomic writes, the last few kept, loadable with weights_only=True.

A checkpoint is a dict of tensors and plain Python values:

    {"format": "fpkern-train", "version": 1, "step": int, "model": state_dict,
     "ema": state_dict, "optimizer": state_dict, "scaler": state_dict or None,
     "rng": [per-rank random states, see capture_rng], "data": [per-rank data state],
     "options": {training_loop keyword arguments (plain values)}}
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "capture_rng", "restore_rng", "is_fpkern_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = "fpkern-train"
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ckpt_dir, oldest step first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], *,
                    keep: int = 3) -> Path:
    """Write state to ckpt_dir/checkpoint_<step>.pt atomically (temp file, fsync, os.replace),
    then delete all but the newest `keep` checkpoints."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"checkpoint_{step:08d}.pt"
    tmp = d / f".{path.name}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read an fpkern training checkpoint with torch.load(weights_only=True)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not is_fpkern_checkpoint(ckpt):
        raise ValueError(f"{os.fspath(path)} is not an fpkern training checkpoint")
    return ckpt


def is_fpkern_checkpoint(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


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

"""Training checkpoints: atomic writes, the last few kept, loadable with weights_only=True.

A checkpoint is a dict of tensors and plain Python values:

    {"format": "fpkern-train", "version": 1, "step": int, "model": state_dict,
     "ema": state_dict, "optimizer": state_dict, "scaler": state_dict or None,
     "rng": [per-rank random states (fpkern.train.rng.capture_rng)],
     "data": [per-rank data state], "options": {the run's options (plain values)}}
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from fpkern.train.rng import capture_rng, restore_rng

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

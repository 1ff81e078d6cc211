"""Scalar logging: a JSONL file always, TensorBoard when the ``tensorboard`` package imports.

A run that starts at step s (0, or the step of the checkpoint it resumes) owns the rows after
s: the rows a stopped or killed run wrote past its last checkpoint are dropped when the
writer opens (atomically), and TensorBoard purges its events past s, so that the file never
holds a step twice and its steps only increase.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

__all__ = ["MetricsWriter", "drop_rows_after"]

log = logging.getLogger(__name__)


def _tensorboard_writer(log_dir: Path, purge_step: int):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard missing or broken: JSONL only
        log.info("tensorboard is not installed: logging scalars to metrics.jsonl only "
                 "(pip install tensorboard for TensorBoard event files)")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Remove the rows of the JSONL file at path whose step is > step, and lines that are not
    a complete row (a write cut short by a kill), by an atomic replace; the number removed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    lines = text.splitlines()
    kept = [ln for ln in lines if (s := _row_step(ln)) is not None and s <= step]
    if len(kept) == len(lines) and (not text or text.endswith("\n")):
        return 0
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(ln + "\n" for ln in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines) - len(kept)


def _row_step(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


class MetricsWriter:
    """``write(step, {name: float})`` appends one JSON line to workdir/metrics.jsonl and, if
    available, the same scalars to TensorBoard under workdir/tensorboard. ``start_step``: the
    step the run starts from; rows and events after it are dropped (see the module)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, start_step: int = 0):
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dropped = drop_rows_after(self.path, start_step)
        if dropped:
            log.warning("%s: dropped %d row(s) past step %d, written by an earlier run after "
                        "the checkpoint this run starts from", self.path, dropped, start_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = (_tensorboard_writer(Path(workdir) / "tensorboard", start_step + 1)
                    if tensorboard else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

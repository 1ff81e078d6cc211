"""Scalar logging: a JSONL file always, TensorBoard when the ``tensorboard`` package imports."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

__all__ = ["MetricsWriter"]

log = logging.getLogger(__name__)


def _tensorboard_writer(log_dir: Path):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard missing or broken: JSONL only
        log.info("tensorboard is not installed: logging scalars to metrics.jsonl only "
                 "(pip install tensorboard for TensorBoard event files)")
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsWriter:
    """``write(step, {name: float})`` appends one JSON line to workdir/metrics.jsonl and, if
    available, the same scalars to TensorBoard under workdir/tensorboard."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(Path(workdir) / "tensorboard") if tensorboard else None

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

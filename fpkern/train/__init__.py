"""Training: ``python -m fpkern.train`` (fpkern.train.cli), its options as a ``TrainConfig``
(config.py) and ``training_loop`` (loop.py)."""

from fpkern.train.config import TrainConfig
from fpkern.train.loop import NonFiniteLossError, TrainResult, training_loop

__all__ = ["training_loop", "TrainConfig", "TrainResult", "NonFiniteLossError"]

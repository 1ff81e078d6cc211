"""Training: ``python -m fpkern.train`` (fpkern.train.cli) and ``training_loop`` (loop.py)."""

from fpkern.train.loop import NonFiniteLossError, TrainResult, training_loop

__all__ = ["training_loop", "TrainResult", "NonFiniteLossError"]

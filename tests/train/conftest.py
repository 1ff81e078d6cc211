"""Tiny training configurations shared by the tests/train suite (MLP on 2-D toy data)."""

import pytest

TINY = ["--arch", "mlp", "--dataset", "8gaussians", "--mlp-width", "32", "--mlp-depth", "2",
        "--batch-size", "32", "--fp-batch", "8", "--warmup", "5", "--sample-steps", "10",
        "--num-samples", "200", "--eval-every", "0", "--progress", "false", "--log-every", "5"]


@pytest.fixture
def tiny():
    return list(TINY)

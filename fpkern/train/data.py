"""Training batches with a resumable state: 2-D toy sets (fresh samples every step) and
image sets (shuffled epochs, split across ranks as DistributedSampler does).

Each source draws only from its own torch.Generator (or from a seed and its position), so
``state()`` / ``load_state()`` restore the exact batch sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from fpkern.data.toy2d import TOY_SETS, sample_toy

__all__ = ["ToyBatches", "ImageBatches", "is_toy"]


def is_toy(name: str) -> bool:
    return name in TOY_SETS


class ToyBatches:
    """Fresh i.i.d. samples of a toy set; each rank has its own generator (seed, rank)."""

    def __init__(self, name: str, batch_size: int, *, seed: int, rank: int = 0):
        self.name, self.batch_size = name, int(batch_size)
        self.generator = torch.Generator().manual_seed(seed * 1000003 + 17 * rank + 1)

    def next(self) -> torch.Tensor:
        return sample_toy(self.name, self.batch_size, generator=self.generator)

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class ImageBatches:
    """Epochs of a shuffled image set. The permutation of epoch e comes from seed (seed, e)
    and is the same on every rank; rank r takes positions r, r + W, r + 2W, ... (the
    DistributedSampler split, the tail dropped so ranks stay in step)."""

    def __init__(self, dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world_size)
        per_rank = len(dataset) // self.world
        if per_rank < self.batch_size:
            raise ValueError(f"data set of {len(dataset)} items is too small for batch size "
                             f"{self.batch_size} on {self.world} rank(s)")
        self.batches_per_epoch = per_rank // self.batch_size
        self.epoch, self.pos = 0, 0
        self._order = None

    def _indices(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            perm = torch.randperm(len(self.dataset), generator=g)
            self._order = perm[: (len(perm) // self.world) * self.world][self.rank::self.world]
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        return self._order

    def next(self) -> torch.Tensor:
        idx = self._indices()[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        batch = torch.stack([self.dataset[int(i)] for i in idx])
        self.pos += 1
        if self.pos == self.batches_per_epoch:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


class TensorItems:
    """A float tensor [N, ...] served item by item (images with no random transform)."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

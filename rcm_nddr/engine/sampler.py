"""An endless, resumable training sampler: the order and the augmentation seed of every sample are
pure functions of (seed, position in the stream), so a resumed run sees exactly the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation seed)`` forever: a fresh permutation per epoch, starting at
    stream position ``start`` (= iterations done x batch size when resuming)."""

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.seed = seed
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = divmod(self.start, self.size)
        while True:
            gen = _epoch_generator(self.seed, epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
            sample_seeds = torch.randint(0, 2**62, (self.size,), generator=gen).tolist()
            for p in range(position, self.size):
                yield order[p], sample_seeds[p]
            epoch, position = epoch + 1, 0

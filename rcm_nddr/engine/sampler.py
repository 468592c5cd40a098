"""An endless, resumable training sampler: the order and the augmentation seed of every sample are
pure functions of (seed, position in the stream), so a resumed run sees exactly the same batches, and
N processes of a distributed run together see exactly the batches one process would."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation seed)`` forever: a fresh permutation per epoch, starting at
    stream position ``start`` (= iterations done x global batch size when resuming).

    In a run of ``world_size`` processes the stream is cut into global batches of ``batch_size``
    samples and rank r takes the r-th of their ``world_size`` equal slices, so the union of the ranks'
    batches at every iteration is the batch a single process would draw."""

    def __init__(
        self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1
    ) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if world_size > 1 and batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} does not split into {world_size} equal slices")
        self.size = size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size

    def _stream(self) -> Iterator[tuple[int, int]]:
        epoch, position = divmod(self.start, self.size)
        while True:
            gen = _epoch_generator(self.seed, epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
            sample_seeds = torch.randint(0, 2**62, (self.size,), generator=gen).tolist()
            for p in range(position, self.size):
                yield order[p], sample_seeds[p]
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.world_size == 1:
            yield from self._stream()
            return
        local = self.batch_size // self.world_size
        for offset, item in enumerate(self._stream(), start=self.start):
            if (offset % self.batch_size) // local == self.rank:
                yield item

"""Fast paths of training and evaluation: backend settings, ``torch.compile``, a loader wrapper that
copies the next batch to the GPU while the current step runs, and a loss window that keeps the
per-iteration losses on the device until they are needed, so the training step never waits for the
device.

Each is a no-op where it does not apply (on the CPU nothing is prefetched; compiling is off unless a
config asks for it)."""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rcm_nddr.config import CompileMode
from rcm_nddr.engine import distributed

log = logging.getLogger(__name__)

#: ``train.compile`` / ``test.compile`` values naming a ``torch.compile`` mode (``true`` = ``default``)
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: the training crop and batch size are fixed, so the fastest algorithm of
    each conv is found once and reused."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_mode(setting: bool | str) -> str | None:
    """The ``torch.compile`` mode a config's ``compile`` value asks for; None when compiling is off."""
    if setting is False:
        return None
    if setting is True:
        return "default"
    if setting not in COMPILE_MODES:
        raise ValueError(f"compile: expected true, false or one of {', '.join(COMPILE_MODES)}, got {setting!r}")
    return setting


def maybe_compile(module: nn.Module, setting: bool | str) -> nn.Module:
    """``torch.compile(module, mode=...)`` when ``setting`` asks for it, else ``module`` itself. The
    compiled module shares the parameters and buffers of ``module`` (state dicts, checkpoints and the
    model store keep using ``module``); the first calls of each input shape compile, later ones run the
    generated code."""
    mode = compile_mode(setting)
    if mode is None:
        return module
    log.info("torch.compile (mode %s): the first iterations include compilation", mode)
    return torch.compile(module, mode=mode)


class DevicePrefetcher:
    """Iterates a loader's batches already on ``device``. On CUDA the copy of batch i+1 (from pinned
    memory, on a side stream) overlaps the compute of batch i; elsewhere batches pass through unchanged
    and the step moves them itself.

    Tensors are moved with ``non_blocking=True``; images in channels_last (``image_key``)."""

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device, image_key: str = "image") -> None:
        self.batches = iter(batches)
        self.device = device
        self.image_key = image_key
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: dict[str, Any] | None = None
        self._exhausted = False
        self._error: BaseException | None = None
        if self.stream is not None:
            self._preload()

    def _move(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in batch.items():
            if isinstance(value, Tensor):
                fmt = torch.channels_last if key == self.image_key and value.dim() == 4 else torch.preserve_format
                value = value.to(self.device, non_blocking=True, memory_format=fmt)
            out[key] = value
        return out

    def _preload(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self._exhausted = True
            return
        except Exception as error:  # raised to the caller when it asks for this batch, not before
            self._error = error
            return
        with torch.cuda.stream(self.stream):
            self._next = self._move(batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.stream is None:
            return next(self.batches)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._exhausted:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)  # the copy is done before the step reads the batch
        batch = self._next
        assert batch is not None
        for value in batch.values():
            if isinstance(value, Tensor) and value.device.type == "cuda":
                value.record_stream(current)  # its memory is not reused while the step still reads it
        self._next = None
        self._preload()
        return batch


class LossWindow:
    """Per-iteration loss vectors kept on the device, fetched to the host in one transfer (and, in a
    distributed run, one all-reduce averaging the ranks) when ``fetch()`` is called: every
    ``train.log_every`` iterations, before a validation or a checkpoint, and at the end. The step itself
    never waits for the device."""

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.device = device
        self._pending: list[tuple[int, Tensor]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, iteration: int, losses: Tensor) -> None:
        """``losses``: the detached loss of each of ``names`` at ``iteration`` (a vector on the device)."""
        self._pending.append((iteration, losses))

    def fetch(self, extra: Sequence[float] = ()) -> tuple[list[tuple[int, dict[str, float]]], list[float]]:
        """``([(iteration, {name: loss averaged over the ranks})...], extra summed over the ranks)``. The
        ``extra`` values (e.g. a stop flag) travel in the same transfer. A collective in a distributed
        run: every rank calls it at the same iterations."""
        iterations = [i for i, _ in self._pending]
        flat = [v.float() for _, v in self._pending]
        tail = torch.tensor(list(extra), dtype=torch.float32, device=self.device)
        summary = torch.cat([*flat, tail]) if flat else tail
        values = distributed.all_reduce_sum(summary).tolist()
        self._pending.clear()
        ranks = distributed.context().world_size
        n = len(self.names)
        rows = []
        for k, iteration in enumerate(iterations):
            row = values[k * n : (k + 1) * n]
            rows.append((iteration, {name: v / ranks for name, v in zip(self.names, row, strict=True)}))
        return rows, values[len(iterations) * n :]

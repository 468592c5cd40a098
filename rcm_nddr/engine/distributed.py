"""torch.distributed for ``torchrun``: process-group set-up from the launcher's environment, rank-aware
helpers that are no-ops in a single process, and the samplers that shard training and evaluation.

``torchrun --nproc_per_node N train.py --config FILE`` (or ``--nnodes``/``--rdzv-endpoint`` across
machines) starts N processes with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set; ``init_from_environment`` joins them into one process group (NCCL on CUDA, gloo
on CPU). Without those variables, or with ``WORLD_SIZE=1``, everything here runs as one process."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how long ranks wait for each other at a barrier (rank 0 may compute the RI decomposition meanwhile)
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("RCM_NDDR_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    """The current process group's context (a single process when none is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _launcher_environment() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` set by torchrun, or None when not launched by it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if "WORLD_SIZE" not in os.environ:
        return None
    values = []
    for name in names:
        text = os.environ.get(name, "0")
        try:
            values.append(int(text))
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r}: expected an integer (set by torchrun)") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"environment: RANK={rank} and WORLD_SIZE={world} do not describe a process of the run")
    return rank, world, local


class LaunchError(ConfigError):
    """A config that does not fit the number of processes torchrun started: every process finds it, rank 0
    alone reports it."""

    same_on_every_rank = True


class RankZeroError(UserError):
    """Bad input found by rank 0 in work it did for every rank (``from_main``): rank 0 reports it."""

    same_on_every_rank = True


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), known before joining them."""
    launched = _launcher_environment()
    return 1 if launched is None else launched[1]


def check_global_batch(cfg: Config, world_size: int) -> None:
    """``train.batch_size`` is the global batch: it must split evenly over the processes and leave each at
    least two images, since BatchNorm in training needs more than one value per channel (the head's image
    pooling has one per image). SyncBatchNorm normalizes over the global batch, which may then leave one
    image per process."""
    if world_size < 2:
        return
    batch = cfg.train.batch_size
    least = 1 if cfg.train.sync_bn else 2
    per_process = batch // world_size
    if batch % world_size == 0 and per_process >= least:
        return
    smallest = least * world_size
    why = (
        f"must split evenly over the {world_size} processes of this run"
        if batch % world_size
        else f"leaves {per_process} image per process over the {world_size} processes of this run, and "
        "BatchNorm in training needs more than one value per channel (train.sync_bn: true normalizes over "
        "the global batch, on CUDA)"
    )
    raise LaunchError(
        f"{cfg.source}: key 'train.batch_size': {batch} is the global batch and {why}; use a multiple of "
        f"{world_size} that is at least {smallest}, e.g. --set train.batch_size={smallest}"
    )


def init_from_environment(device: str) -> Context:
    """Join the process group torchrun describes (nothing to do in a single process).

    ``device`` is the config's ``train.device``: with ``auto``/``cuda`` and a GPU, each process takes
    ``cuda:LOCAL_RANK`` and the backend is NCCL; on CPU it is gloo. A fixed ``cuda:N`` cannot be shared
    by several processes and is refused."""
    launched = _launcher_environment()
    if launched is None or launched[1] == 1 or (dist.is_available() and dist.is_initialized()):
        return context()
    rank, world, local = launched
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device.startswith("cuda:"):
        raise LaunchError(
            f"key 'train.device': {device!r} names one GPU, but {world} processes run; use 'cuda' or 'auto' "
            "(each process takes the GPU of its LOCAL_RANK)"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'train.device': 'cuda' asked for but no CUDA device is available")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("process %d of %d (local rank %d), backend %s", rank, world, local, backend)
    return context()


def backend() -> str | None:
    """The process group's backend (``nccl``/``gloo``), None in a single process."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(name: str, ctx: Context) -> torch.device | None:
    """The device of this process in a multi-process run (None: resolve ``name`` as usual)."""
    if not ctx.enabled:
        return None
    if name in ("auto", "cuda") and torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if context().enabled:
        dist.barrier()


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 alone, its result sent to every rank (pickled; e.g. a decomposition rank 0
    computes while the others wait). An error on rank 0 is raised on every rank, so none waits forever."""
    ctx = context()
    if not ctx.enabled:
        return compute()
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            payload = [(compute(), None, False)]
        except Exception as exc:
            dist.broadcast_object_list([(None, f"{type(exc).__name__}: {exc}", isinstance(exc, UserError))], src=0)
            if isinstance(exc, UserError):
                exc.same_on_every_rank = False  # rank 0 reports it; the others raise RankZeroError quietly
            raise
    dist.broadcast_object_list(payload, src=0)
    value, error, bad_input = payload[0]
    if error is not None:
        raise (RankZeroError if bad_input else RuntimeError)(f"rank 0 failed: {error}")
    return value


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    ctx = context()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (unchanged in a single process)."""
    if context().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), e.g. before an evaluation, so
    all ranks evaluate the model rank 0 saves."""
    if not context().enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: the ranks' shards partition the set with no sample
    repeated (torch's DistributedSampler pads the last shard with repeats, which would count them
    twice in a metric)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

"""The loss-weighting contract: a module that turns the group's task losses into the gradients of a step."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcm_nddr.registry import WEIGHTINGS
from rcm_nddr.task import Task

__all__ = ["WEIGHTINGS", "StepContext", "Weighting", "mean_over_ranks"]


@dataclass
class StepContext:
    """What a weighting may use in one step besides the losses.

    ``shared``: the trainable parameters of the network that more than one task's loss reaches (filled
    for weightings with ``needs_shared``); ``layer``: the parameters of the shared layer GradNorm
    balances at (``needs_layer``); ``recompute``: after the optimizer step, the task losses on the same
    batch without autograd (``needs_recompute``); ``iteration``: the step's number, from 1."""

    shared: Sequence[nn.Parameter] = ()
    layer: Sequence[nn.Parameter] = ()
    recompute: Callable[[], Tensor] | None = None
    iteration: int = 0


def mean_over_ranks(values: Tensor) -> Tensor:
    """``values`` averaged over the processes of a distributed run (itself in one process): weightings
    whose state follows the losses keep one state on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


class Weighting(nn.Module):
    """Turns the vector of the group's task losses into the gradients of one step.

    Subclasses are registered with ``@WEIGHTINGS.register("name")`` and built with ``(tasks, weights,
    **options)``: ``tasks`` the group's task objects by name (in the group's order, which is the order of
    the loss vector), ``weights`` their configured loss weights (``loss.<task>.weight``, else the task
    type's default), ``options`` the keys of ``loss.weighting`` other than ``type``, ``lr`` and
    ``weight_decay`` (an unknown option is a config error naming it).

    A weighting may hold parameters: they train in their own group of the run's optimizer, with
    ``loss.weighting.lr`` (default: ``default_lr``, else the optimizer's lr) and
    ``loss.weighting.weight_decay`` (default 0), and are saved in checkpoints with the weighting's
    persistent buffers (its state), so ``--resume`` continues exactly. The run's schedule scales their
    learning rate like every other group's.

    The step: ``backward(losses, context)`` fills the ``.grad`` of the network's parameters (and of the
    weighting's own); the optimizer steps; then ``after_step(losses, context)`` (e.g. renormalizing
    weights, updating a history). ``current()`` is the multiplier each task's loss has now, logged to
    TensorBoard as ``weights/<task>``."""

    #: the weighting needs the parameters more than one task's loss reaches (``StepContext.shared``)
    needs_shared: ClassVar[bool] = False
    #: the weighting needs one shared layer's parameters (``StepContext.layer``, ``options.layer``)
    needs_layer: ClassVar[bool] = False
    #: the weighting needs the losses recomputed after the optimizer step (``StepContext.recompute``)
    needs_recompute: ClassVar[bool] = False
    #: why the weighting cannot train under torchrun (None: it can)
    not_distributed: ClassVar[str | None] = None
    #: why the weighting cannot train with ``train.compile`` (None: it can)
    not_compiled: ClassVar[str | None] = None
    #: the learning rate of its parameters when ``loss.weighting.lr`` is not set (None: the optimizer's)
    default_lr: ClassVar[float | None] = None

    def __init__(self, tasks: Mapping[str, Task], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.names: list[str] = list(tasks)
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise ValueError(f"no loss weight for tasks {missing}")
        # the configured weights (from the config, so not part of the saved state)
        self.register_buffer("base", torch.tensor([float(weights[n]) for n in self.names]), persistent=False)

    def current(self) -> Tensor:
        """The multiplier of each task's loss now (a detached vector in the order of ``names``)."""
        return self.base.detach().clone()

    def loss(self, losses: Tensor) -> Tensor:
        """The scalar whose gradient trains the network (weightings that work on gradients instead override
        ``backward``)."""
        return (self.current().to(losses) * losses).sum()

    def backward(self, losses: Tensor, context: StepContext) -> None:
        """Fill the gradients of one step from ``losses`` (the task losses, with their graph)."""
        self.loss(losses).backward()

    def after_step(self, losses: Tensor, context: StepContext) -> None:  # noqa: B027 - optional hook
        """Called after the optimizer step with the step's (detached) losses."""

    def extra_repr(self) -> str:
        return f"tasks={self.names}"

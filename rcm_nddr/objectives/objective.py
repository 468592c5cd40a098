"""The group objective: the task losses of a training group, its consistency terms and its loss weighting."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcm_nddr.objectives.consistency import ConsistencyTerm
from rcm_nddr.objectives.weighting import StepContext, Weighting
from rcm_nddr.task import Task


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """In a distributed run, replace the gradients of ``parameters`` by their mean over the processes (one
    all-reduce). The objective's parameters live outside DistributedDataParallel, which averages only the
    network's: without this, each process's weights and transfer nets would drift apart."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class GroupObjective(nn.Module):
    """Turns a group's raw outputs and targets into the gradients of one step.

    Each task's loss is its task type's loss of its own output; the consistency ``terms`` are added to the
    loss of the task each one is attached to (``mix: add``: plus ``weight * term``; ``mix: convex``: the own
    loss scaled by ``1 - sum of the convex weights``); the ``weighting`` turns the resulting task losses into
    gradients. ``stored``: a frozen model of stored tasks the terms read (never trained, never saved here;
    run under ``torch.no_grad()``).

    The objective's trainable state (the weighting's parameters and buffers, the transfer nets) is its
    ``state_dict``; ``param_groups`` puts its parameters into the run's optimizer."""

    def __init__(
        self,
        tasks: Mapping[str, Task],
        weighting: Weighting,
        terms: Sequence[ConsistencyTerm] = (),
        stored: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.names: list[str] = list(tasks)
        if list(weighting.names) != self.names:
            raise ValueError(f"the weighting's tasks {weighting.names} are not the group's {self.names}")
        unattached = [t.name for t in terms if t.attach not in self.names]
        if unattached:
            raise ValueError(f"consistency terms {unattached} are attached to no task of the group")
        self.tasks = dict(tasks)
        self.weighting = weighting
        self.terms = nn.ModuleList(terms)
        self._stored = [stored] if stored is not None else []  # a list: not a submodule (not saved, not trained)
        self._last: Tensor | None = None

    @property
    def log_names(self) -> list[str]:
        """The names of the values ``step`` returns: the task losses, the consistency terms
        (``consistency/<source>_to_<target>``) and the task weights (``weights/<task>``)."""
        terms = [f"consistency/{t.name}" for t in self.terms]
        return [*self.names, *terms, *(f"weights/{n}" for n in self.names)]

    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], images: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The task losses (a vector with its graph, in the order of ``names``) and the consistency terms'
        values (detached). ``images`` are needed when a term reads a stored task."""
        own = {n: task.loss(outputs[n].float(), targets[n]) for n, task in self.tasks.items()}
        if not self.terms:
            losses = torch.stack([own[n] for n in self.names])
            return losses, losses.new_zeros(0)
        available = dict(outputs)
        if self._stored:
            if images is None:
                raise ValueError("consistency terms read stored tasks: the images are needed")
            with torch.no_grad():
                available.update(self._stored[0](images, raw=True))
        added = {n: own[n].new_zeros(()) for n in self.names}
        convex = dict.fromkeys(self.names, 0.0)
        values = []
        for term in self.terms:
            value = term(available, targets)
            values.append(value.detach())
            added[term.attach] = added[term.attach] + term.weight * value
            if term.mix == "convex":
                convex[term.attach] += term.weight
        losses = torch.stack([(1.0 - convex[n]) * own[n] + added[n] for n in self.names])
        return losses, torch.stack(values)

    def step(
        self,
        outputs: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        context: StepContext,
        images: Tensor | None = None,
    ) -> Tensor:
        """Fill the gradients of one step; returns the detached values of ``log_names`` (on the device)."""
        losses, parts = self.losses(outputs, targets, images)
        self.weighting.backward(losses, context)
        average_gradients(self.parameters())
        self._last = losses.detach()
        weights = self.weighting.current().to(losses.device)
        return torch.cat([self._last.float(), parts.float(), weights.float()])

    def after_step(self, context: StepContext) -> None:
        """After the optimizer step: the weighting's update (``Weighting.after_step``)."""
        if self._last is None:
            raise RuntimeError("after_step() before step()")
        self.weighting.after_step(self._last, context)

    def param_groups(self, lr: float | None, weight_decay: float, default_decay: float) -> list[dict[str, Any]]:
        """The optimizer groups of the objective's parameters: the weighting's with ``lr`` (None: the
        weighting's ``default_lr``, else the optimizer's) and ``weight_decay``; the transfer nets' with the
        optimizer's lr and ``default_decay``. Empty groups are left out."""
        groups = []
        own = [p for p in self.weighting.parameters() if p.requires_grad]
        if own:
            group: dict[str, Any] = {"params": own, "weight_decay": weight_decay}
            lr = lr if lr is not None else self.weighting.default_lr
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        nets = [p for t in self.terms for p in t.parameters() if p.requires_grad]
        if nets:
            groups.append({"params": nets, "weight_decay": default_decay})
        return groups

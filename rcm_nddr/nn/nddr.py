"""NDDR fusion (CVPR 2019): at chosen stage boundaries each task mixes the stage features of its source
tasks with a learned ``1x1 conv -> BN -> ReLU``, initialized to mostly keep its own features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def transitive_sources(tasks: Sequence[str], sources: Mapping[str, Sequence[str]]) -> list[str]:
    """``tasks`` followed by every task they read through NDDR, directly or through other sources
    (``sources[t]``: the tasks t reads; a task missing from ``sources`` reads nothing)."""
    out = list(tasks)
    for task in out:  # grows while iterating: a breadth-first closure
        out += [s for s in sources.get(task, ()) if s not in out]
    return out


class NDDRLayer(nn.Module):
    """One task's NDDR layer at one stage: ``ReLU(BN(W [x_own, x_s1, x_s2, ...]))`` with ``W`` a bias-free
    1x1 conv from ``n_sources * channels`` to ``channels``.

    ``W`` starts as ``[alpha I, beta I, ..., beta I]``: the output is ``alpha`` times the own features
    plus ``beta`` times each other source's, before BatchNorm. ``beta`` defaults to
    ``(1 - alpha) / (n_sources - 1)`` so the blocks sum to 1.
    """

    def __init__(self, channels: int, n_sources: int, alpha: float = 0.9, beta: float | None = None) -> None:
        super().__init__()
        if channels < 1 or n_sources < 1:
            raise ValueError(f"NDDRLayer needs channels >= 1 and n_sources >= 1, got {channels}, {n_sources}")
        if beta is None:
            beta = (1.0 - alpha) / (n_sources - 1) if n_sources > 1 else 0.0
        self.channels, self.n_sources = channels, n_sources
        self.conv = nn.Conv2d(n_sources * channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            eye = torch.eye(channels)
            blocks = [alpha * eye] + [beta * eye] * (n_sources - 1)
            self.conv.weight.copy_(torch.cat(blocks, dim=1)[:, :, None, None])

    def forward(self, sources: Sequence[Tensor]) -> Tensor:
        """``sources``: the source tasks' features of this stage, the own task's first."""
        if len(sources) != self.n_sources:
            raise ValueError(f"NDDRLayer expects {self.n_sources} source feature maps, got {len(sources)}")
        return self.relu(self.bn(self.conv(torch.cat(list(sources), dim=1))))


class NDDRShortcut(nn.Module):
    """The NDDR-shortcut of one task: its NDDR outputs of every fusion stage resized to the last stage's
    size, concatenated, and mapped back to the last stage's channels by ``1x1 conv -> BN -> ReLU``.

    The conv starts as the identity on the last stage's block and zero on the others, so the shortcut
    begins by passing the last stage through (like the NDDR layers, it starts from what the network
    computed without it) and learns how much of the earlier stages to add."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        out = channels[-1]
        self.conv = nn.Conv2d(sum(channels), out, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, sum(channels[:-1]) :, 0, 0].copy_(torch.eye(out))

    def forward(self, stage_features: Sequence[Tensor]) -> Tensor:
        size = stage_features[-1].shape[-2:]
        resized = [
            x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for x in stage_features
        ]
        return self.relu(self.bn(self.conv(torch.cat(resized, dim=1))))


SHORTCUT = "shortcut"


class NDDRFusion(nn.ModuleDict):
    """The NDDR layers of a model, ``self[task][stage]`` (and ``self[task]["shortcut"]`` with the
    shortcut), so their parameters are named ``fusion.<task>.<stage>.*`` under a MultiTaskNet (what the
    parameter accounting and the model store read).

    ``tasks_sources[t]`` lists the tasks t reads, t first. A task that is only ever a source (an older
    task under one-way fusion) gets no layer and passes through unchanged. Tasks added later with
    ``add_task`` may fuse at other stages than ``stages``.
    """

    def __init__(
        self,
        tasks_sources: Mapping[str, Sequence[str]],
        stage_channels: Mapping[str, int],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
        shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.stage_channels = dict(stage_channels)
        self.sources: dict[str, list[str]] = {}
        self.stages: dict[str, list[str]] = {}
        for task, sources in tasks_sources.items():
            self.add_task(task, sources, stages, alpha, beta, shortcut)

    def add_task(
        self,
        task: str,
        sources: Sequence[str],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
        shortcut: bool = False,
    ) -> None:
        """NDDR layers for ``task`` reading ``sources`` (``task`` first) after each of ``stages``."""
        unknown = [s for s in stages if s not in self.stage_channels]
        if unknown:
            raise ValueError(f"NDDR stages {unknown} are not stages of the backbone {list(self.stage_channels)}")
        if not stages:
            raise ValueError(f"task {task!r}: NDDR fusion needs at least one stage")
        if not sources or sources[0] != task:
            raise ValueError(f"the sources of task {task!r} must start with the task itself, got {list(sources)}")
        if task in self.sources:
            raise ValueError(f"task {task!r} already has NDDR layers")
        # Tasks are ModuleDict keys, which live beside this object's attributes and methods.
        if task in ("sources", "stages", "stage_channels") or hasattr(self, task):
            raise ValueError(f"task name {task!r} clashes with an NDDRFusion attribute; rename the task")
        ordered = [s for s in self.stage_channels if s in stages]  # forward order
        layers: dict[str, nn.Module] = {
            s: NDDRLayer(self.stage_channels[s], len(sources), alpha, beta) for s in ordered
        }
        if shortcut:
            layers[SHORTCUT] = NDDRShortcut([self.stage_channels[s] for s in ordered])
        self[task] = nn.ModuleDict(layers)
        self.sources[task] = list(sources)
        self.stages[task] = ordered

    def has_shortcut(self, task: str) -> bool:
        return task in self.sources and SHORTCUT in self[task]

    def shortcut(self, task: str, stage_features: Sequence[Tensor]) -> Tensor:
        """Task ``task``'s shortcut over its NDDR outputs, one per fusion stage in forward order."""
        return self[task][SHORTCUT](stage_features)

    def required(self, tasks: Sequence[str]) -> list[str]:
        """``tasks`` followed by every task they read, directly or through other sources."""
        return transitive_sources(tasks, self.sources)

    def forward(
        self, stage: str, features: Mapping[str, Tensor], tasks: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Fuse ``{task: stage features}`` after ``stage`` for ``tasks`` (default: all of ``features``).
        Every layer reads the pre-fusion features, so the result does not depend on the order of the tasks."""
        out = dict(features)
        for task in features if tasks is None else tasks:
            if stage not in self.stages.get(task, ()):
                continue
            missing = [s for s in self.sources[task] if s not in features]
            if missing:
                raise KeyError(
                    f"NDDR fusion of task {task!r} at {stage!r} reads tasks {missing}, which were not run; "
                    f"run every source task too (sources of {task!r}: {self.sources[task]})"
                )
            out[task] = self[task][stage]([features[s] for s in self.sources[task]])
        return out

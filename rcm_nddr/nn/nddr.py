"""NDDR fusion (CVPR 2019): at chosen stage boundaries each task mixes the stage features of its source
tasks with a learned ``1x1 conv -> BN -> ReLU``, initialized to mostly keep its own features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


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


class NDDRFusion(nn.ModuleDict):
    """The NDDR layers of a model, ``self[task][stage]``, so their parameters are named
    ``fusion.<task>.<stage>.*`` under a MultiTaskNet (what the parameter accounting reads).

    ``tasks_sources[t]`` lists the tasks t reads, t first. A task that is only ever a source (an older
    task under one-way fusion) gets no layer and passes through unchanged.
    """

    def __init__(
        self,
        tasks_sources: Mapping[str, Sequence[str]],
        stage_channels: Mapping[str, int],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
    ) -> None:
        super().__init__()
        unknown = [s for s in stages if s not in stage_channels]
        if unknown:
            raise ValueError(f"NDDR stages {unknown} are not stages of the backbone {list(stage_channels)}")
        for task, sources in tasks_sources.items():
            if not sources or sources[0] != task:
                raise ValueError(f"the sources of task {task!r} must start with the task itself, got {list(sources)}")
        # Tasks are ModuleDict keys, which live beside this object's attributes and methods.
        clashes = [t for t in tasks_sources if t in ("sources", "stages") or hasattr(self, t)]
        if clashes:
            raise ValueError(f"task names {clashes} clash with NDDRFusion attributes; rename the tasks")
        self.sources: dict[str, list[str]] = {t: list(s) for t, s in tasks_sources.items()}
        self.stages = list(stages)
        for task, sources in self.sources.items():
            self[task] = nn.ModuleDict(
                {s: NDDRLayer(stage_channels[s], len(sources), alpha, beta) for s in self.stages}
            )

    def required(self, tasks: Sequence[str]) -> list[str]:
        """``tasks`` followed by every task they read, directly or through other sources."""
        out = list(tasks)
        for task in out:  # grows while iterating: a breadth-first closure
            out += [s for s in self.sources.get(task, []) if s not in out]
        return out

    def forward(self, stage: str, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Fuse ``{task: stage features}`` after ``stage``. Every layer reads the pre-fusion features,
        so the result does not depend on the order of the tasks."""
        out = dict(features)
        if stage not in self.stages:
            return out
        for task in features:
            if task not in self.sources:
                continue
            missing = [s for s in self.sources[task] if s not in features]
            if missing:
                raise KeyError(
                    f"NDDR fusion of task {task!r} at {stage!r} reads tasks {missing}, which were not run; "
                    f"run every source task too (sources of {task!r}: {self.sources[task]})"
                )
            out[task] = self[task][stage]([features[s] for s in self.sources[task]])
        return out

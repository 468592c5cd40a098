"""What every stage-fusion method shares (NDDR, cross-stitch): per task, the tasks it reads and the stages
it fuses at, one unit per task and stage, and the one-way forward that lets a task that is only a
source pass through unchanged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn


def transitive_sources(tasks: Sequence[str], sources: Mapping[str, Sequence[str]]) -> list[str]:
    """``tasks`` followed by every task they read through fusion, directly or through other sources
    (``sources[t]``: the tasks t reads; a task missing from ``sources`` reads nothing)."""
    out = list(tasks)
    for task in out:  # grows while iterating: a breadth-first closure
        out += [s for s in sources.get(task, ()) if s not in out]
    return out


class StageFusion(nn.ModuleDict):
    """Fusion units between backbone stages, ``self[task][stage]``, so their parameters are named
    ``fusion.<task>.<stage>.*`` under a MultiTaskNet (what the parameter accounting and the model store
    read). A unit maps the list of its sources' stage features (the own task's first) to the task's
    fused features.

    ``sources[t]`` lists the tasks t reads, t first; ``stages[t]`` the stages t fuses at, in forward
    order. A task that is only ever a source (an older task under one-way fusion) gets no unit and
    passes through unchanged. Subclasses build the units in ``add_task`` and hand them to ``register``.
    """

    #: the method's name in error messages
    kind = "stage"

    def __init__(self, stage_channels: Mapping[str, int]) -> None:
        super().__init__()
        self.stage_channels = dict(stage_channels)
        self.sources: dict[str, list[str]] = {}
        self.stages: dict[str, list[str]] = {}

    def check_task(self, task: str, sources: Sequence[str], stages: Sequence[str]) -> list[str]:
        """Refuse a task that cannot get units; return its fusion stages in forward order."""
        unknown = [s for s in stages if s not in self.stage_channels]
        if unknown:
            raise ValueError(f"{self.kind} stages {unknown} are not stages of the backbone {list(self.stage_channels)}")
        if not stages:
            raise ValueError(f"task {task!r}: {self.kind} fusion needs at least one stage")
        if not sources or sources[0] != task:
            raise ValueError(f"the sources of task {task!r} must start with the task itself, got {list(sources)}")
        if task in self.sources:
            raise ValueError(f"task {task!r} already has {self.kind} layers")
        # Tasks are ModuleDict keys, which live beside this object's attributes and methods.
        if task in ("sources", "stages", "stage_channels") or hasattr(self, task):
            raise ValueError(f"task name {task!r} clashes with an attribute of {type(self).__name__}; rename the task")
        return [s for s in self.stage_channels if s in stages]

    def register(self, task: str, sources: Sequence[str], stages: Sequence[str], units: dict[str, nn.Module]) -> None:
        """Add ``task``'s units (by stage, plus any extra module such as an NDDR shortcut)."""
        self[task] = nn.ModuleDict(units)
        self.sources[task] = list(sources)
        self.stages[task] = list(stages)

    def has_shortcut(self, task: str) -> bool:
        """Whether ``task`` maps its fused features of every stage to the head's input (NDDR-shortcut)."""
        return False

    def required(self, tasks: Sequence[str]) -> list[str]:
        """``tasks`` followed by every task they read, directly or through other sources."""
        return transitive_sources(tasks, self.sources)

    def forward(
        self, stage: str, features: Mapping[str, Tensor], tasks: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Fuse ``{task: stage features}`` after ``stage`` for ``tasks`` (default: all of ``features``).
        Every unit reads the pre-fusion features, so the result does not depend on the order of the tasks."""
        out = dict(features)
        for task in features if tasks is None else tasks:
            if stage not in self.stages.get(task, ()):
                continue
            missing = [s for s in self.sources[task] if s not in features]
            if missing:
                raise KeyError(
                    f"{self.kind} fusion of task {task!r} at {stage!r} reads tasks {missing}, which were not run; "
                    f"run every source task too (sources of {task!r}: {self.sources[task]})"
                )
            out[task] = self[task][stage]([features[s] for s in self.sources[task]])
        return out

"""MultiTaskNet: a multi-task backbone run stage by stage (one path per task), an optional fusion
between stages, and one head per task. ``forward(images, tasks=None)`` returns ``{task name:
prediction}`` at input size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .nn.backbone import STAGES
from .task import Task


class MultiTaskNet(nn.Module):
    """Runs the requested tasks stage by stage so fusion modules can see every task's stage features.

    ``backbone.forward_stage(features, stage)`` maps ``{task: features}`` through one stage (separate
    networks, a shared one, or the RC filter bank with per-task modulators); ``heads[t]`` is task t's
    decoder (reads the last stage and ``layer1``). With ``raw=False`` (the default) the outputs are
    post-processed by the task plug-ins (class maps, unit normals, probabilities); training uses
    ``raw=True``. ``fusion`` (e.g. NDDRFusion, or None) maps ``(stage, {task: features})`` to fused
    features after every stage; the tasks it reads are run too, even when only their readers are asked for.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        fusion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if set(tasks) != set(heads):
            raise ValueError(f"tasks {list(tasks)} and heads {list(heads)} differ")
        self.task_names: list[str] = list(tasks)
        self.tasks = dict(tasks)
        self.backbone = backbone
        self.fusion = fusion
        self.heads = nn.ModuleDict(heads)

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None, raw: bool = False) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; this model has {self.task_names}")
        run = names if self.fusion is None else self.fusion.required(names)
        features = dict.fromkeys(run, images)
        low: dict[str, Tensor] = {}
        for stage in STAGES:
            features = self.backbone.forward_stage(features, stage)
            if self.fusion is not None:
                features = self.fusion(stage, features)
            if stage == "layer1":
                low = features
        size = images.shape[-2:]
        outputs = {t: self.heads[t](features[t], low[t], size) for t in names}
        if raw:
            return outputs
        return {t: self.tasks[t].postprocess(out) for t, out in outputs.items()}

"""MultiTaskNet: a multi-task backbone run stage by stage (one path per task), an optional fusion
between stages, and one head per task. ``forward(images, tasks=None)`` returns ``{task name:
prediction}`` at input size."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from rcm_nddr.nn.accounting import owned_by
from rcm_nddr.nn.backbone import STAGES
from rcm_nddr.task import Task

#: the features of the running tasks between stages: ``{task: tensor}`` (or, in the batched deploy form,
#: one tensor holding every task's channels)
Features = dict[str, Tensor] | Tensor


class MultiTaskNet(nn.Module):
    """Runs the requested tasks stage by stage so fusion modules can see every task's stage features.

    ``backbone.forward_stage(features, stage)`` maps ``{task: features}`` through one stage (separate
    networks, a shared one, or the RC filter bank with per-task modulators); ``heads[t]`` is task t's
    decoder (reads the last stage and ``layer1``). With ``raw=False`` (the default) the outputs are
    post-processed by the task plug-ins (class maps, unit normals, probabilities); training uses
    ``raw=True``. ``fusion`` (e.g. NDDRFusion, or None) maps ``(stage, {task: features})`` to fused
    features after every stage; the tasks it reads are run too, even when only their readers are
    asked for, and they need no head.

    ``frozen`` names tasks of the backbone and fusion that are never trained here (older tasks of a
    model store read by a new group): their parameters do not require gradients, their modules stay in
    eval mode whatever ``train()`` says (no BatchNorm statistic updates), and they run under
    ``torch.no_grad()``.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        fusion: nn.Module | None = None,
        frozen: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if set(tasks) != set(heads):
            raise ValueError(f"tasks {list(tasks)} and heads {list(heads)} differ")
        self.task_names: list[str] = list(tasks)
        self.tasks = dict(tasks)
        self.backbone = backbone
        self.fusion = fusion
        self.heads = nn.ModuleDict(heads)
        self.frozen: set[str] = set()
        self.fixed_encoders: set[str] = set()
        self.freeze(frozen)

    def freeze(self, tasks: Iterable[str]) -> None:
        """Freeze ``tasks`` (see the class docstring); a frozen task cannot also have a head here."""
        tasks = set(tasks)
        headed = sorted(tasks & set(self.heads))
        if headed:
            raise ValueError(f"tasks {headed} have heads in this model and cannot be frozen sources")
        self.frozen |= tasks
        for name, p in self.named_parameters():
            if any(owned_by(name, t) for t in tasks):
                p.requires_grad_(False)
        self.train(self.training)

    def freeze_encoder(self, tasks: Iterable[str], keep_batchnorm: bool) -> None:
        """Stop training the encoder of ``tasks`` (``backbone.train_encoder``): their backbone parameters
        (modulators, adapters, downsample convs, or a whole backbone path) no longer require gradients, and
        with ``keep_batchnorm`` their BatchNorm layers still train. Without it the encoder is fixed
        altogether: its modules also stay in eval mode (the BatchNorm statistics do not move)."""
        tasks = set(tasks)
        for module_name, module in self.backbone.named_modules():
            norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, p in module.named_parameters(recurse=False):
                if any(owned_by(f"backbone.{module_name}.{name}", t) for t in tasks) and not (norm and keep_batchnorm):
                    p.requires_grad_(False)
        if not keep_batchnorm:
            self.fixed_encoders |= tasks
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiTaskNet:
        super().train(mode)
        if self.frozen:
            for name, module in self.named_modules():
                if any(owned_by(name, t) for t in self.frozen):
                    module.eval()
        if self.fixed_encoders:
            for name, module in self.backbone.named_modules():
                if any(owned_by(f"backbone.{name}", t) for t in self.fixed_encoders):
                    module.eval()
        return self

    # The stage loop below is the one multi-task forward; a subclass changes how the features of the
    # tasks are held (here ``{task: tensor}``; stacked in the batched deploy form) through three hooks.

    def stage_input(self, images: Tensor, tasks: Sequence[str]) -> Features:
        """What the first stage reads: the images, once for every task that must run for ``tasks``."""
        return dict.fromkeys(tasks if self.fusion is None else self.fusion.required(tasks), images)

    def run_stage(self, features: Features, stage: str) -> Features:
        """One stage and its fusion; frozen tasks first, without autograd (they read no live task)."""
        frozen = [t for t in features if t in self.frozen]
        live = [t for t in features if t not in self.frozen]
        out: dict[str, Tensor] = {}
        for group, context in ((frozen, torch.no_grad()), (live, nullcontext())):
            if group:
                with context:
                    out.update(self.backbone.forward_stage({t: features[t] for t in group}, stage))
        if self.fusion is None:
            return out
        fused = dict(out)
        for group, context in ((frozen, torch.no_grad()), (live, nullcontext())):
            if group:
                with context:
                    fused.update({t: f for t, f in self.fusion(stage, out, tasks=group).items() if t in group})
        return fused

    def task_features(self, features: Features, stage: str, task: str) -> Tensor:
        """Task ``task``'s part of the features after ``stage``."""
        return features[task]

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None, raw: bool = False) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; this model has {self.task_names}")
        fusion = self.fusion
        # the NDDR shortcut of a task reads its fused features of every stage it fuses at
        kept: dict[str, list[Tensor]] = {t: [] for t in names if fusion is not None and fusion.has_shortcut(t)}
        features = low = self.stage_input(images, names)
        for stage in STAGES:
            features = self.run_stage(features, stage)
            if stage == "layer1":
                low = features
            for t, stage_features in kept.items():
                if stage in fusion.stages[t]:
                    stage_features.append(self.task_features(features, stage, t))
        last = STAGES[-1]
        high = {t: fusion.shortcut(t, kept[t]) if t in kept else self.task_features(features, last, t) for t in names}
        size = images.shape[-2:]
        outputs = {t: self.heads[t](high[t], self.task_features(low, "layer1", t), size) for t in names}
        if raw:
            return outputs
        return {t: self.tasks[t].postprocess(out) for t, out in outputs.items()}

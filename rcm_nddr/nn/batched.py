"""Batched execution of the deploy form: all T tasks the model runs held as one tensor ``(B, T*C, H, W)``,
task-major channel blocks in a fixed order decided at build time, so that

- each folded backbone conv of all tasks is ONE grouped conv (``groups=T``): block t of the output is
  ``W'_t * x_t + b'_t``, the weights and biases concatenated along the output dim; ReLU, the residual
  add and max pooling act on the stacked tensor unchanged (they are channel-wise); downsample convs
  are grouped the same way;
- the stem is ONE dense conv from the image to ``T*64`` channels (all tasks read the same image): the
  tasks' folded 1x1 modulators on the bank response computed once (shared stem), or their whole folded
  7x7 stem convs (no shared stem, plain ``TaskBackbones``);
- NDDR fusion at a stage is ONE 1x1 conv ``T*C -> F*C`` over the stack, F the tasks fusing there: row
  block t, column block s holds task t's folded NDDR weight block for source s (zero where t does not
  read s); the other tasks' blocks pass through untouched;
- the NDDR shortcut and the heads run per task, on per-task channel views of the stack;
- a fusion with no one-conv form (cross-stitch: per-channel weighted sums, no ReLU) runs its units on
  the tasks' channel views of the stack (``StackedFusion``), as the per-task form does.

Folded ResNet paths stack into a ``BatchedBackbone``, folded VGG paths into a ``BatchedVGG`` (conv1_1 one
dense conv like the ResNet stem, every other conv grouped; ReLU and max pooling act per channel).

The stack runs whole whichever tasks a call asks for (only their shortcuts and heads run)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcm_nddr.nn.backbone import STAGES
from rcm_nddr.nn.folding import VGG_CONVS, DeployBackbone, FoldedBlock, FoldedPath, FoldedVGG
from rcm_nddr.nn.fusion import StageFusion
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import SHORTCUT, NDDRFusion, NDDRLayer


def stack_convs(convs: Sequence[nn.Conv2d], grouped: bool) -> nn.Conv2d:
    """T convs of the same geometry as one conv whose output is the T outputs concatenated along channels.

    ``grouped``: each conv reads its own input block (``groups=T``, input ``T*Ci`` channels, block t read
    by conv t only); otherwise all read the same input (a dense conv with ``T*Co`` output channels). The
    weights (``Co x Ci x k x k`` each) and biases (zero where a conv has none) are concatenated along the
    output dim in the order of ``convs``."""
    first = convs[0]
    geometry = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    for conv in convs[1:]:
        differ = [g for g in geometry if getattr(conv, g) != getattr(first, g)]
        if differ:
            raise ValueError(f"cannot stack convs that differ in {differ}: the tasks' networks differ in architecture")
    if first.groups != 1:
        raise ValueError("stack_convs stacks ungrouped convs")
    n = len(convs)
    stacked = nn.Conv2d(
        first.in_channels * (n if grouped else 1),
        first.out_channels * n,
        first.kernel_size,
        stride=first.stride,
        padding=first.padding,
        dilation=first.dilation,
        groups=n if grouped else 1,
        bias=True,
        padding_mode=first.padding_mode,
    ).to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([c.weight for c in convs], dim=0))
        stacked.bias.copy_(
            torch.cat([torch.zeros_like(c.weight[:, 0, 0, 0]) if c.bias is None else c.bias for c in convs])
        )
    return stacked


class StackedTasks(nn.Module):
    """What a batched backbone adds to a folded path whose convs are the stacked convs of the tasks
    ``order`` (a base placed before the path's class): ``forward_stage(x, stage)`` maps the stack (the
    images for ``stem``, through the shared bank conv ``stem_bank`` first when there is one) through one
    stage, and ``view`` is task t's block of a stage's stack."""

    order: list[str]
    position: dict[str, int]
    stem_bank: nn.Module | None
    stage_channels: dict[str, int]

    def set_order(self, order: Sequence[str], stem_bank: nn.Module | None) -> None:
        self.order = list(order)
        self.position = {task: i for i, task in enumerate(self.order)}
        self.stem_bank = stem_bank

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        if stage == "stem" and self.stem_bank is not None:
            x = self.stem_bank(x)
        return super().forward_stage(x, stage)

    def view(self, stack: Tensor, stage: str, task: str) -> Tensor:
        """Task ``task``'s channels of the stack after ``stage`` (a view, no copy)."""
        channels = self.stage_channels[stage]
        start = self.position[task] * channels
        return stack[:, start : start + channels]


class BatchedBackbone(StackedTasks, FoldedPath):
    """The folded ResNet paths of the tasks ``order`` run as one folded path over their stacked features
    ``(B, T*C, H, W)`` (task t in channel block t): grouped convs in the blocks, one dense stem conv,
    after the shared stem response ``stem_bank`` when there is one."""

    def __init__(
        self,
        order: Sequence[str],
        stem_bank: nn.Module | None,
        stem: nn.Conv2d,
        maxpool: nn.Module,
        stages: Mapping[str, list[FoldedBlock]],
        like: nn.Module,
    ) -> None:
        super().__init__(stem, maxpool, stages, like)
        self.set_order(order, stem_bank)


class BatchedVGG(StackedTasks, FoldedVGG):
    """The folded VGG paths of the tasks ``order`` as one VGG over their stacked features: ``convs`` by
    name, conv1_1 dense (every task reads the image or the shared bank response), the others grouped."""

    def __init__(
        self, order: Sequence[str], stem_bank: nn.Module | None, convs: Mapping[str, nn.Conv2d], like: nn.Module
    ) -> None:
        super().__init__(convs, like)
        self.set_order(order, stem_bank)


def stack_backbone(backbone: DeployBackbone, order: Sequence[str]) -> BatchedBackbone | BatchedVGG:
    """The per-task folded paths of ``backbone`` for the tasks ``order`` as one batched backbone."""
    paths = [backbone.paths[t] for t in order]
    stem_bank = None if backbone.stem_bank is None else copy.deepcopy(backbone.stem_bank)
    if all(isinstance(p, FoldedVGG) for p in paths):
        convs = {
            name: stack_convs([getattr(p, name) for p in paths], grouped=name != VGG_CONVS[0]) for name in VGG_CONVS
        }
        return BatchedVGG(order, stem_bank, convs, backbone)
    if not all(isinstance(p, FoldedPath) for p in paths):
        kinds = sorted({type(p).__name__ for p in paths})
        raise TypeError(f"the batched deploy form stacks folded ResNet or VGG paths of one kind, not {kinds}")
    stem = stack_convs([p.stem for p in paths], grouped=False)  # every task reads the image / bank response
    stages: dict[str, list[FoldedBlock]] = {}
    for stage in STAGES[1:]:
        blocks = []
        for parts in zip(*(p.stages[stage] for p in paths), strict=True):  # block b of every task
            convs = [stack_convs(c, grouped=True) for c in zip(*(b.convs for b in parts), strict=True)]
            downs = [b.downsample for b in parts]
            if any(d is None for d in downs) and not all(d is None for d in downs):
                raise ValueError(f"{stage}: some tasks' blocks have a downsample and others not")
            down = None if downs[0] is None else stack_convs(downs, grouped=True)
            blocks.append(FoldedBlock(*convs, downsample=down))
        stages[stage] = blocks
    return BatchedBackbone(order, stem_bank, stem, copy.deepcopy(paths[0].maxpool), stages, backbone)


class BatchedNDDR(nn.Module):
    """NDDR fusion of the stacked features of the tasks ``order``, one 1x1 conv per fusion stage.

    At stage s with F tasks fusing (``rows[s]``: their positions in the stack), ``convs[s]`` maps the
    whole stack ``T*C -> F*C``: its row block k (the k-th fusing task t) and column block j hold task t's
    folded NDDR weight for the source at position j (zero where t does not read that task), its bias
    t's folded BN shift, so block k of ``ReLU(convs[s](x))`` is ``ReLU(BN(W_t [x_t, x_s1, ...]))``, t's
    NDDR layer. The tasks without a layer at s keep their blocks of ``x``.

    Why not a square ``T*C -> T*C`` conv with identity blocks for those tasks: ``1 * x + 0 * others``
    is exact in IEEE fp32 (and ReLU keeps the post-ReLU stage output), but not under TF32/reduced
    precision convs, and ``0 * inf`` would leak a non-finite neighbour into the task; computing only
    the fusing rows is exact for the others and costs F/T of the square conv.

    ``shortcuts[t]`` is task t's folded NDDR shortcut; it reads t's fused features at ``stages[t]``."""

    def __init__(
        self,
        order: Sequence[str],
        convs: Mapping[str, nn.Conv2d],
        rows: Mapping[str, list[int]],
        stage_channels: Mapping[str, int],
        stages: Mapping[str, list[str]],
        shortcuts: Mapping[str, nn.Module],
    ) -> None:
        super().__init__()
        self.order = list(order)
        self.convs = nn.ModuleDict(convs)
        self.rows = {stage: list(r) for stage, r in rows.items()}
        self.stage_channels = dict(stage_channels)
        self.stages = {task: list(s) for task, s in stages.items()}
        self.shortcuts = nn.ModuleDict(shortcuts)

    def required(self, tasks: Sequence[str]) -> list[str]:
        """Every task of the stack: all of them run whatever ``tasks`` asks."""
        return list(self.order)

    def has_shortcut(self, task: str) -> bool:
        return task in self.shortcuts

    def shortcut(self, task: str, stage_features: Sequence[Tensor]) -> Tensor:
        return self.shortcuts[task](stage_features)

    def forward(self, stage: str, stack: Tensor) -> Tensor:
        """The fused stack after ``stage`` (the stack itself where no task fuses)."""
        if stage not in self.convs:
            return stack
        fused = F.relu(self.convs[stage](stack))
        rows = self.rows[stage]
        if len(rows) == len(self.order):
            return fused
        channels = self.stage_channels[stage]
        chunks, k = [], 0
        for position in range(len(self.order)):  # fused rows where the task fuses, its own features elsewhere
            if k < len(rows) and rows[k] == position:
                chunks.append(fused[:, k * channels : (k + 1) * channels])
                k += 1
            else:
                chunks.append(stack[:, position * channels : (position + 1) * channels])
        return torch.cat(chunks, dim=1)


class StackedFusion(nn.Module):
    """A stage fusion with no one-conv form over the stack (cross-stitch: per-channel weighted sums, no
    ReLU) run on the stack of the tasks ``order``: at a stage, the fusing tasks' units read their sources'
    channel blocks (views, no copy) and compute what they compute in the per-task form; their outputs
    replace their blocks, the other tasks' blocks pass through."""

    def __init__(self, fusion: StageFusion, order: Sequence[str]) -> None:
        super().__init__()
        self.fusion = fusion
        self.order = list(order)
        self.stages = {task: list(s) for task, s in fusion.stages.items()}

    def required(self, tasks: Sequence[str]) -> list[str]:
        """Every task of the stack: all of them run whatever ``tasks`` asks."""
        return list(self.order)

    def has_shortcut(self, task: str) -> bool:
        return self.fusion.has_shortcut(task)

    def shortcut(self, task: str, stage_features: Sequence[Tensor]) -> Tensor:
        return self.fusion.shortcut(task, stage_features)

    def forward(self, stage: str, stack: Tensor) -> Tensor:
        """The fused stack after ``stage`` (the stack itself where no task fuses)."""
        if not any(stage in stages for stages in self.stages.values()):
            return stack
        channels = self.fusion.stage_channels[stage]
        views = {task: stack[:, i * channels : (i + 1) * channels] for i, task in enumerate(self.order)}
        fused = self.fusion(stage, views)
        return torch.cat([fused[task] for task in self.order], dim=1)


def stack_fusion(fusion: nn.Module, order: Sequence[str]) -> BatchedNDDR | StackedFusion:
    """The deploy form's fusion (``fold_sequences`` applied) over the stack ``order``: NDDR as one conv per
    stage (``stack_nddr``), any other stage fusion unit by unit on the stack (``StackedFusion``)."""
    if isinstance(fusion, NDDRFusion):
        return stack_nddr(fusion, order)
    if isinstance(fusion, StageFusion):
        return StackedFusion(fusion, order)
    raise TypeError(f"the batched deploy form runs stage fusions (NDDR, cross-stitch), not {type(fusion).__name__}")


def stack_nddr(fusion: NDDRFusion, order: Sequence[str]) -> BatchedNDDR:
    """The BN-folded NDDR layers of ``fusion`` (``fold_sequences`` applied; a layer without BatchNorm as it
    is) for the stack ``order``.

    NDDR sources are ordered own task first, then the others in store order; each source's weight block
    goes to the column block of that source's position in the stack, not to its position in the list."""
    position = {task: i for i, task in enumerate(order)}
    n = len(order)
    convs: dict[str, nn.Conv2d] = {}
    rows: dict[str, list[int]] = {}
    for stage, channels in fusion.stage_channels.items():
        fusing = [t for t in order if stage in fusion.stages.get(t, ())]
        if not fusing:
            continue
        first = fusion[fusing[0]][stage].conv
        weight = torch.zeros(len(fusing) * channels, n * channels, device=first.weight.device, dtype=first.weight.dtype)
        bias = torch.zeros(len(fusing) * channels, device=weight.device, dtype=weight.dtype)
        for k, task in enumerate(fusing):
            layer: NDDRLayer = fusion[task][stage]
            w = layer.conv.weight.detach().flatten(1)  # C x |S_t| C
            out = slice(k * channels, (k + 1) * channels)
            for j, source in enumerate(fusion.sources[task]):
                if source not in position:
                    raise ValueError(f"NDDR source {source!r} of task {task!r} is not in the stack {list(order)}")
                p = position[source]
                weight[out, p * channels : (p + 1) * channels] = w[:, j * channels : (j + 1) * channels]
            if layer.conv.bias is not None:
                bias[out] = layer.conv.bias.detach()
        conv = nn.Conv2d(n * channels, len(fusing) * channels, 1, bias=True).to(weight.device, weight.dtype)
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
        convs[stage] = conv
        rows[stage] = [position[t] for t in fusing]
    shortcuts = {t: fusion[t][SHORTCUT] for t in order if fusion.has_shortcut(t)}
    stages = {t: list(fusion.stages[t]) for t in order if t in fusion.stages}
    return BatchedNDDR(order, convs, rows, fusion.stage_channels, stages, shortcuts)


class BatchedMultiTaskNet(MultiTaskNet):
    """A deploy form whose backbone and fusion run all tasks at once over one stacked tensor
    (``BatchedBackbone`` or ``BatchedVGG``, ``BatchedNDDR`` or ``StackedFusion``); the NDDR shortcuts and
    heads run per task on views of it.

    Called like a MultiTaskNet, whose forward it runs with the stack as the features between stages:
    ``model(images, tasks=None, raw=False) -> {task: prediction}``. The whole stack (every task the
    model was built to run) is computed whatever ``tasks`` asks for; only the asked tasks' shortcuts and
    heads run."""

    backbone: BatchedBackbone | BatchedVGG
    fusion: BatchedNDDR | StackedFusion | None

    def stage_input(self, images: Tensor, tasks: Sequence[str]) -> Tensor:
        return images

    def run_stage(self, features: Tensor, stage: str) -> Tensor:
        stack = self.backbone.forward_stage(features, stage)
        return stack if self.fusion is None else self.fusion(stage, stack)

    def task_features(self, features: Tensor, stage: str, task: str) -> Tensor:
        return self.backbone.view(features, stage, task)

"""The deploy form of a MultiTaskNet: inference only, with every BatchNorm folded into its conv and each
task's modulators folded into the filter bank, so a task costs what a plain network of the same
architecture costs.

- RC convs: ``BN_t(M_t (W_s * x)) = W'_t * x + b'_t`` with ``W'_t = diag(s_t) M_t W_s`` and
  ``b'_t = beta_t - s_t mu_t``, ``s_t = gamma_t / sqrt(var_t + eps)``: one conv per task.
- The stem, when several tasks read the same image: its bank response ``W_s * x`` is computed once and
  each task applies its folded modulator (a 1x1 conv with bias) to it, instead of one 7x7 conv per
  task (``shared_stem``).
- Plain paths (``reparam: none``), downsample convs, NDDR layers and the heads' conv-BN pairs are
  folded the same way.

``deploy(model)`` returns a new module (the training form is left as it was) whose outputs equal the
training form's in eval mode up to float rounding.

Batched execution (``deploy(model, batched=True)``, a ``BatchedMultiTaskNet``): by default the tasks
run one after another (one conv call per task and conv, NDDR layer by layer). The batched form holds
all T tasks the model runs as one tensor ``(B, T*C, H, W)``, task-major channel blocks in a fixed order
decided at build time, and runs

- each folded backbone conv of all tasks as ONE grouped conv (``groups=T``): block t of the output is
  ``W'_t * x_t + b'_t``, the weights and biases concatenated along the output dim; ReLU, the residual
  add and max pooling act on the stacked tensor unchanged (they are channel-wise); downsample convs
  are grouped the same way;
- the stem as ONE dense conv from the image to ``T*64`` channels (all tasks read the same image): the
  tasks' folded 1x1 modulators on the bank response computed once (shared stem), or their whole folded
  7x7 stem convs (no shared stem, plain ``TaskBackbones``);
- NDDR fusion at a stage as ONE 1x1 conv ``T*C -> F*C`` over the stack, F the tasks fusing there: row
  block t, column block s holds task t's folded NDDR weight block for source s (zero where t does not
  read s); the other tasks' blocks pass through untouched;
- the NDDR shortcut and the heads per task, on per-task channel views of the stack.

The stack runs whole whichever tasks a call asks for (only their shortcuts and heads run). With one
``SharedBackbone`` (hard sharing) there is nothing to batch: ``batched`` has no effect."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rcm_nddr.nn.backbone import STAGES, ResNetBackbone, SharedBackbone, TaskBackbones
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import NDDRFusion, NDDRLayer, NDDRShortcut
from rcm_nddr.nn.rc import RCBlock, RCConv2d, RCResNet


def _conv_like(conv: nn.Module | None, weight: Tensor) -> nn.Conv2d:
    """A plain conv with ``weight`` and the stride, padding and dilation of ``conv`` (an nn.Conv2d or an
    RCConv2d; None: a 1x1 conv)."""
    out_channels, in_channels, kh, kw = weight.shape
    geometry = {} if conv is None else {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    plain = nn.Conv2d(in_channels, out_channels, (kh, kw), bias=False, **geometry)
    with torch.no_grad():
        plain.weight.copy_(weight)
    return plain.to(weight.device)


def modulated_weight(conv: RCConv2d, task: str) -> Tensor:
    """``M_t W_s``: the conv task ``task`` computes with (products in float64, rounded once)."""
    modulator = conv.modulators[task].weight.detach().flatten(1).double()
    bank = conv.filter_bank.double()
    return (modulator @ bank.flatten(1)).view_as(bank).to(conv.filter_bank.dtype)


def fold(conv: nn.Module | None, weight: Tensor, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The conv ``weight`` (with ``conv``'s geometry) followed by ``bn`` in eval mode, as one conv."""
    return fuse_conv_bn_eval(_conv_like(conv, weight).eval(), bn.eval())


class FoldedBlock(nn.Module):
    """A residual block with folded convs: ``relu(convs(x) + downsample(x))``, ReLU between the convs."""

    def __init__(self, convs: list[nn.Conv2d], downsample: nn.Conv2d | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = F.relu(out)
        return F.relu(out + identity)


class FoldedPath(nn.Module):
    """One task's folded ResNet: ``stem`` (a conv with bias: the whole stem conv, or the 1x1 folded
    modulator applied to a shared bank response), max pooling, and the blocks of each stage."""

    def __init__(self, stem: nn.Conv2d, maxpool: nn.Module, stages: Mapping[str, list[FoldedBlock]]) -> None:
        super().__init__()
        self.stem = stem
        self.maxpool = maxpool
        self.stages = nn.ModuleDict({name: nn.Sequential(*blocks) for name, blocks in stages.items()})

    def finish_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(F.relu(self.stem(x)))

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        if stage == "stem":
            return self.finish_stem(x)
        return self.stages[stage](x)


class DeployBackbone(nn.Module):
    """Folded per-task paths, with an optional shared stem response (``stem_bank``): then each path's
    stem is the task's folded 1x1 modulator, and the bank conv runs once per distinct input."""

    def __init__(self, paths: Mapping[str, FoldedPath], stem_bank: nn.Conv2d | None, like: nn.Module) -> None:
        super().__init__()
        self.paths = nn.ModuleDict(paths)
        self.stem_bank = stem_bank
        self.stage_channels, self.stage_strides = like.stage_channels, like.stage_strides
        self.output_stride = like.output_stride

    def forward_stage(self, features: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        if stage != "stem" or self.stem_bank is None:
            return {task: self.paths[task].forward_stage(x, stage) for task, x in features.items()}
        responses: dict[int, Tensor] = {}
        out = {}
        for task, x in features.items():
            if id(x) not in responses:
                responses[id(x)] = self.stem_bank(x)
            out[task] = self.paths[task].finish_stem(responses[id(x)])
        return out


# ----------------------------------------------------------------------------- folding the backbones


#: one block's convs as ``(conv, weight it computes with, BatchNorm after it)`` and its downsample
#: (``Sequential(conv, BatchNorm)``) or None
BlockParts = tuple[list[tuple[nn.Module, Tensor, nn.BatchNorm2d]], nn.Sequential | None]


def _fold_stages(net: nn.Module, parts: Callable[[nn.Module], BlockParts]) -> dict[str, list[FoldedBlock]]:
    """Every residual stage of ``net`` with each block's convs folded (``parts`` says what they are)."""
    stages = {}
    for stage in STAGES[1:]:
        blocks = []
        for block in getattr(net, stage):
            convs, downsample = parts(block)
            down = None if downsample is None else fold(downsample[0], downsample[0].weight.detach(), downsample[1])
            blocks.append(FoldedBlock([fold(*c) for c in convs], down))
        stages[stage] = blocks
    return stages


def _fold_plain(net: ResNetBackbone) -> FoldedPath:
    def parts(block: nn.Module) -> BlockParts:
        names = ["conv1", "conv2"] + (["conv3"] if hasattr(block, "conv3") else [])
        convs = [getattr(block, n) for n in names]
        return [
            (c, c.weight.detach(), getattr(block, f"bn{i}")) for i, c in enumerate(convs, start=1)
        ], block.downsample

    stem = fold(net.conv1, net.conv1.weight.detach(), net.bn1)
    return FoldedPath(stem, copy.deepcopy(net.maxpool), _fold_stages(net, parts))


def _fold_rc(rc: RCResNet, task: str, shared_stem: bool) -> FoldedPath:
    def parts(block: RCBlock) -> BlockParts:
        convs = [getattr(block, n) for n in block.names]
        folded = [
            (c, modulated_weight(c, task), getattr(block, f"bn{i}").per_task[task])
            for i, c in enumerate(convs, start=1)
        ]
        return folded, None if block.downsample is None else block.downsample.per_task[task]

    bn = rc.bn1.per_task[task]
    if shared_stem:  # the task's modulator (Co x Co x 1 x 1) on the shared bank response
        stem = fold(None, rc.conv1.modulators[task].weight.detach(), bn)
    else:
        stem = fold(rc.conv1, modulated_weight(rc.conv1, task), bn)
    return FoldedPath(stem, copy.deepcopy(rc.maxpool), _fold_stages(rc, parts))


def deploy_backbone(backbone: nn.Module, tasks: list[str], shared_stem: bool | None = None) -> nn.Module:
    """The folded form of a MultiTaskNet backbone for ``tasks``. ``shared_stem`` (RC only; default: when
    two or more tasks run) computes the stem's bank response once for all tasks."""
    if isinstance(backbone, RCResNet):
        share = len(tasks) > 1 if shared_stem is None else shared_stem
        paths = {t: _fold_rc(backbone, t, share) for t in tasks}
        stem_bank = _conv_like(backbone.conv1, backbone.conv1.filter_bank) if share else None
        return DeployBackbone(paths, stem_bank, backbone)
    if isinstance(backbone, TaskBackbones):
        return DeployBackbone({t: _fold_plain(backbone.paths[t]) for t in tasks}, None, backbone)
    if isinstance(backbone, SharedBackbone):
        return SharedBackbone(_FoldedNet(_fold_plain(backbone.net), backbone.net))
    raise TypeError(f"no deploy form for a backbone of type {type(backbone).__name__}")


class _FoldedNet(nn.Module):
    """A folded plain network in the interface SharedBackbone expects of its ``net``."""

    def __init__(self, path: FoldedPath, like: ResNetBackbone) -> None:
        super().__init__()
        self.path = path
        self.stage_channels, self.stage_strides = like.stage_channels, like.stage_strides
        self.output_stride = like.output_stride

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        return self.path.forward_stage(x, stage)


# ----------------------------------------------------------------------------- heads and fusion


def fold_sequences(module: nn.Module) -> None:
    """In place: every Conv2d directly followed by a BatchNorm2d inside an nn.Sequential becomes one
    conv (the BatchNorm an Identity), and every NDDR layer/shortcut's conv absorbs its BatchNorm."""
    for child in list(module.modules()):
        if isinstance(child, (NDDRLayer, NDDRShortcut)):
            child.conv = fuse_conv_bn_eval(child.conv.eval(), child.bn.eval())
            child.bn = nn.Identity()
        elif isinstance(child, nn.Sequential):
            items = list(child.named_children())
            for (name, conv), (bn_name, bn) in zip(items, items[1:], strict=False):  # neighbours
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(child, name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                    setattr(child, bn_name, nn.Identity())


@torch.no_grad()
def deploy(model: MultiTaskNet, shared_stem: bool | None = None, batched: bool = False) -> MultiTaskNet:
    """The inference-only deploy form of ``model`` (see the module docstring): a new MultiTaskNet with
    the same tasks, heads and fusion, in eval mode, no parameter requiring a gradient.

    ``batched``: a ``BatchedMultiTaskNet`` running all tasks' backbone convs and NDDR fusion as grouped
    convs over one stacked tensor (no effect on a ``SharedBackbone``: there is only one network)."""
    was_training = model.training
    model.eval()
    try:
        run = model.fusion.required(model.task_names) if model.fusion is not None else list(model.task_names)
        backbone = deploy_backbone(model.backbone, run, shared_stem)
        heads = {name: copy.deepcopy(head) for name, head in model.heads.items()}
        fusion = copy.deepcopy(model.fusion)
    finally:
        model.train(was_training)
    for head in heads.values():
        fold_sequences(head)
    if fusion is not None:
        fold_sequences(fusion)
    if batched and isinstance(backbone, DeployBackbone):
        folded: MultiTaskNet = BatchedMultiTaskNet(
            model.tasks, stack_backbone(backbone, run), heads, None if fusion is None else stack_fusion(fusion, run)
        )
    else:
        folded = MultiTaskNet(model.tasks, backbone, heads, fusion)
    folded.frozen = set(model.frozen)
    folded.requires_grad_(False)
    return folded.eval()


# ----------------------------------------------------------------------------- batched execution


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


class BatchedBackbone(nn.Module):
    """The folded paths of the tasks ``order`` run as one network over their stacked features
    ``(B, T*C, H, W)`` (task t in channel block t): grouped convs in the blocks, one dense stem conv.

    ``forward_stage(x, stage)`` maps the stack (the images for ``stem``) through one stage; ``view``
    is task t's block of a stage's stack."""

    def __init__(
        self,
        order: Sequence[str],
        stem_bank: nn.Conv2d | None,
        stem: nn.Conv2d,
        maxpool: nn.Module,
        stages: Mapping[str, list[FoldedBlock]],
        like: nn.Module,
    ) -> None:
        super().__init__()
        self.order = list(order)
        self.position = {task: i for i, task in enumerate(self.order)}
        self.stem_bank = stem_bank
        self.stem = stem
        self.maxpool = maxpool
        self.stages = nn.ModuleDict({name: nn.Sequential(*blocks) for name, blocks in stages.items()})
        self.stage_channels, self.stage_strides = like.stage_channels, like.stage_strides
        self.output_stride = like.output_stride

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        if stage == "stem":
            if self.stem_bank is not None:
                x = self.stem_bank(x)
            return self.maxpool(F.relu(self.stem(x)))
        return self.stages[stage](x)

    def view(self, stack: Tensor, stage: str, task: str) -> Tensor:
        """Task ``task``'s channels of the stack after ``stage`` (a view, no copy)."""
        channels = self.stage_channels[stage]
        start = self.position[task] * channels
        return stack[:, start : start + channels]


def stack_backbone(backbone: DeployBackbone, order: Sequence[str]) -> BatchedBackbone:
    """The per-task folded paths of ``backbone`` for the tasks ``order`` as one BatchedBackbone."""
    paths = [backbone.paths[t] for t in order]
    stem = stack_convs([p.stem for p in paths], grouped=False)  # every task reads the image / bank response
    stages: dict[str, list[FoldedBlock]] = {}
    for stage in STAGES[1:]:
        blocks = []
        for parts in zip(*(p.stages[stage] for p in paths), strict=True):  # block b of every task
            convs = [stack_convs(c, grouped=True) for c in zip(*(b.convs for b in parts), strict=True)]
            downs = [b.downsample for b in parts]
            if any(d is None for d in downs) and not all(d is None for d in downs):
                raise ValueError(f"{stage}: some tasks' blocks have a downsample and others not")
            blocks.append(FoldedBlock(convs, None if downs[0] is None else stack_convs(downs, grouped=True)))
        stages[stage] = blocks
    stem_bank = None if backbone.stem_bank is None else copy.deepcopy(backbone.stem_bank)
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


def stack_fusion(fusion: NDDRFusion, order: Sequence[str]) -> BatchedNDDR:
    """The BN-folded NDDR layers of ``fusion`` (``fold_sequences`` applied) for the stack ``order``.

    NDDR sources are ordered own task first, then the others in store order; each source's weight block
    goes to the column block of that source's position in the stack, not to its position in the list."""
    if not isinstance(fusion, NDDRFusion):
        raise TypeError(f"batched execution supports NDDR fusion, not {type(fusion).__name__}")
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
    shortcuts = {t: fusion[t]["shortcut"] for t in order if fusion.has_shortcut(t)}
    stages = {t: list(fusion.stages[t]) for t in order if t in fusion.stages}
    return BatchedNDDR(order, convs, rows, fusion.stage_channels, stages, shortcuts)


class BatchedMultiTaskNet(MultiTaskNet):
    """A deploy form whose backbone and NDDR fusion run all tasks at once over one stacked tensor
    (``BatchedBackbone``, ``BatchedNDDR``); the NDDR shortcuts and heads run per task on views of it.

    Called like a MultiTaskNet: ``model(images, tasks=None, raw=False) -> {task: prediction}``. The
    whole stack (every task the model was built to run) is computed whatever ``tasks`` asks for; only the
    asked tasks' shortcuts and heads run."""

    backbone: BatchedBackbone
    fusion: BatchedNDDR | None

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None, raw: bool = False) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; this model has {self.task_names}")
        backbone, fusion = self.backbone, self.fusion
        shortcut = [] if fusion is None else [t for t in names if fusion.has_shortcut(t)]
        kept: dict[str, list[Tensor]] = {t: [] for t in shortcut}
        x, low = images, images
        for stage in STAGES:
            x = backbone.forward_stage(x, stage)
            if fusion is not None:
                x = fusion(stage, x)
            if stage == "layer1":
                low = x
            for t in shortcut:
                if stage in fusion.stages[t]:
                    kept[t].append(backbone.view(x, stage, t))
        last = STAGES[-1]
        high = {t: fusion.shortcut(t, kept[t]) if t in kept else backbone.view(x, last, t) for t in names}
        size = images.shape[-2:]
        outputs = {t: self.heads[t](high[t], backbone.view(low, "layer1", t), size) for t in names}
        if raw:
            return outputs
        return {t: self.tasks[t].postprocess(out) for t, out in outputs.items()}

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
training form's in eval mode up to float rounding."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import MultiTaskNet
from .nn.backbone import STAGES, ResNetBackbone, SharedBackbone, TaskBackbones
from .nn.nddr import NDDRLayer, NDDRShortcut
from .nn.rc import RCBlock, RCConv2d, RCResNet


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
def deploy(model: MultiTaskNet, shared_stem: bool | None = None) -> MultiTaskNet:
    """The inference-only deploy form of ``model`` (see the module docstring): a new MultiTaskNet with
    the same tasks, heads and fusion, in eval mode, no parameter requiring a gradient."""
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
    folded = MultiTaskNet(model.tasks, backbone, heads, fusion)
    folded.frozen = set(model.frozen)
    folded.requires_grad_(False)
    return folded.eval()

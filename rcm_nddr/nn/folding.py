"""Folding for the deploy form: each task's modulators into the filter bank and every BatchNorm into the
conv before it, so a task's backbone becomes a plain ResNet of convs with biases (``FoldedPath``).

- RC convs: ``BN_t(M_t (W_s * x)) = W'_t * x + b'_t`` with ``W'_t = diag(s_t) M_t W_s`` and
  ``b'_t = beta_t - s_t mu_t``, ``s_t = gamma_t / sqrt(var_t + eps)``: one conv per task.
- The shared stem: its bank response ``W_s * x`` is computed once and each task applies its folded
  modulator (a 1x1 conv with bias) to it, instead of one 7x7 conv per task.
- Plain paths (``reparam: none``), downsample convs, NDDR layers and the heads' conv-BN pairs are
  folded the same way."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rcm_nddr.nn.backbone import STAGES, PerTaskBackbone, ResNetBackbone, SharedBackbone, TaskBackbones
from rcm_nddr.nn.nddr import NDDRLayer, NDDRShortcut
from rcm_nddr.nn.rc import RCConv2d, RCResNet


def conv_like(conv: nn.Module | None, weight: Tensor) -> nn.Conv2d:
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
    return fuse_conv_bn_eval(conv_like(conv, weight).eval(), bn.eval())


class FoldedBlock(nn.Module):
    """A residual block with BatchNorm folded into its convs (a Bottleneck has ``conv3``, a BasicBlock
    not). Its convs may also be the stacked convs of several tasks (the batched deploy form)."""

    def __init__(
        self,
        conv1: nn.Conv2d,
        conv2: nn.Conv2d,
        conv3: nn.Conv2d | None = None,
        downsample: nn.Conv2d | None = None,
    ) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = conv1, conv2, conv3
        self.downsample = downsample

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2] + ([] if self.conv3 is None else [self.conv3])

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.conv1(x))
        out = self.conv2(out)
        if self.conv3 is not None:
            out = self.conv3(F.relu(out))
        return F.relu(out + identity)


class FoldedPath(nn.Module):
    """One task's folded ResNet: ``stem`` (a conv with bias: the whole stem conv, or the 1x1 folded
    modulator applied to a shared bank response), max pooling, and the blocks of each stage; with the
    stage geometry of the network ``like`` it was folded from."""

    def __init__(
        self, stem: nn.Conv2d, maxpool: nn.Module, stages: Mapping[str, list[FoldedBlock]], like: nn.Module
    ) -> None:
        super().__init__()
        self.stem = stem
        self.maxpool = maxpool
        self.stages = nn.ModuleDict({name: nn.Sequential(*blocks) for name, blocks in stages.items()})
        self.stage_channels, self.stage_strides = like.stage_channels, like.stage_strides
        self.output_stride = like.output_stride

    def finish_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(F.relu(self.stem(x)))

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        if stage == "stem":
            return self.finish_stem(x)
        return self.stages[stage](x)


class DeployBackbone(PerTaskBackbone):
    """Folded per-task paths, with an optional shared stem response (``stem_bank``): then each path's
    stem is the task's folded 1x1 modulator, and the bank conv runs once per distinct input."""

    def __init__(self, paths: Mapping[str, FoldedPath], stem_bank: nn.Conv2d | None, like: nn.Module) -> None:
        super().__init__()
        self.paths = nn.ModuleDict(paths)
        self.stem_bank = stem_bank
        self.stage_channels, self.stage_strides = like.stage_channels, like.stage_strides
        self.output_stride = like.output_stride

    @property
    def shares_stem(self) -> bool:
        return self.stem_bank is not None

    def stem_response(self, x: Tensor) -> Tensor:
        return self.stem_bank(x)

    def finish_stem(self, response: Tensor, task: str) -> Tensor:
        return self.paths[task].finish_stem(response)

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        if stage == "stem" and self.shares_stem:
            return self.finish_stem(self.stem_response(x), task)
        return self.paths[task].forward_stage(x, stage)


#: a residual block's ``(conv, weight it computes with, BatchNorm after it)`` in forward order, and its
#: downsample (``Sequential(conv, BatchNorm)``) or None
BlockParts = tuple[list[tuple[nn.Module, Tensor, nn.BatchNorm2d]], nn.Sequential | None]


def conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(convK, bnK)`` of a torchvision or RC residual block, in forward order (the RC blocks keep
    torchvision's names)."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if getattr(block, "conv3", None) is not None:
        pairs.append((block.conv3, block.bn3))
    return pairs


def _fold_stages(net: nn.Module, parts: Callable[[nn.Module], BlockParts]) -> dict[str, list[FoldedBlock]]:
    """Every residual stage of ``net`` with each block's convs folded (``parts`` says what they are)."""
    stages = {}
    for stage in STAGES[1:]:
        blocks = []
        for block in getattr(net, stage):
            convs, downsample = parts(block)
            down = None if downsample is None else fold(downsample[0], downsample[0].weight.detach(), downsample[1])
            blocks.append(FoldedBlock(*[fold(*c) for c in convs], downsample=down))
        stages[stage] = blocks
    return stages


def fold_plain(net: ResNetBackbone) -> FoldedPath:
    """A plain ResNet (every conv followed by its BatchNorm) as one folded path."""

    def parts(block: nn.Module) -> BlockParts:
        return [(conv, conv.weight.detach(), bn) for conv, bn in conv_bn_pairs(block)], block.downsample

    stem = fold(net.conv1, net.conv1.weight.detach(), net.bn1)
    return FoldedPath(stem, copy.deepcopy(net.maxpool), _fold_stages(net, parts), net)


def fold_rc(rc: RCResNet, task: str, shared_stem: bool) -> FoldedPath:
    """Task ``task``'s path through an RC backbone, folded; with ``shared_stem`` its stem is the folded
    1x1 modulator that reads the shared bank response."""

    def parts(block: nn.Module) -> BlockParts:
        folded = [(conv, modulated_weight(conv, task), bn.per_task[task]) for conv, bn in conv_bn_pairs(block)]
        return folded, None if block.downsample is None else block.downsample.per_task[task]

    bn = rc.bn1.per_task[task]
    if shared_stem:  # the task's modulator (Co x Co x 1 x 1) on the shared bank response
        stem = fold(None, rc.conv1.modulators[task].weight.detach(), bn)
    else:
        stem = fold(rc.conv1, modulated_weight(rc.conv1, task), bn)
    return FoldedPath(stem, copy.deepcopy(rc.maxpool), _fold_stages(rc, parts), rc)


def deploy_backbone(backbone: nn.Module, tasks: list[str], shared_stem: bool | None = None) -> nn.Module:
    """The folded form of a MultiTaskNet backbone for ``tasks``. ``shared_stem`` (RC only; default: when
    two or more tasks run) computes the stem's bank response once for all tasks."""
    if isinstance(backbone, RCResNet):
        share = len(tasks) > 1 if shared_stem is None else shared_stem
        paths = {t: fold_rc(backbone, t, share) for t in tasks}
        stem_bank = conv_like(backbone.conv1, backbone.conv1.filter_bank) if share else None
        return DeployBackbone(paths, stem_bank, backbone)
    if isinstance(backbone, TaskBackbones):
        return DeployBackbone({t: fold_plain(backbone.paths[t]) for t in tasks}, None, backbone)
    if isinstance(backbone, SharedBackbone):
        return SharedBackbone(fold_plain(backbone.net))
    raise TypeError(f"no deploy form for a backbone of type {type(backbone).__name__}")


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

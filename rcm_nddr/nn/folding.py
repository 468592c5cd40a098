"""Folding for the deploy form: each task's modulators or adapters into the filter bank and every BatchNorm
into the conv before it, so a task's backbone becomes a plain network of convs with biases (``FoldedPath``
for the ResNets, ``FoldedVGG`` for VGG-16).

What one task's conv computes in eval mode, as one conv ``W' * x + b'`` (``task_weights``):

- RC: ``M_t (W_s * x + b_s)``: ``W' = M_t W_s``, ``b' = M_t b_s`` (no bias where the bank has none).
- RA series: ``y + A_t(BN_a(y))`` with ``y = W * x`` and the adapter's BatchNorm ``s y + t``:
  ``W' = (I + A_t diag(s)) W``, ``b' = A_t t``.
- RA parallel: ``W * x + A_t(centre(x))``: the 1x1 adapter reads the input at the centre of each window
  of ``W``, so it adds to the kernel's centre tap: ``W' = W + A_t`` there.
- A plain conv (``reparam: none``, downsample convs, VGG) as it is.

The task's BatchNorm after the conv then folds in: ``diag(s_t) W'`` and ``s_t (b' - mu_t) + beta_t`` with
``s_t = gamma_t / sqrt(var_t + eps)``: one conv per task.

The shared stem: the stem conv's task-independent part (``shared_response``: the bank response
``W_s * x (+ b_s)``; for parallel adapters with the image sampled at the window centres stacked after it)
runs once and each task applies a folded 1x1 conv to it (``stem_weights``: ``M_t``; ``I + A_t diag(s)``
with bias ``A_t t``; ``[I | A_t]``), instead of one full stem conv per task.

NDDR layers and shortcuts (with BatchNorm) and the heads' conv-BN pairs are folded in place
(``fold_sequences``); cross-stitch units are per-channel weighted sums with nothing to fold."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rcm_nddr.nn.adapters import ParallelAdapterConv2d, RAResNet, SeriesAdapterConv2d
from rcm_nddr.nn.backbone import STAGES, PerTaskBackbone, ResNetBackbone, SharedBackbone, TaskBackbones
from rcm_nddr.nn.nddr import NDDRLayer, NDDRShortcut
from rcm_nddr.nn.rc import RCConv2d, RCResNet
from rcm_nddr.nn.rc_vgg import RCVGG
from rcm_nddr.nn.vgg import NEW_LAYERS, TORCHVISION_FEATURES, VGGBackbone

#: the convs of VGG-16 DeepLab-LargeFOV in forward order
VGG_CONVS: tuple[str, ...] = (*TORCHVISION_FEATURES, *NEW_LAYERS)


def conv_like(conv: nn.Module | None, weight: Tensor, bias: Tensor | None = None) -> nn.Conv2d:
    """A plain conv with ``weight`` (and ``bias``, if any) and the stride, padding and dilation of ``conv``
    (an nn.Conv2d, RCConv2d or AdapterConv2d; None: a 1x1 conv)."""
    out_channels, in_channels, kh, kw = weight.shape
    geometry = {} if conv is None else {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    plain = nn.Conv2d(in_channels, out_channels, (kh, kw), bias=bias is not None, **geometry)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain.to(weight.device)


def modulated_weight(conv: RCConv2d, task: str) -> Tensor:
    """``M_t W_s``: the conv task ``task`` computes with (products in float64, rounded once)."""
    modulator = conv.modulator(task).weight.detach().flatten(1).double()
    bank = conv.filter_bank.double()
    return (modulator @ bank.flatten(1)).view_as(bank).to(conv.filter_bank.dtype)


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``bn`` in eval mode as ``scale * x + shift`` per channel, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics normalizes by the batch and cannot be folded")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def series_mix(conv: SeriesAdapterConv2d, task: str) -> tuple[Tensor, Tensor]:
    """``I + A_t diag(s)`` (Co x Co) and ``A_t t`` in float64: the series adapter of ``task`` on the bank's
    response ``y`` in eval mode, ``y + A_t (s y + t)``."""
    adapter = conv.adapters[task]
    scale, shift = batchnorm_affine(adapter.bn)
    a = adapter.conv.weight.detach().flatten(1).double()
    eye = torch.eye(conv.out_channels, dtype=torch.float64, device=a.device)
    return eye + a * scale, a @ shift


def parallel_weight(conv: ParallelAdapterConv2d, task: str) -> Tensor:
    """``W + A_t`` at the centre tap of every kernel: the parallel adapter reads the input where that tap
    does (``ParallelAdapterConv2d.centre``)."""
    kh, kw = conv.filter_bank.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"a parallel adapter folds into a kernel with a centre tap, not a {kh}x{kw} kernel")
    weight = conv.filter_bank.clone()
    weight[:, :, kh // 2, kw // 2] += conv.adapters[task].weight.detach().flatten(1)
    return weight


def task_weights(conv: nn.Module, task: str | None) -> tuple[Tensor, Tensor | None]:
    """The weight and bias of the one plain conv that computes what ``conv`` computes for ``task`` in eval
    mode (see the module docstring); a plain nn.Conv2d's own (``task`` unused)."""
    if isinstance(conv, RCConv2d):
        bias = conv.filter_bank_bias
        if bias is not None:
            modulator = conv.modulator(task).weight.detach().flatten(1).double()
            bias = (modulator @ bias.double()).to(bias.dtype)
        return modulated_weight(conv, task), bias
    if isinstance(conv, SeriesAdapterConv2d):
        mix, shift = series_mix(conv, task)
        bank = conv.filter_bank
        return (mix @ bank.double().flatten(1)).view_as(bank).to(bank.dtype), shift.to(bank.dtype)
    if isinstance(conv, ParallelAdapterConv2d):
        return parallel_weight(conv, task), None
    if isinstance(conv, nn.Conv2d):
        return conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    raise TypeError(f"no folded form of a {type(conv).__name__}")


def stem_weights(conv: nn.Module, task: str) -> tuple[Tensor, Tensor | None]:
    """The weight (Co x C x 1 x 1) and bias of the 1x1 conv that maps the shared stem response of ``conv``
    (``shared_response``, C channels) to what ``conv`` computes for ``task``."""
    if isinstance(conv, RCConv2d):
        return conv.modulator(task).weight.detach(), None
    if isinstance(conv, SeriesAdapterConv2d):
        mix, shift = series_mix(conv, task)
        dtype = conv.filter_bank.dtype
        return mix.to(dtype)[:, :, None, None], shift.to(dtype)
    if isinstance(conv, ParallelAdapterConv2d):
        adapter = conv.adapters[task].weight.detach()
        eye = torch.eye(conv.out_channels, dtype=adapter.dtype, device=adapter.device)
        return torch.cat([eye[:, :, None, None], adapter], dim=1), None
    raise TypeError(f"no shared stem for a {type(conv).__name__}")


class CentredResponse(nn.Module):
    """The shared stem response of parallel adapters: the bank conv's response and its input at the centre
    of each of its windows (as ``ParallelAdapterConv2d.centre`` samples it), stacked along channels."""

    def __init__(self, bank: nn.Conv2d, centre_padding: tuple[int, int]) -> None:
        super().__init__()
        self.bank = bank
        self.centre_padding = tuple(centre_padding)

    def centre(self, x: Tensor) -> Tensor:
        (ph, pw), (sh, sw) = self.centre_padding, self.bank.stride
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        return x[..., ::sh, ::sw]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.bank(x), self.centre(x)], dim=1)


def shared_response(conv: nn.Module) -> nn.Module:
    """The task-independent part of a shared stem conv as a plain module (see ``stem_weights``)."""
    bank = conv_like(conv, conv.filter_bank, conv.filter_bank_bias if isinstance(conv, RCConv2d) else None)
    if isinstance(conv, ParallelAdapterConv2d):
        return CentredResponse(bank, conv.centre_padding)
    return bank


def fold(conv: nn.Module | None, weight: Tensor, bn: nn.BatchNorm2d | None, bias: Tensor | None = None) -> nn.Conv2d:
    """The conv ``weight`` (and ``bias``; with ``conv``'s geometry) followed by ``bn`` in eval mode (None: no
    BatchNorm), as one conv."""
    plain = conv_like(conv, weight, bias)
    return plain if bn is None else fuse_conv_bn_eval(plain.eval(), bn.eval())


def fold_conv(conv: nn.Module, task: str | None, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """``conv`` as ``task`` computes it (``task_weights``) followed by ``bn``, as one conv."""
    weight, bias = task_weights(conv, task)
    return fold(conv, weight, bn, bias)


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
    """One task's folded ResNet: ``stem`` (a conv with bias: the whole stem conv, or the task's folded 1x1
    conv on a shared stem response), max pooling, and the blocks of each stage; with the stage geometry of
    the network ``like`` it was folded from."""

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


class FoldedVGG(VGGBackbone):
    """One task's folded VGG-16 DeepLab-LargeFOV: ``convs`` by name (``VGG_CONVS``; with a shared stem,
    ``conv1_1`` is the task's 1x1 conv on the bank response), or the stacked convs of several tasks, and
    no dropout (inference only). Built on the meta device: every conv is replaced, none is initialized."""

    def __init__(self, convs: Mapping[str, nn.Conv2d], like: nn.Module) -> None:
        with torch.device("meta"):
            super().__init__(like.output_stride)
        for name in VGG_CONVS:
            setattr(self, name, convs[name])
        self.dropout = nn.Identity()


class DeployBackbone(PerTaskBackbone):
    """Folded per-task paths, with an optional shared stem response (``stem_bank``): then each path's
    stem conv is the task's folded 1x1 conv on it, and the bank conv runs once per distinct input."""

    def __init__(self, paths: Mapping[str, nn.Module], stem_bank: nn.Module | None, like: nn.Module) -> None:
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
        return self.paths[task].forward_stage(response, "stem")

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        if stage == "stem" and self.shares_stem:
            return self.finish_stem(self.stem_response(x), task)
        return self.paths[task].forward_stage(x, stage)


def conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(convK, bnK)`` of a torchvision, RC or RA residual block, in forward order (the RC and RA blocks
    keep torchvision's names)."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if getattr(block, "conv3", None) is not None:
        pairs.append((block.conv3, block.bn3))
    return pairs


def _fold_stages(net: nn.Module, task: str | None) -> dict[str, list[FoldedBlock]]:
    """Every residual stage of ``net`` with each block's convs folded: of a plain ResNet (``task`` None), or
    task ``task``'s path through a shared one (its BatchNorm and downsample copies, ``TaskModules``)."""

    def own(module: nn.Module) -> nn.Module:
        return module if task is None else module.per_task[task]

    stages = {}
    for stage in STAGES[1:]:
        blocks = []
        for block in getattr(net, stage):
            convs = [fold_conv(conv, task, own(bn)) for conv, bn in conv_bn_pairs(block)]
            down = None
            if block.downsample is not None:
                conv, bn = own(block.downsample)
                down = fold_conv(conv, None, bn)
            blocks.append(FoldedBlock(*convs, downsample=down))
        stages[stage] = blocks
    return stages


def fold_vgg(net: VGGBackbone | RCVGG, task: str | None, shared_stem: bool = False) -> FoldedVGG:
    """A plain VGG (``task`` None) or task ``task``'s path through an RC VGG, folded; with ``shared_stem``
    its ``conv1_1`` is the task's modulator on the shared bank response."""
    convs = {name: fold_conv(getattr(net, name), task, None) for name in VGG_CONVS}
    if shared_stem:
        weight, bias = stem_weights(net.conv1_1, task)
        convs["conv1_1"] = fold(None, weight, None, bias)
    return FoldedVGG(convs, net)


def fold_plain(net: ResNetBackbone | VGGBackbone) -> FoldedPath | FoldedVGG:
    """A plain network (every ResNet conv followed by its BatchNorm; VGG's convs with biases) as one
    folded path."""
    if isinstance(net, VGGBackbone):
        return fold_vgg(net, None)
    stem = fold_conv(net.conv1, None, net.bn1)
    return FoldedPath(stem, copy.deepcopy(net.maxpool), _fold_stages(net, None), net)


def fold_resnet(net: RCResNet | RAResNet, task: str, shared_stem: bool) -> FoldedPath:
    """Task ``task``'s path through an RC or residual-adapter ResNet, folded; with ``shared_stem`` its stem
    is the task's folded 1x1 conv on the shared stem response."""
    bn = net.bn1.per_task[task]
    if shared_stem:
        weight, bias = stem_weights(net.conv1, task)
        stem = fold(None, weight, bn, bias)
    else:
        stem = fold_conv(net.conv1, task, bn)
    return FoldedPath(stem, copy.deepcopy(net.maxpool), _fold_stages(net, task), net)


def deploy_backbone(backbone: nn.Module, tasks: list[str], shared_stem: bool | None = None) -> nn.Module:
    """The folded form of a MultiTaskNet backbone for ``tasks``. ``shared_stem`` (RC and residual adapters;
    default: when two or more tasks run) computes the stem's shared response once for all tasks."""
    if isinstance(backbone, SharedBackbone):
        return SharedBackbone(fold_plain(backbone.net))
    # tasks that run on another task's path (hard parameter sharing) get that path, folded once
    owner = {t: backbone.path_of(t) for t in tasks} if isinstance(backbone, PerTaskBackbone) else {}
    if isinstance(backbone, TaskBackbones):
        folded = {o: fold_plain(backbone.paths[o]) for o in dict.fromkeys(owner.values())}
        return _routed(DeployBackbone({t: folded[owner[t]] for t in tasks}, None, backbone), owner)
    if isinstance(backbone, (RCResNet, RAResNet)):
        stem, fold_path = backbone.conv1, fold_resnet
    elif isinstance(backbone, RCVGG):
        stem, fold_path = backbone.conv1_1, fold_vgg
    else:
        raise TypeError(f"no deploy form for a backbone of type {type(backbone).__name__}")
    share = len(tasks) > 1 if shared_stem is None else shared_stem
    folded = {o: fold_path(backbone, o, share) for o in dict.fromkeys(owner.values())}
    deployed = DeployBackbone({t: folded[owner[t]] for t in tasks}, shared_response(stem) if share else None, backbone)
    return _routed(deployed, owner)


def _routed(deployed: DeployBackbone, owner: Mapping[str, str]) -> DeployBackbone:
    """The deploy form computes a task sharing the path of another task it runs once with it (each holds
    the path, so a task run without its path's owner needs no route)."""
    deployed.routes.update({t: o for t, o in owner.items() if o != t and o in owner})
    return deployed


def fold_sequences(module: nn.Module) -> None:
    """In place: every Conv2d directly followed by a BatchNorm2d inside an nn.Sequential becomes one
    conv (the BatchNorm an Identity), and every NDDR layer/shortcut's conv absorbs its BatchNorm (an NDDR
    layer without one, ``bn=False``, stays as it is)."""
    for child in list(module.modules()):
        if isinstance(child, (NDDRLayer, NDDRShortcut)):
            if isinstance(child.bn, nn.BatchNorm2d):
                child.conv = fuse_conv_bn_eval(child.conv.eval(), child.bn.eval())
                child.bn = nn.Identity()
        elif isinstance(child, nn.Sequential):
            items = list(child.named_children())
            for (name, conv), (bn_name, bn) in zip(items, items[1:], strict=False):  # neighbours
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(child, name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                    setattr(child, bn_name, nn.Identity())

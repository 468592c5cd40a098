"""Reparameterized convolutions (RCM): a frozen filter bank shared by all tasks, followed by a trainable
1x1 modulator per task, ``y_t = M_t (W_s * x)``; per-task BatchNorm and downsample copies; response
initialization (RI) and normalized feature fusion (NFF). ``RCBackbone`` is the base of the RC backbones
(``RCResNet`` here, ``rcm_nddr.nn.rc_vgg.RCVGG``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torchvision.models.resnet import BasicBlock, Bottleneck

from rcm_nddr.nn.backbone import PerTaskBackbone, ResNetBackbone


class RCConv2d(nn.Module):
    """A conv reparameterized as a frozen ``filter_bank`` (a buffer: never a parameter, never in an
    optimizer) and one 1x1 ``modulators[task]`` per task.

    A conv with a bias (VGG) keeps it in the bank, as the frozen buffer ``filter_bank_bias``: the
    modulator reads the bank's whole response, ``y_t = M_t (W_s * x + b_s)`` (see ``from_conv``).

    ``modulator_init`` (Co x Co) sets every task's modulator (RI: the eigenvectors U, with the bank
    already rotated to U^T W); without it the modulators keep PyTorch's default conv initialization,
    the plain RC variant. With ``nff`` each modulator is weight-normalized over its output rows
    (``g_o v_o / ||v_o||``), starting from the same value.
    """

    def __init__(
        self,
        filter_bank: Tensor,
        tasks: Sequence[str],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        modulator_init: Tensor | None = None,
        nff: bool = False,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("filter_bank", filter_bank.detach().clone().float())
        # a None buffer is not in the state dict: a bias-free bank (ResNet) saves as it always did
        self.register_buffer("filter_bank_bias", None if bias is None else bias.detach().clone().float())
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.out_channels = filter_bank.shape[0]
        self.modulator_init = None if modulator_init is None else modulator_init.detach().float().clone()
        self.nff = nff
        self.modulators = nn.ModuleDict()
        #: tasks that use another task's modulator (``backbone.shared_modulators``), ``{task: owner}``
        self.shared: dict[str, str] = {}
        for task in tasks:
            self.add_task(task)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        tasks: Sequence[str],
        eigenvectors: Tensor | None = None,
        nff: bool = False,
    ) -> RCConv2d:
        """Reparameterize a pretrained conv. With ``eigenvectors`` U (RI) the bank is ``U^T W`` and each
        modulator ``U``, so ``modulator @ bank == W``: the task starts exactly at the pretrained conv.

        A bias ``b`` is part of the bank, rotated like the weight: ``U (U^T W * x + U^T b) = W * x + b``, so
        RI starts exactly at the pretrained conv with a bias too, and the whole pretrained conv, weight and
        bias, is the shared frozen bank: a task owns its modulator only. (A per-task trainable bias after
        the modulator, ``M_t (W_s * x) + b_t``, would start there as well but make the bias task-owned.)"""
        if conv.groups != 1:
            raise ValueError("RC reparameterizes ungrouped convolutions")
        weight = conv.weight.detach()
        bias = None if conv.bias is None else conv.bias.detach()
        init = None
        if eigenvectors is not None:
            u = eigenvectors.detach().to(torch.float64)
            weight = (u.T @ weight.to(torch.float64).flatten(1)).view_as(weight)
            bias = None if bias is None else u.T @ bias.to(torch.float64)
            init = u
        return cls(weight, tasks, conv.stride, conv.padding, conv.dilation, init, nff, bias)

    def add_task(self, task: str, nff: bool | None = None) -> None:
        """A new modulator for ``task``: RI/RC initialization, weight-normalized when ``nff`` (default:
        the layer's ``nff``; tasks sharing one bank may differ)."""
        if task in self.modulators:
            raise ValueError(f"task {task!r} already has a modulator")
        nff = self.nff if nff is None else nff
        modulator = nn.Conv2d(self.out_channels, self.out_channels, 1, bias=False)
        modulator.to(self.filter_bank.device)
        if self.modulator_init is not None:
            with torch.no_grad():
                modulator.weight.copy_(self.modulator_init.view_as(modulator.weight))
        if nff:
            modulator = weight_norm(modulator, name="weight", dim=0)
        self.modulators[task] = modulator

    def share_modulator(self, task: str, owner: str) -> None:
        """Let ``task`` use the modulator of ``owner`` instead of one of its own."""
        if owner not in self.modulators:
            raise ValueError(f"task {task!r} cannot share the modulator of {owner!r}, which has none")
        self.shared[task] = owner

    def modulator(self, task: str) -> nn.Module:
        """The modulator ``task`` computes with: its own, or the one it shares."""
        return self.modulators[self.shared.get(task, task)]

    def response(self, x: Tensor) -> Tensor:
        """``W_s * x (+ b_s)``: the bank's response, the same for every task reading the same input."""
        return F.conv2d(x, self.filter_bank, self.filter_bank_bias, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.modulator(task)(self.response(x))


class TaskModules(nn.Module):
    """Per-task copies of a module (BatchNorm, downsample), each starting from the pretrained one."""

    def __init__(self, module: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        self.template = [copy.deepcopy(module)]  # a list: not registered, not in state_dict
        self.per_task = nn.ModuleDict({t: copy.deepcopy(module) for t in tasks})

    def add_task(self, task: str) -> None:
        if task in self.per_task:
            raise ValueError(f"task {task!r} already has its copy")
        existing = next(iter(self.per_task.values()), None)
        device = None if existing is None else next(existing.parameters()).device
        self.per_task[task] = copy.deepcopy(self.template[0]).to(device)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.per_task[task](x)


def _eigenvectors(eigenvectors: Mapping[str, Tensor] | None, conv: str) -> Tensor | None:
    return None if eigenvectors is None else eigenvectors[conv]


#: builds a block's multi-task conv from its name in the block (``conv1`` ...) and the pretrained conv
ConvFactory = Callable[[str, nn.Conv2d], nn.Module]


class RCBlock(nn.Module):
    """Base of the multi-task residual blocks: torchvision's blocks with every conv a multi-task conv
    (``forward(x, task)``: an ``RCConv2d``, or a residual adapter conv) made by ``make_conv``, and per-task
    BatchNorm and downsample (``TaskModules``). Build an RC one from a torchvision block with ``rc_block``.

    The downsample runs first (torchvision runs it last): backward sums the gradients reaching x in the
    order its branches were built, and trained weights must stay what they always were."""

    expansion: int

    def forward(self, x: Tensor, task: str) -> Tensor:
        raise NotImplementedError


class TaskBasicBlock(RCBlock):
    """torchvision's ``BasicBlock`` (ResNet-18/34) for one task of many: two 3x3 multi-task convs."""

    expansion = 1

    def __init__(self, block: BasicBlock, tasks: Sequence[str], make_conv: ConvFactory) -> None:
        super().__init__()
        self.conv1 = make_conv("conv1", block.conv1)
        self.bn1 = TaskModules(block.bn1, tasks)
        self.conv2 = make_conv("conv2", block.conv2)
        self.bn2 = TaskModules(block.bn2, tasks)
        self.downsample = None if block.downsample is None else TaskModules(block.downsample, tasks)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, task: str) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x, task)

        out = self.conv1(x, task)
        out = self.bn1(out, task)
        out = self.relu(out)

        out = self.conv2(out, task)
        out = self.bn2(out, task)

        out += identity
        out = self.relu(out)
        return out


class TaskBottleneck(RCBlock):
    """torchvision's ``Bottleneck`` (ResNet-50 and deeper) for one task of many: 1x1, 3x3 and 1x1
    multi-task convs."""

    expansion = 4

    def __init__(self, block: Bottleneck, tasks: Sequence[str], make_conv: ConvFactory) -> None:
        super().__init__()
        self.conv1 = make_conv("conv1", block.conv1)
        self.bn1 = TaskModules(block.bn1, tasks)
        self.conv2 = make_conv("conv2", block.conv2)
        self.bn2 = TaskModules(block.bn2, tasks)
        self.conv3 = make_conv("conv3", block.conv3)
        self.bn3 = TaskModules(block.bn3, tasks)
        self.downsample = None if block.downsample is None else TaskModules(block.downsample, tasks)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, task: str) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x, task)

        out = self.conv1(x, task)
        out = self.bn1(out, task)
        out = self.relu(out)

        out = self.conv2(out, task)
        out = self.bn2(out, task)
        out = self.relu(out)

        out = self.conv3(out, task)
        out = self.bn3(out, task)

        out += identity
        out = self.relu(out)
        return out


def _rc_convs(tasks: Sequence[str], eigenvectors: Mapping[str, Tensor] | None, nff: bool) -> ConvFactory:
    return lambda name, conv: RCConv2d.from_conv(conv, tasks, _eigenvectors(eigenvectors, name), nff)


class RCBasicBlock(TaskBasicBlock):
    """The RC ``BasicBlock``: its two 3x3 convs are ``RCConv2d`` (RI eigenvectors by conv name)."""

    def __init__(
        self,
        block: BasicBlock,
        tasks: Sequence[str],
        eigenvectors: Mapping[str, Tensor] | None = None,
        nff: bool = False,
    ) -> None:
        super().__init__(block, tasks, _rc_convs(tasks, eigenvectors, nff))


class RCBottleneck(TaskBottleneck):
    """The RC ``Bottleneck``: its three convs are ``RCConv2d`` (RI eigenvectors by conv name)."""

    def __init__(
        self,
        block: Bottleneck,
        tasks: Sequence[str],
        eigenvectors: Mapping[str, Tensor] | None = None,
        nff: bool = False,
    ) -> None:
        super().__init__(block, tasks, _rc_convs(tasks, eigenvectors, nff))


def rc_block(
    block: BasicBlock | Bottleneck,
    tasks: Sequence[str],
    eigenvectors: Mapping[str, Tensor] | None = None,
    nff: bool = False,
) -> RCBasicBlock | RCBottleneck:
    """The RC form of a pretrained torchvision block; ``eigenvectors`` (RI) by conv name (``conv1`` ...)."""
    if isinstance(block, Bottleneck):
        return RCBottleneck(block, tasks, eigenvectors, nff)
    if isinstance(block, BasicBlock):
        return RCBasicBlock(block, tasks, eigenvectors, nff)
    raise TypeError(f"no RC form of a {type(block).__name__}; RC reparameterizes BasicBlock and Bottleneck")


class RCBackbone(PerTaskBackbone):
    """Base of the RC backbones: every ``RCConv2d`` below it shares its frozen bank across ``tasks``; a
    task owns its modulators and its ``TaskModules`` copies (none in a backbone without BatchNorm)."""

    tasks: list[str]

    def add_task(self, task: str, nff: bool | None = None, modulators_of: str | None = None) -> None:
        """Give a new task its own modulators (weight-normalized when ``nff``, default: as at build), or
        those of the task ``modulators_of`` (shared modulators), and its own BatchNorm and downsample
        copies, initialized as at build."""
        for module in self.modules():
            if isinstance(module, RCConv2d):
                if modulators_of is None:
                    module.add_task(task, nff)
                else:
                    module.share_modulator(task, modulators_of)
            elif isinstance(module, TaskModules):
                module.add_task(task)
        self.tasks.append(task)

    def filter_bank(self) -> dict[str, Tensor]:
        """The shared bank as used by the convs, by conv name (``conv1``, ``layer1.0.conv1`` ...); a conv's
        bias (VGG), as used too, under ``<conv>.bias``."""
        bank = {}
        for name, module in self.named_modules():
            if isinstance(module, RCConv2d):
                bank[name] = module.filter_bank
                if module.filter_bank_bias is not None:
                    bank[f"{name}.bias"] = module.filter_bank_bias
        return bank

    @torch.no_grad()
    def load_filter_bank(self, bank: Mapping[str, Tensor]) -> None:
        """Replace the bank (e.g. by a model store's): same names and shapes, copied bit for bit."""
        own = self.filter_bank()
        if set(bank) != set(own):
            missing, unexpected = sorted(set(own) - set(bank)), sorted(set(bank) - set(own))
            raise ValueError(f"filter bank does not fit this backbone: missing {missing}, unexpected {unexpected}")
        for name, tensor in own.items():
            if bank[name].shape != tensor.shape:
                raise ValueError(
                    f"filter bank tensor {name!r} has shape {tuple(bank[name].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(bank[name])


class RCResNet(RCBackbone):
    """A ResNet backbone whose convs share one frozen filter bank across tasks.

    Built from a pretrained plain ``ResNetBackbone`` (its conv weights become the bank; its BatchNorm
    and downsample modules the starting point of every task's copies). ``decomposition`` maps each
    reparameterized conv name (``conv1``, ``layer1.0.conv1`` ...) to its eigenvectors U (RI).

    The tasks reading the same image share the stem's bank response (``shares_stem``); only the
    modulators differ.
    """

    shares_stem = True

    def __init__(
        self,
        plain: ResNetBackbone,
        tasks: Sequence[str],
        decomposition: Mapping[str, Tensor] | None = None,
        nff: bool = False,
    ) -> None:
        super().__init__()
        self.stage_channels = dict(plain.stage_channels)
        self.stage_strides = dict(plain.stage_strides)
        self.output_stride = plain.output_stride
        self.tasks = list(tasks)
        u = decomposition
        self.conv1 = RCConv2d.from_conv(plain.conv1, tasks, _eigenvectors(u, "conv1"), nff)
        self.bn1 = TaskModules(plain.bn1, tasks)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = copy.deepcopy(plain.maxpool)
        self.layer1 = self._make_layer(plain.layer1, "layer1", tasks, u, nff)
        self.layer2 = self._make_layer(plain.layer2, "layer2", tasks, u, nff)
        self.layer3 = self._make_layer(plain.layer3, "layer3", tasks, u, nff)
        self.layer4 = self._make_layer(plain.layer4, "layer4", tasks, u, nff)

    @staticmethod
    def _make_layer(
        layer: nn.Sequential,
        name: str,
        tasks: Sequence[str],
        decomposition: Mapping[str, Tensor] | None,
        nff: bool,
    ) -> nn.ModuleList:
        """The RC blocks of one stage; each reads its convs' eigenvectors ``<name>.<b>.convK``."""
        blocks = []
        for b, block in enumerate(layer):
            prefix = f"{name}.{b}."
            u = None
            if decomposition is not None:
                u = {k[len(prefix) :]: v for k, v in decomposition.items() if k.startswith(prefix)}
            blocks.append(rc_block(block, tasks, u, nff))
        return nn.ModuleList(blocks)

    def stem_response(self, x: Tensor) -> Tensor:
        """The stem's bank response ``W_s * x``, the same for every task reading ``x``."""
        return self.conv1.response(x)

    def finish_stem(self, response: Tensor, task: str) -> Tensor:
        """Task ``task``'s stem on the bank response: modulator, BatchNorm, ReLU, max pooling."""
        out = self.conv1.modulator(task)(response)
        out = self.bn1(out, task)
        out = self.relu(out)
        return self.maxpool(out)

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        if stage == "stem":
            return self.finish_stem(self.stem_response(x), task)
        for block in getattr(self, stage):
            x = block(x, task)
        return x

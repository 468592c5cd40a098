"""Residual adapters (Rebuffi et al., NeurIPS 2017 / CVPR 2018), the RA baselines of the RCM paper: every
conv that RC reparameterizes keeps its pretrained weight as a frozen filter bank shared by all tasks, and
each task adds a small trainable adapter to it, in series (``y + A_t(BN_t(y))``, ``y = W * x``) or in
parallel (``W * x + A_t(x)``); per-task BatchNorm and downsample copies exactly as in RC."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from rcm_nddr.nn.backbone import PerTaskBackbone, ResNetBackbone
from rcm_nddr.nn.rc import TaskBasicBlock, TaskBottleneck, TaskModules

#: how a new adapter starts: ``zero`` (its conv is zero, so the task starts exactly at the pretrained
#: network) or ``default`` (PyTorch's conv initialization)
ADAPTER_INITS = ("zero", "default")


class SeriesAdapter(nn.Module):
    """A series residual adapter on a conv's output ``y``: ``y + conv(bn(y))``, ``conv`` a bias-free 1x1
    conv Co -> Co and ``bn`` the adapter's own BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, y: Tensor) -> Tensor:
        return y + self.conv(self.bn(y))


class AdapterConv2d(nn.Module):
    """A pretrained conv as a frozen ``filter_bank`` (a buffer: never a parameter, never in an optimizer)
    plus one trainable ``adapters[task]`` per task; subclasses say where the adapter sits.

    ``shared(x)`` is what every task reading ``x`` shares and ``finish(shared, task)`` the rest of the
    task's conv, so a backbone can compute the stem's shared part once per input.
    """

    def __init__(
        self,
        filter_bank: Tensor,
        tasks: Sequence[str],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        adapter_init: str = "zero",
    ) -> None:
        super().__init__()
        if adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter init {adapter_init!r}; expected one of {list(ADAPTER_INITS)}")
        self.register_buffer("filter_bank", filter_bank.detach().clone().float())
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.out_channels, self.in_channels = filter_bank.shape[:2]
        self.adapter_init = adapter_init
        self.adapters = nn.ModuleDict()
        for task in tasks:
            self.add_task(task)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, tasks: Sequence[str], adapter_init: str = "zero") -> AdapterConv2d:
        """Share a pretrained conv: its weight becomes the bank, unchanged."""
        if conv.bias is not None or conv.groups != 1:
            raise ValueError("residual adapters share bias-free, ungrouped convolutions")
        return cls(conv.weight, tasks, conv.stride, conv.padding, conv.dilation, adapter_init)

    def new_adapter(self) -> nn.Module:
        raise NotImplementedError

    def add_task(self, task: str) -> None:
        """A new adapter for ``task``, initialized as ``adapter_init`` says."""
        if task in self.adapters:
            raise ValueError(f"task {task!r} already has an adapter")
        adapter = self.new_adapter().to(self.filter_bank.device)
        if self.adapter_init == "zero":
            with torch.no_grad():
                for module in adapter.modules():
                    if isinstance(module, nn.Conv2d):
                        module.weight.zero_()
        self.adapters[task] = adapter

    def response(self, x: Tensor) -> Tensor:
        """``W * x``: the bank's response, the same for every task reading the same input."""
        return F.conv2d(x, self.filter_bank, None, self.stride, self.padding, self.dilation)

    def shared(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def finish(self, shared: Tensor, task: str) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.finish(self.shared(x), task)


class SeriesAdapterConv2d(AdapterConv2d):
    """``y = W * x; y + A_t(BN_t(y))``: a ``SeriesAdapter`` per task after the shared conv."""

    def new_adapter(self) -> nn.Module:
        return SeriesAdapter(self.out_channels)

    def shared(self, x: Tensor) -> Tensor:
        return self.response(x)

    def finish(self, shared: Tensor, task: str) -> Tensor:
        return self.adapters[task](shared)


class ParallelAdapterConv2d(AdapterConv2d):
    """``W * x + A_t(x)``: a bias-free 1x1 conv Ci -> Co per task beside the shared conv, reading ``x`` at
    the centres of the shared conv's windows (its stride, and the padding that keeps a 1x1 tap on the
    window centre), so both have the same output size whatever the kernel size, padding and dilation.

    Shared per input: the bank's response and the sampled input, stacked along channels (``shared``)."""

    def __init__(
        self,
        filter_bank: Tensor,
        tasks: Sequence[str],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        adapter_init: str = "zero",
    ) -> None:
        # A k x k window's centre is d (k - 1) / 2 past its first tap: a 1x1 conv sees it with that less
        # padding, which must be a whole non-negative number of pixels.
        reach = [d * (k - 1) for d, k in zip(dilation, filter_bank.shape[-2:], strict=True)]
        centre_padding = tuple(p - r // 2 for p, r in zip(padding, reach, strict=True))
        if any(r % 2 for r in reach) or min(centre_padding) < 0:
            raise ValueError(
                f"a parallel adapter needs a conv whose windows have a centre inside the padded input, got "
                f"kernel {tuple(filter_bank.shape[-2:])}, padding {tuple(padding)}, dilation {tuple(dilation)}"
            )
        super().__init__(filter_bank, tasks, stride, padding, dilation, adapter_init)
        self.centre_padding = centre_padding

    def new_adapter(self) -> nn.Module:
        return nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1, bias=False)

    def centre(self, x: Tensor) -> Tensor:
        """``x`` at the centre of every window of the shared conv (``x`` itself for a stride-1 'same' conv)."""
        (ph, pw), (sh, sw) = self.centre_padding, self.stride
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        return x if (sh, sw) == (1, 1) else x[..., ::sh, ::sw]

    def shared(self, x: Tensor) -> Tensor:
        return torch.cat([self.response(x), self.centre(x)], dim=1)

    def finish(self, shared: Tensor, task: str) -> Tensor:
        response, centre = shared.split([self.out_channels, self.in_channels], dim=1)
        return response + self.adapters[task](centre)

    def forward(self, x: Tensor, task: str) -> Tensor:
        # finish(shared(x)) without stacking the two parts into one tensor
        return self.response(x) + self.adapters[task](self.centre(x))


#: the adapter convs by ``mode``
ADAPTER_CONVS: dict[str, type[AdapterConv2d]] = {"series": SeriesAdapterConv2d, "parallel": ParallelAdapterConv2d}


def adapter_conv_type(mode: str) -> type[AdapterConv2d]:
    if mode not in ADAPTER_CONVS:
        raise ValueError(f"unknown residual adapter mode {mode!r}; expected one of {list(ADAPTER_CONVS)}")
    return ADAPTER_CONVS[mode]


class RABasicBlock(TaskBasicBlock):
    """torchvision's ``BasicBlock`` (ResNet-18/34) for one task of many: two 3x3 adapter convs."""

    def __init__(
        self, block: BasicBlock, tasks: Sequence[str], conv_type: type[AdapterConv2d], adapter_init: str = "zero"
    ) -> None:
        super().__init__(block, tasks, lambda name, conv: conv_type.from_conv(conv, tasks, adapter_init))


class RABottleneck(TaskBottleneck):
    """torchvision's ``Bottleneck`` (ResNet-50 and deeper) for one task of many: 1x1, 3x3 and 1x1 adapter
    convs."""

    def __init__(
        self, block: Bottleneck, tasks: Sequence[str], conv_type: type[AdapterConv2d], adapter_init: str = "zero"
    ) -> None:
        super().__init__(block, tasks, lambda name, conv: conv_type.from_conv(conv, tasks, adapter_init))


def ra_block(
    block: BasicBlock | Bottleneck, tasks: Sequence[str], conv_type: type[AdapterConv2d], adapter_init: str = "zero"
) -> RABasicBlock | RABottleneck:
    """The residual-adapter form of a pretrained torchvision block."""
    if isinstance(block, Bottleneck):
        return RABottleneck(block, tasks, conv_type, adapter_init)
    if isinstance(block, BasicBlock):
        return RABasicBlock(block, tasks, conv_type, adapter_init)
    raise TypeError(f"no residual-adapter form of a {type(block).__name__}; expected BasicBlock or Bottleneck")


class RAResNet(PerTaskBackbone):
    """A ResNet backbone whose convs share their pretrained weights (one frozen filter bank) across tasks,
    each task adapting every conv with a residual adapter (``mode``: ``series`` or ``parallel``).

    Built from a pretrained plain ``ResNetBackbone`` like ``RCResNet``: the same convs are shared (the
    stem conv and every block conv; the bank holds the pretrained weights, by the same names) and its
    BatchNorm and downsample modules are the starting point of every task's copies. With the default
    ``adapter_init="zero"`` every task starts exactly at the pretrained network.

    The tasks reading the same image share the stem's bank response (``shares_stem``; with parallel
    adapters, together with the image sampled where the adapter reads it).
    """

    shares_stem = True

    def __init__(
        self, plain: ResNetBackbone, tasks: Sequence[str], mode: str = "series", adapter_init: str = "zero"
    ) -> None:
        super().__init__()
        conv_type = adapter_conv_type(mode)
        self.stage_channels = dict(plain.stage_channels)
        self.stage_strides = dict(plain.stage_strides)
        self.output_stride = plain.output_stride
        self.mode, self.adapter_init = mode, adapter_init
        self.tasks = list(tasks)
        self.conv1 = conv_type.from_conv(plain.conv1, tasks, adapter_init)
        self.bn1 = TaskModules(plain.bn1, tasks)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = copy.deepcopy(plain.maxpool)
        self.layer1 = nn.ModuleList(ra_block(b, tasks, conv_type, adapter_init) for b in plain.layer1)
        self.layer2 = nn.ModuleList(ra_block(b, tasks, conv_type, adapter_init) for b in plain.layer2)
        self.layer3 = nn.ModuleList(ra_block(b, tasks, conv_type, adapter_init) for b in plain.layer3)
        self.layer4 = nn.ModuleList(ra_block(b, tasks, conv_type, adapter_init) for b in plain.layer4)

    def add_task(self, task: str) -> None:
        """Give a new task its own adapters, BatchNorm and downsample copies, initialized as at build."""
        for module in self.modules():
            if isinstance(module, (AdapterConv2d, TaskModules)):
                module.add_task(task)
        self.tasks.append(task)

    def filter_bank(self) -> dict[str, Tensor]:
        """The shared bank, by conv name (``conv1``, ``layer1.0.conv1`` ...): the pretrained weights."""
        return {name: m.filter_bank for name, m in self.named_modules() if isinstance(m, AdapterConv2d)}

    @torch.no_grad()
    def load_filter_bank(self, bank: Mapping[str, Tensor]) -> None:
        """Replace the bank (e.g. by a model store's): same conv names and shapes, copied bit for bit."""
        convs = {name: m for name, m in self.named_modules() if isinstance(m, AdapterConv2d)}
        if set(bank) != set(convs):
            missing, unexpected = sorted(set(convs) - set(bank)), sorted(set(bank) - set(convs))
            raise ValueError(f"filter bank does not fit this backbone: missing {missing}, unexpected {unexpected}")
        for name, conv in convs.items():
            if bank[name].shape != conv.filter_bank.shape:
                raise ValueError(
                    f"filter bank tensor {name!r} has shape {tuple(bank[name].shape)}, "
                    f"expected {tuple(conv.filter_bank.shape)}"
                )
            conv.filter_bank.copy_(bank[name])

    def stem_response(self, x: Tensor) -> Tensor:
        """The stem's shared part (``AdapterConv2d.shared``), the same for every task reading ``x``."""
        return self.conv1.shared(x)

    def finish_stem(self, response: Tensor, task: str) -> Tensor:
        """Task ``task``'s stem on the shared part: adapter, BatchNorm, ReLU, max pooling."""
        out = self.conv1.finish(response, task)
        out = self.bn1(out, task)
        out = self.relu(out)
        return self.maxpool(out)

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        if stage == "stem":
            return self.finish_stem(self.stem_response(x), task)
        for block in getattr(self, stage):
            x = block(x, task)
        return x

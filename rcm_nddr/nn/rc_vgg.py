"""The RC form of VGG-16 DeepLab-LargeFOV (``RCVGG``): every conv, fc6 and fc7 included, a frozen filter
bank with a 1x1 modulator per task; and ``rc_backbone``, the RC form of any plain backbone."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from rcm_nddr.nn.backbone import ResNetBackbone
from rcm_nddr.nn.rc import RCBackbone, RCConv2d, RCResNet
from rcm_nddr.nn.vgg import VGGBackbone


class RCVGG(RCBackbone):
    """VGG-16 DeepLab-LargeFOV whose 15 convs (conv1_1 ... conv5_3, fc6, fc7) share one frozen filter bank
    across tasks, ``y_t = M_t (W_s * x + b_s)``: each conv's bias belongs to the bank (see
    ``RCConv2d.from_conv``), so RI (bank ``U^T W``, ``U^T b``, modulator ``U``) starts exactly at the
    pretrained network.

    Built from a pretrained plain ``VGGBackbone``; ``decomposition`` maps each conv name (``conv1_1`` ...
    ``fc7``) to its eigenvectors U (RI). VGG has no BatchNorm and no downsample: a task owns its 15
    modulators (``<conv>.modulators.<task>``) and nothing else; pools, ReLUs and dropout hold no state.
    The tasks reading the same image share conv1_1's bank response (``shares_stem``).
    """

    shares_stem = True

    def __init__(
        self,
        plain: VGGBackbone,
        tasks: Sequence[str],
        decomposition: Mapping[str, Tensor] | None = None,
        nff: bool = False,
    ) -> None:
        super().__init__()
        self.stage_channels = dict(plain.stage_channels)
        self.stage_strides = dict(plain.stage_strides)
        self.output_stride = plain.output_stride
        self.tasks = list(tasks)

        def rc(name: str) -> RCConv2d:
            u = None if decomposition is None else decomposition[name]
            return RCConv2d.from_conv(getattr(plain, name), tasks, u, nff)

        self.conv1_1 = rc("conv1_1")
        self.conv1_2 = rc("conv1_2")
        self.pool1 = copy.deepcopy(plain.pool1)

        self.conv2_1 = rc("conv2_1")
        self.conv2_2 = rc("conv2_2")
        self.pool2 = copy.deepcopy(plain.pool2)

        self.conv3_1 = rc("conv3_1")
        self.conv3_2 = rc("conv3_2")
        self.conv3_3 = rc("conv3_3")
        self.pool3 = copy.deepcopy(plain.pool3)

        self.conv4_1 = rc("conv4_1")
        self.conv4_2 = rc("conv4_2")
        self.conv4_3 = rc("conv4_3")
        self.pool4 = copy.deepcopy(plain.pool4)

        self.conv5_1 = rc("conv5_1")
        self.conv5_2 = rc("conv5_2")
        self.conv5_3 = rc("conv5_3")
        self.pool5 = copy.deepcopy(plain.pool5)
        self.fc6 = rc("fc6")
        self.fc7 = rc("fc7")

        self.relu = nn.ReLU(inplace=True)
        self.dropout = copy.deepcopy(plain.dropout)

    def stem_response(self, x: Tensor) -> Tensor:
        """conv1_1's bank response ``W_s * x + b_s``, the same for every task reading ``x``."""
        return self.conv1_1.response(x)

    def finish_stem(self, response: Tensor, task: str) -> Tensor:
        """Task ``task``'s stem on conv1_1's bank response: modulator, ReLU, conv1_2, ReLU, pool1."""
        x = self.relu(self.conv1_1.modulator(task)(response))
        x = self.relu(self.conv1_2(x, task))
        return self.pool1(x)

    def layer1(self, x: Tensor, task: str) -> Tensor:
        x = self.relu(self.conv2_1(x, task))
        x = self.relu(self.conv2_2(x, task))
        return self.pool2(x)

    def layer2(self, x: Tensor, task: str) -> Tensor:
        x = self.relu(self.conv3_1(x, task))
        x = self.relu(self.conv3_2(x, task))
        x = self.relu(self.conv3_3(x, task))
        return self.pool3(x)

    def layer3(self, x: Tensor, task: str) -> Tensor:
        x = self.relu(self.conv4_1(x, task))
        x = self.relu(self.conv4_2(x, task))
        x = self.relu(self.conv4_3(x, task))
        return self.pool4(x)

    def layer4(self, x: Tensor, task: str) -> Tensor:
        x = self.relu(self.conv5_1(x, task))
        x = self.relu(self.conv5_2(x, task))
        x = self.relu(self.conv5_3(x, task))
        x = self.pool5(x)
        x = self.dropout(self.relu(self.fc6(x, task)))
        x = self.dropout(self.relu(self.fc7(x, task)))
        return x

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        if stage == "stem":
            return self.finish_stem(self.stem_response(x), task)
        if stage not in self.stage_channels:
            raise KeyError(f"unknown stage {stage!r}; stages: {tuple(self.stage_channels)}")
        return getattr(self, stage)(x, task)


#: plain backbone type -> its RC form, each built as ``form(plain, tasks, decomposition, nff)``
RC_FORMS: dict[type[nn.Module], Callable[..., RCBackbone]] = {ResNetBackbone: RCResNet, VGGBackbone: RCVGG}


def rc_backbone(
    plain: nn.Module,
    tasks: Sequence[str],
    decomposition: Mapping[str, Tensor] | None = None,
    nff: bool = False,
) -> RCBackbone:
    """The RC form of a pretrained plain backbone (``RCResNet`` or ``RCVGG``); ``decomposition`` (RI) maps
    each reparameterized conv's name (``rcm_nddr.nn.filter_bank.reparameterized_convs``) to its U."""
    form = RC_FORMS.get(type(plain))
    if form is None:
        known = ", ".join(t.__name__ for t in RC_FORMS)
        raise TypeError(f"no RC form of a {type(plain).__name__}; RC reparameterizes {known}")
    return form(plain, tasks, decomposition, nff)

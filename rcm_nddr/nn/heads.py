"""Decoder heads. DeepLabv3+: ASPP on the last stage, fused with a 48-channel reduction of the
stride-4 features, two 3x3 conv-BN-ReLU, a 1x1 prediction, upsampled to the input size. DeepLabv3: the
same without the decoder (ASPP, one 3x3 conv-BN-ReLU, the 1x1 prediction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP

#: how a head's weights start: ``default`` (PyTorch's initialization) or ``normal`` (every conv weight
#: N(0, 0.01) and conv bias 0, BatchNorm weight 1 and bias 0, as the official RCM code does)
HEAD_INITS = ("default", "normal")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def make_aspp(in_channels: int, channels: int, output_stride: int, dropout: float) -> ASPP:
    """torchvision's ASPP at DeepLabv3's rates, (6, 12, 18) at output stride 16 and doubled at 8, with
    the dropout after its projection set to ``dropout`` (torchvision's: 0.5; 0: no Dropout module).
    The dropout has no tensors, so the state-dict names are torchvision's whatever the rate."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"head dropout must be in [0, 1), got {dropout}")
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    module = ASPP(in_channels, rates, channels)
    if not isinstance(module.project[-1], nn.Dropout):
        raise TypeError(f"torchvision's ASPP projection no longer ends with a Dropout: {module.project}")
    module.project[-1] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    return module


@torch.no_grad()
def init_head(head: nn.Module, init: str) -> None:
    """Initialize ``head``'s weights as ``init`` says (see ``HEAD_INITS``)."""
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r}; expected one of {list(HEAD_INITS)}")
    if init == "default":
        return
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class DeepLabV3PlusHead(nn.Module):
    """Reads the last stage (``high``) and the stride-4 stage (``low``) of one task's features.

    ``dropout``: the rate after the ASPP projection (0 removes it); ``init``: see ``HEAD_INITS``."""

    def __init__(
        self,
        high_channels: int,
        low_channels: int,
        out_channels: int,
        channels: int = 256,
        output_stride: int = 16,
        low_reduced: int = 48,
        dropout: float = 0.5,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.aspp = make_aspp(high_channels, channels, output_stride, dropout)
        self.reduce = conv_bn_relu(low_channels, low_reduced, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_reduced, channels, 3),
            conv_bn_relu(channels, channels, 3),
        )
        self.predict = nn.Conv2d(channels, out_channels, 1)
        init_head(self, init)

    def forward(self, high: Tensor, low: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))
        return F.interpolate(self.predict(x), size=size, mode="bilinear", align_corners=False)


class DeepLabV3Head(nn.Module):
    """DeepLabv3 on the last stage (``high``) only: ASPP, a 3x3 conv-BN-ReLU, a 1x1 prediction, upsampled
    to the input size. ``low`` is accepted for the heads' common signature and not read.

    ``dropout``: the rate after the ASPP projection (0 removes it); ``init``: see ``HEAD_INITS``."""

    def __init__(
        self,
        high_channels: int,
        out_channels: int,
        channels: int = 256,
        output_stride: int = 16,
        dropout: float = 0.5,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.aspp = make_aspp(high_channels, channels, output_stride, dropout)
        self.refine = conv_bn_relu(channels, channels, 3)
        self.predict = nn.Conv2d(channels, out_channels, 1)
        init_head(self, init)

    def forward(self, high: Tensor, low: Tensor | None, size: tuple[int, int]) -> Tensor:
        x = self.refine(self.aspp(high))
        return F.interpolate(self.predict(x), size=size, mode="bilinear", align_corners=False)

"""Decoder heads. DeepLabv3+: ASPP on the last stage, fused with a 48-channel reduction of the
stride-4 features, two 3x3 conv-BN-ReLU, a 1x1 prediction, upsampled to the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeepLabV3PlusHead(nn.Module):
    """Reads the last stage (``high``) and the stride-4 stage (``low``) of one task's features."""

    def __init__(
        self,
        high_channels: int,
        low_channels: int,
        out_channels: int,
        channels: int = 256,
        output_stride: int = 16,
        low_reduced: int = 48,
    ) -> None:
        super().__init__()
        # ASPP rates of DeepLabv3: (6, 12, 18) at output stride 16, doubled at 8.
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(high_channels, rates, channels)
        self.reduce = conv_bn_relu(low_channels, low_reduced, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_reduced, channels, 3),
            conv_bn_relu(channels, channels, 3),
        )
        self.predict = nn.Conv2d(channels, out_channels, 1)

    def forward(self, high: Tensor, low: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))
        return F.interpolate(self.predict(x), size=size, mode="bilinear", align_corners=False)

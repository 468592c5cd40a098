"""TaskTransferNet: a small encoder-decoder that maps one task's prediction to another task's output space
(the cross-task consistency design of xtask: "Cross-Task Consistency Learning Framework for Multi-Task
Learning", Nakano et al. 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

#: channels of the three encoder levels; ``wider`` doubles them
WIDTHS = (64, 128, 256)


def _double_conv(channels_in: int, channels_out: int, batch_norm: bool) -> nn.Sequential:
    """Two 3x3 convs, each followed by ReLU (and BatchNorm before it with ``batch_norm``)."""
    layers: list[nn.Module] = []
    for c_in in (channels_in, channels_out):
        layers.append(nn.Conv2d(c_in, channels_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TaskTransferNet(nn.Module):
    """``in_channels`` (the source task's raw output) -> ``out_channels`` (the target task's raw output).

    Encoder: three levels of two 3x3 conv + ReLU then 2x2 max pooling, 64 / 128 / 256 channels; decoder:
    three levels of 2x bilinear upsampling then two 3x3 conv + ReLU, 128 / 64 / 64 channels; a bias-free
    1x1 conv to the output. ``batch_norm`` adds BatchNorm after every 3x3 conv, ``wider`` doubles every
    width (the xtask options ``batch_norm`` and ``wider_ttnet``). The output has the input's size (an input
    whose sides are not multiples of 8 is resized back bilinearly)."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = False, wider: bool = False) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"TaskTransferNet needs positive channel counts, got {in_channels} -> {out_channels}")
        w1, w2, w3 = (2 * w if wider else w for w in WIDTHS)
        levels = ((in_channels, w1), (w1, w2), (w2, w3))
        self.encoder = nn.ModuleList(_double_conv(a, b, batch_norm) for a, b in levels)
        self.decoder = nn.ModuleList(_double_conv(a, b, batch_norm) for a, b in ((w3, w2), (w2, w1), (w1, w1)))
        self.out = nn.Conv2d(w1, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for level in self.encoder:
            x = F.max_pool2d(level(x), 2)
        for level in self.decoder:
            x = level(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True))
        x = self.out(x)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

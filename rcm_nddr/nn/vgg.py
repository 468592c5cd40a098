"""VGG-16 DeepLab-LargeFOV (Chen et al., ICLR 2015), the backbone of NDDR-CNN (Gao et al., CVPR 2019), cut
into the stages of the ResNet backbones (``stem``, ``layer1`` ... ``layer4``), with output stride 8.

Convs carry DeepLab's names (``conv1_1`` ... ``conv5_3``, ``fc6``, ``fc7``); ``TORCHVISION_FEATURES`` gives
each pretrained conv's index in torchvision's ``vgg16().features``, so ImageNet weights load by
``from_torchvision_names``. Weights are built with ``rcm_nddr.nn.backbone.plain_backbone("vgg16", ...)``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

#: conv name -> its index in torchvision's ``vgg16().features`` (the ReLUs and 2x2 pools sit between)
TORCHVISION_FEATURES: dict[str, int] = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
    "conv5_1": 24,
    "conv5_2": 26,
    "conv5_3": 28,
}
#: the convs DeepLab adds in place of the fully connected classifier: random unless a weights file has them
NEW_LAYERS: tuple[str, ...] = ("fc6", "fc7")


def conv3x3(in_planes: int, out_planes: int, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with a bias, padded to keep the size."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, padding=dilation, dilation=dilation)


class VGGBackbone(nn.Module):
    """VGG-16 DeepLab-LargeFOV without its classifier (``fc8``), exposing ``forward_stage(x, stage)``.

    Every conv has a bias and is followed by a ReLU; there is no BatchNorm. pool1-3 are 3x3 max pools of
    stride 2, pool4 and pool5 3x3 of stride 1, conv5_x dilated by 2 and ``fc6`` (3x3, 512 -> 1024) by 12,
    ``fc7`` a 1x1 conv (1024 -> 1024); both are followed by dropout (0.5) in training. Stages:
    ``stem`` conv1_x + pool1 (stride 2), ``layer1`` conv2_x + pool2 (4), ``layer2`` conv3_x + pool3 (8),
    ``layer3`` conv4_x + pool4 (8), ``layer4`` conv5_x + pool5 + fc6 + fc7 (8).
    """

    def __init__(self, output_stride: int = 8, dropout: float = 0.5) -> None:
        super().__init__()
        if output_stride != 8:
            raise ValueError(f"VGG-16 DeepLab-LargeFOV has output stride 8, got output_stride={output_stride}")
        self.conv1_1 = conv3x3(3, 64)
        self.conv1_2 = conv3x3(64, 64)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.conv2_1 = conv3x3(64, 128)
        self.conv2_2 = conv3x3(128, 128)
        self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.conv3_1 = conv3x3(128, 256)
        self.conv3_2 = conv3x3(256, 256)
        self.conv3_3 = conv3x3(256, 256)
        self.pool3 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.conv4_1 = conv3x3(256, 512)
        self.conv4_2 = conv3x3(512, 512)
        self.conv4_3 = conv3x3(512, 512)
        self.pool4 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)

        self.conv5_1 = conv3x3(512, 512, dilation=2)
        self.conv5_2 = conv3x3(512, 512, dilation=2)
        self.conv5_3 = conv3x3(512, 512, dilation=2)
        self.pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.fc6 = conv3x3(512, 1024, dilation=12)
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=1)

        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

        # torchvision's VGG initialization; pretrained weights overwrite all but the new layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

        self.output_stride = output_stride
        self.stage_channels = {"stem": 64, "layer1": 128, "layer2": 256, "layer3": 512, "layer4": 1024}
        self.stage_strides = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}

    def stem(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1_1(x))
        x = self.relu(self.conv1_2(x))
        return self.pool1(x)

    def layer1(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv2_1(x))
        x = self.relu(self.conv2_2(x))
        return self.pool2(x)

    def layer2(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv3_1(x))
        x = self.relu(self.conv3_2(x))
        x = self.relu(self.conv3_3(x))
        return self.pool3(x)

    def layer3(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv4_1(x))
        x = self.relu(self.conv4_2(x))
        x = self.relu(self.conv4_3(x))
        return self.pool4(x)

    def layer4(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv5_1(x))
        x = self.relu(self.conv5_2(x))
        x = self.relu(self.conv5_3(x))
        x = self.pool5(x)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return x

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        if stage not in self.stage_channels:
            raise KeyError(f"unknown stage {stage!r}; stages: {tuple(self.stage_channels)}")
        return getattr(self, stage)(x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = {}
        for stage in self.stage_channels:
            x = self.forward_stage(x, stage)
            features[stage] = x
        return features


def from_torchvision_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with torchvision's VGG-16 names (``features.N.weight``/``bias``) under this module's
    (``conv1_1.weight`` ...); torchvision's fully connected ``classifier.*`` is dropped (``fc6``/``fc7``
    are convs of another shape) and any other key is kept as is, for the caller to report."""
    names = {index: name for name, index in TORCHVISION_FEATURES.items()}
    out = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) in names:
            key = f"{names[int(parts[1])]}.{parts[2]}"
        out[key] = value
    return out

"""Layers: ResNet backbone stages, decoder heads (and, later, RC convs and NDDR fusion)."""

from rcm_nddr.nn.backbone import STAGES, ResNetBackbone, resnet_backbone
from rcm_nddr.nn.heads import DeepLabV3PlusHead

__all__ = ["STAGES", "ResNetBackbone", "resnet_backbone", "DeepLabV3PlusHead"]

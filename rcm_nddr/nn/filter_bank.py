"""The filter bank: which convolutions of a plain backbone (ResNet, VGG) are reparameterized, and the
identity (sha256) of a set of conv weights, so a decomposition or a store can be tied to the exact bank it
belongs to."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from torch import Tensor, nn


def reparameterized_convs(backbone: nn.Module) -> list[str]:
    """Names of the convs RC reparameterizes in a plain backbone, in forward order (the backbones register
    their convs in that order): every conv but the 1x1 downsample convs, which become per-task trainable
    copies. A ResNet's are the stem conv (``conv1``) and every conv of every residual block
    (``layerL.B.convK``); VGG's all of them (``conv1_1`` ... ``conv5_3``, ``fc6``, ``fc7``)."""
    return [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Conv2d) and ".downsample." not in f".{name}."
    ]


def filter_bank_sha256(weights: Mapping[str, Tensor]) -> str:
    """sha256 over the conv weights of a bank, by sorted name: name, dtype, shape and the float32 bytes.

    Two banks hash equal exactly when they hold bit-identical float32 weights under the same names."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to("cpu").float().contiguous()
        digest.update(f"{name}|float32|{tuple(w.shape)}\n".encode())
        digest.update(w.numpy().tobytes())
    return digest.hexdigest()


def bank_weights(backbone: nn.Module) -> dict[str, Tensor]:
    """The weights of the reparameterized convs of a plain backbone, by conv name, in forward order; a
    conv's bias (VGG) follows its weight under ``<conv>.bias``, as in ``RCBackbone.filter_bank()``."""
    modules = dict(backbone.named_modules())
    weights = {}
    for name in reparameterized_convs(backbone):
        weights[name] = modules[name].weight
        if modules[name].bias is not None:
            weights[f"{name}.bias"] = modules[name].bias
    return weights

"""The filter bank: which convolutions of a ResNet are reparameterized, and the identity (sha256) of a
set of conv weights, so a decomposition or a store can be tied to the exact bank it belongs to."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from torch import Tensor, nn


def reparameterized_convs(backbone: nn.Module) -> list[str]:
    """Names of the convs RC reparameterizes, in forward order: the stem conv (``conv1``) and every
    conv of every residual block (``layerL.B.convK``); the 1x1 downsample convs are excluded (they
    become per-task trainable copies)."""
    names = []
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.Conv2d) or ".downsample." in f".{name}.":
            continue
        if name == "conv1" or (name.startswith("layer") and name.rsplit(".", 1)[-1].startswith("conv")):
            names.append(name)
    return names


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
    """The weights of the reparameterized convs of a plain backbone, by name."""
    modules = dict(backbone.named_modules())
    return {name: modules[name].weight for name in reparameterized_convs(backbone)}

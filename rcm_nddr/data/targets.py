"""The target-key registry: for every sample key, how its file is read in the folder layout and how the
joint transforms (scale, crop/pad, flip) treat it. The built-in keys are registered here; a task
plug-in with a target of its own registers its key beside its task type with ``register_target``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode

from rcm_nddr.data.readers import (
    IGNORE_INDEX,
    decode_class_png,
    decode_depth_npy,
    decode_edge_png,
    decode_normals_npy,
    decode_saliency_png,
)
from rcm_nddr.registry import TASKS, Registry

#: file -> the key's sample tensor; raises ``ValueError`` describing what is wrong with a malformed file
Decoder = Callable[[Path], Tensor]


@dataclass(frozen=True)
class KeyRule:
    """How the joint transforms treat one sample key.

    ``interpolation`` is used when rescaling; ``pad_value`` fills padded pixels; ``on_scale(value, s)``
    adjusts values after zooming by ``s``; ``on_flip(value)`` adjusts values after a horizontal flip.
    """

    interpolation: InterpolationMode
    pad_value: float
    on_scale: Callable[[Tensor, float], Tensor] | None = None
    on_flip: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class TargetReader:
    """How one sample key is stored: ``<root>/<folder>/<id><ext>`` for the first extension that exists.

    ``decode`` turns a file into the sample's tensor and raises ``ValueError`` describing what is wrong
    with a malformed file; ``layout`` is the one-line description of the encoding quoted in errors.
    ``class_map`` marks label maps whose values index ``meta.json``'s class list for the key.
    """

    folder: str
    extensions: tuple[str, ...]
    decode: Decoder
    layout: str
    class_map: bool = False


@dataclass(frozen=True)
class TargetKey:
    """A registered sample key: its transform ``rule``, its ``reader`` in the folder layout (None: only
    datasets with a reader of their own provide it) and the ``module`` that registered it."""

    name: str
    rule: KeyRule
    reader: TargetReader | None
    module: str

    @property
    def origin(self) -> str:
        """The registering module, with its file (a plug-in loaded from a path has a generated name)."""
        return module_origin(self.module)


# A target key lives in the module that registers its task type, so the task entry points load both.
TARGET_KEYS: Registry[TargetKey] = Registry("target key", "rcm_nddr.tasks")

#: ``register_target``'s interpolation names. Labels, depths and normals use nearest-neighbour so values
#: are never blended across a boundary (NEAREST_EXACT samples pixel centres, like bilinear with
#: align_corners=False, so they stay aligned with the image).
INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
}


def register_key(key: str, rule: KeyRule, reader: TargetReader | None = None, *, module: str) -> TargetKey:
    """Register sample ``key`` with its transform rule and folder-layout reader (``module``: the
    registering module's ``__name__``, named in errors); a duplicate key is refused."""
    return TARGET_KEYS.register(key)(TargetKey(key, rule, reader, module))


def register_target(
    key: str,
    *,
    pad_value: float,
    interpolation: str = "nearest",
    on_scale: Callable[[Tensor, float], Tensor] | None = None,
    on_flip: Callable[[Tensor], Tensor] | None = None,
    extensions: Sequence[str] = (".npy",),
    folder: str | None = None,
    layout: str = "",
    class_map: bool = False,
) -> Callable[[Decoder], Decoder]:
    """Decorator registering a target key with the function that reads its file.

    The folder dataset reads ``<root>/<folder or key>/<id><ext>`` (first of ``extensions`` that exists)
    with the decorated function. The transforms resize it with ``interpolation`` (``nearest``: values
    are never blended, for labels and geometry; ``bilinear``: smooth quantities), pad it with
    ``pad_value`` (the key's ignore or invalid value), call ``on_scale(value, s)`` after a zoom by ``s``
    (``depth_on_scale`` for depth-like values) and ``on_flip(value)`` after a horizontal flip
    (``normals_on_flip`` for vectors with an x component). ``layout`` describes the file in errors.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"target key {key!r}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    if isinstance(extensions, str) or not extensions or not all(isinstance(e, str) and e for e in extensions):
        raise ValueError(f"target key {key!r}: extensions must be a non-empty list like ['.npy'], got {extensions!r}")

    def decorator(decode: Decoder) -> Decoder:
        rule = KeyRule(INTERPOLATIONS[interpolation], pad_value, on_scale, on_flip)
        doc = (decode.__doc__ or "").strip()
        described = layout or (doc.splitlines()[0] if doc else f"read by {decode.__qualname__}")
        reader = TargetReader(folder or key, tuple(extensions), decode, described, class_map)
        register_key(key, rule, reader, module=decode.__module__)
        return decode

    return decorator


def depth_on_scale(depth: Tensor, scale: float) -> Tensor:
    """Zooming in by s makes the scene look s times closer: depth is divided by s (0 = invalid stays 0)."""
    return depth / scale


def normals_on_flip(normals: Tensor) -> Tensor:
    """A mirrored surface faces the other way along x: the x component is negated; invalid all-zero
    vectors keep +0.0 so they stay exactly zero."""
    out = normals.clone()
    valid = normals.abs().sum(dim=0) > 0
    out[0] = torch.where(valid, -normals[0], normals[0])
    return out


def module_origin(module: str) -> str:
    """A module's name with its file, for errors about plug-ins."""
    file = getattr(sys.modules.get(module), "__file__", None)
    return f"{module} ({file})" if file else module


def task_types_reading(key: str) -> list[str]:
    """The registered task types whose target is sample ``key``, each named with its class and module."""
    return [
        f"{name!r} ({cls.__qualname__} in {module_origin(cls.__module__)})"
        for name in TASKS.names()
        if getattr(cls := TASKS.get(name), "target_key", None) == key
    ]


def registered_reader(key: str) -> TargetReader | None:
    """The folder-layout reader of a registered key; None for an unregistered key or one without a reader."""
    return TARGET_KEYS.get(key).reader if key in TARGET_KEYS else None


# ---------------------------------------------------------------------------------------------------
# The built-in keys. Nearest resampling copies normal vectors unchanged, so they stay unit length (or
# zero) and need no renormalization. The image is ImageNet-normalized on load, so 0 is the mean colour;
# bilinear weights sum to one, so resizing commutes with that normalization. The image and
# human_parts (PASCAL-Part annotations) have readers of their datasets only.

_NEAREST, _BILINEAR = INTERPOLATIONS["nearest"], INTERPOLATIONS["bilinear"]

register_key("image", KeyRule(_BILINEAR, pad_value=0.0), module=__name__)
register_key(
    "semseg",
    KeyRule(_NEAREST, pad_value=IGNORE_INDEX),
    TargetReader(
        "segmentation", (".png",), decode_class_png, "uint8 H x W PNG, 0 = ignore, k + 1 = class k", class_map=True
    ),
    module=__name__,
)
register_key(
    "parts",
    KeyRule(_NEAREST, pad_value=IGNORE_INDEX),
    TargetReader(
        "parts", (".png",), decode_class_png, "uint8 H x W PNG, 0 = ignore, k + 1 = part class k", class_map=True
    ),
    module=__name__,
)
register_key("human_parts", KeyRule(_NEAREST, pad_value=IGNORE_INDEX), module=__name__)
register_key(
    "depth",
    KeyRule(_NEAREST, pad_value=0.0, on_scale=depth_on_scale),
    TargetReader("depth", (".npy",), decode_depth_npy, "float32 H x W metres, 0 = invalid"),
    module=__name__,
)
register_key(
    "normals",
    KeyRule(_NEAREST, pad_value=0.0, on_flip=normals_on_flip),
    TargetReader("normals", (".npy",), decode_normals_npy, "float32 H x W x 3 unit vectors, all-zero = invalid"),
    module=__name__,
)
register_key(
    "edge",
    KeyRule(_NEAREST, pad_value=255.0),
    TargetReader("edge", (".png",), decode_edge_png, "uint8 H x W PNG, 0 = no edge, 255 = edge"),
    module=__name__,
)
register_key(
    "sal",
    KeyRule(_NEAREST, pad_value=255.0),
    TargetReader("sal", (".png",), decode_saliency_png, "uint8 H x W PNG, 0 = background, 255 = salient"),
    module=__name__,
)

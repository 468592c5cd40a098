"""Joint transforms of a sample dict: random scale, crop and flip for training, padding for validation.

Every transform is called as ``transform(sample, generator)`` and draws its random parameters from
``generator`` only. How each sample key is resized, padded and flipped is its rule in the target-key
registry (``rcm_nddr.data.targets``); a new target key is supported by registering it there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from rcm_nddr.data.targets import TARGET_KEYS, KeyRule

Sample = dict[str, Any]

#: keys carried through every transform untouched
PASSTHROUGH_KEYS = frozenset({"meta"})


def rule_for(key: str) -> KeyRule:
    """The transform rule of a sample key; a key no registration covers is an error naming it."""
    if key not in TARGET_KEYS:
        raise ValueError(
            f"no transform rule for sample key {key!r}: it is not a registered target key (known: "
            f"{', '.join(TARGET_KEYS.names())}); register it with rcm_nddr.data.targets.register_target "
            "in the module that defines the task type reading it"
        )
    return TARGET_KEYS.get(key).rule


def _map_tensors(sample: Sample, fn: Callable[[KeyRule, Tensor], Tensor]) -> Sample:
    """Apply ``fn(rule, value)`` to every tensor of the sample, seen as C x H x W."""
    out: Sample = {}
    for key, value in sample.items():
        if key in PASSTHROUGH_KEYS:
            out[key] = value
            continue
        rule = rule_for(key)
        # torchvision's ops want a channel dimension; class maps are H x W
        out[key] = fn(rule, value.unsqueeze(0)).squeeze(0) if value.ndim == 2 else fn(rule, value)
    return out


def check_keys(sample: Sample) -> None:
    """Raise for any sample key without a transform rule."""
    for key in sample:
        if key not in PASSTHROUGH_KEYS:
            rule_for(key)


def spatial_size(sample: Sample) -> tuple[int, int]:
    """The common H x W of the sample's tensors; tensors of different sizes are an error."""
    sizes = {
        key: (int(value.shape[-2]), int(value.shape[-1]))
        for key, value in sample.items()
        if key not in PASSTHROUGH_KEYS
    }
    if not sizes:
        raise ValueError("sample has no tensors to transform")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"sample tensors differ in size: {sizes}")
    return next(iter(sizes.values()))


def _pad_bottom_right(sample: Sample, height: int, width: int) -> Sample:
    check_keys(sample)
    h, w = spatial_size(sample)
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h == 0 and pad_w == 0:
        return dict(sample)
    return _map_tensors(sample, lambda rule, x: F.pad(x, [0, 0, pad_w, pad_h], fill=rule.pad_value))


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _check_size(size: Sequence[int], what: str) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"{what} must be two positive ints (height, width), got {size!r}")
    return int(size[0]), int(size[1])


class JointTransform(Protocol):
    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample: ...


#: the default random-scale factors: 0.5 to 2.0 in steps of 0.25
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


class RandomScale:
    """Zoom by a factor drawn uniformly from ``scales``; depth is divided by the factor."""

    def __init__(self, scales: Sequence[float] = DEFAULT_SCALES) -> None:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {scales!r}")
        self.scales = tuple(float(s) for s in scales)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        scale = self.scales[_randint(len(self.scales), generator)]
        h, w = spatial_size(sample)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]

        def resize(rule: KeyRule, x: Tensor) -> Tensor:
            x = F.resize(x, size, interpolation=rule.interpolation, antialias=True)
            return rule.on_scale(x, scale) if rule.on_scale is not None else x

        return _map_tensors(sample, resize)

    def __repr__(self) -> str:
        return f"RandomScale(scales={self.scales})"


class RandomCrop:
    """Pad bottom/right to at least ``size`` with each key's pad value, then crop ``size`` at random."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = _check_size(size, "crop size")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = self.size
        sample = _pad_bottom_right(sample, height, width)
        h, w = spatial_size(sample)
        top = _randint(h - height + 1, generator)
        left = _randint(w - width + 1, generator)
        return _map_tensors(sample, lambda rule, x: F.crop(x, top, left, height, width))

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; normals' x component is negated."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        # always draw, so the random stream of later transforms does not depend on p
        if float(torch.rand(1, generator=generator)) >= self.p:
            check_keys(sample)
            return dict(sample)
        return horizontal_flip(sample)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def horizontal_flip(sample: Sample) -> Sample:
    """Mirror every tensor of the sample left-right, with each key's value rule."""

    def flip(rule: KeyRule, x: Tensor) -> Tensor:
        x = F.horizontal_flip(x)
        return rule.on_flip(x) if rule.on_flip is not None else x

    return _map_tensors(sample, flip)


class PadTo:
    """Pad bottom/right to ``size`` with each key's pad value (validation); larger sides are kept."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = _check_size(size, "pad size")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return _pad_bottom_right(sample, *self.size)

    def __repr__(self) -> str:
        return f"PadTo(size={self.size})"


class Compose:
    """Apply joint transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def build_transforms(
    train: bool, crop: Sequence[int], scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True
) -> Compose:
    """Training: random scale (skipped when ``scales`` is just 1) -> random crop to ``crop`` -> random
    flip (when ``flip``). Validation: pad to ``crop``."""
    crop = _check_size(crop, "crop size")
    if not train:
        return Compose([PadTo(crop)])
    steps = [] if tuple(scales) == (1.0,) else [RandomScale(scales)]
    steps.append(RandomCrop(crop))
    if flip:
        steps.append(RandomHorizontalFlip())
    return Compose(steps)

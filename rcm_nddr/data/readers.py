"""File decoders of the built-in target keys: a file -> the sample tensor of DESIGN §5, with
``ValueError`` describing what is wrong with a malformed file (the dataset adds the path and layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rcm_nddr.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


class DatasetError(UserError):
    """A missing, unreadable or malformed dataset file; the message names the path and what was expected."""


def read_png(path: Path, modes: tuple[str, ...], convert: str | None = None) -> np.ndarray:
    """An 8- or 16-bit image file as an array; an image mode outside ``modes`` is a ``ValueError``."""
    with Image.open(path) as im:
        if im.mode not in modes:
            raise ValueError(f"image mode {im.mode!r}, expected {' or '.join(map(repr, modes))}")
        return np.array(im.convert(convert) if convert else im)


def read_npy(path: Path, shape: str, ndim: int, channels: int | None = None) -> np.ndarray:
    """A finite float ``.npy`` array of ``ndim`` dimensions (``channels`` last, if given) as float32;
    ``shape`` describes the expected shape in the ``ValueError`` of a file that is not."""
    array = np.load(path, allow_pickle=False)
    if array.ndim != ndim or (channels is not None and array.shape[-1] != channels):
        raise ValueError(f"array of shape {array.shape}, expected {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"array of dtype {array.dtype}, expected float32")
    if not np.isfinite(array).all():
        raise ValueError("array holds NaN or infinite values")
    return array.astype(np.float32, copy=False)


def decode_image(path: Path) -> Tensor:
    """RGB (or grey) 8-bit image -> float32 3 x H x W, ImageNet-normalized."""
    rgb = read_png(path, ("RGB", "L"), convert="RGB")
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def decode_class_png(path: Path) -> Tensor:
    """uint8 label PNG with 0 = ignore and k + 1 = class k -> int64 H x W with 255 = ignore."""
    raw = torch.from_numpy(read_png(path, ("L", "P")).astype(np.int64))
    return torch.where(raw == 0, IGNORE_INDEX, raw - 1)


def decode_depth_npy(path: Path) -> Tensor:
    """float H x W metres, 0 = invalid -> float32 1 x H x W."""
    depth = read_npy(path, "H x W", ndim=2)
    if (depth < 0).any():
        raise ValueError("negative depth values (expected metres >= 0, 0 = invalid)")
    return torch.from_numpy(depth.copy()).unsqueeze(0)


def decode_normals_npy(path: Path) -> Tensor:
    """float H x W x 3 unit vectors, all-zero = invalid -> float32 3 x H x W."""
    normals = read_npy(path, "H x W x 3", ndim=3, channels=3)
    return torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1)))


def decode_edge_png(path: Path) -> Tensor:
    """uint8 PNG with 0 = no edge and 255 = edge -> float32 1 x H x W in {0, 1}."""
    raw = read_png(path, ("L",))
    if ((raw != 0) & (raw != 255)).any():
        raise ValueError(f"values {np.unique(raw)[:8].tolist()}..., expected only 0 and 255")
    return torch.from_numpy(raw == 255).float().unsqueeze(0)


def decode_saliency_png(path: Path) -> Tensor:
    """uint8 PNG, thresholded at 128 -> float32 1 x H x W in {0, 1}."""
    raw = read_png(path, ("L",))
    return torch.from_numpy(raw >= 128).float().unsqueeze(0)

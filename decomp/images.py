"""A plain folder of calibration images (.png/.jpg, searched recursively), each resized to cover the
target size, center-cropped to it and ImageNet-normalized."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD, DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFolder(Dataset):
    """``folder[i]`` is the i-th image (sorted by path) as float32 3 x H x W for ``size`` = (H, W)."""

    def __init__(self, root: str | Path, size: tuple[int, int] = (128, 128)) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a folder")
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"image size must be two positive integers (H, W), got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise DatasetError(f"image folder {self.root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                rgb = np.array(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DatasetError(f"bad image {path}: {exc}; expected an 8-bit RGB or grey .png/.jpg") from exc
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        height, width = self.size
        # scale so the image covers the target size, then crop the center
        scale = max(height / image.shape[1], width / image.shape[2])
        resized = [max(height, math.ceil(image.shape[1] * scale)), max(width, math.ceil(image.shape[2] * scale))]
        image = F.center_crop(F.resize(image, resized, antialias=True), [height, width])
        return (image.float().div_(255.0) - self._mean) / self._std

"""NYUv2 as preprocessed by the MTAN project (Liu et al., "End-to-End Multi-Task Learning with Attention",
CVPR 2019): 13 semantic classes, depth and surface normals at 288 x 384, one ``.npy`` file per sample and
modality.

Layout under the root (the release's ``nyuv2.zip`` unzipped): ``<split>/image/<i>.npy``,
``<split>/label/<i>.npy``, ``<split>/depth/<i>.npy`` and ``<split>/normal/<i>.npy``. The splits are the
folders holding an ``image/`` folder: ``train`` and ``val`` (the standard NYUv2 split of 795 and 654
images; the MTAN code calls its test split ``val``). A sample id is the file stem ``<i>``, a non-negative
integer; the ids of a split are the stems of ``<split>/image/*.npy`` sorted by their integer value (``2``
before ``10``). There are no split files and no ``meta.json``: the name and the class names are built in.
Only the files of the requested targets are read.

- ``image``: float H x W x 3, RGB in [0, 1] -> float32 3 x H x W, ImageNet-normalized. Values a little
  outside [0, 1] (resampling overshoot, up to ``IMAGE_SLACK``) are kept as they are; values further out
  (e.g. an image stored as 0..255) are an error naming the file.
- ``semseg``: ``label/<i>.npy``, float (or integer) H x W with -1 = ignore and 0..12 = the classes of
  ``NYUV2_13_CLASSES`` -> int64 H x W with 255 = ignore. A non-integer value or one outside -1..12 is an
  error.
- ``depth``: ``depth/<i>.npy``, float H x W x 1 (or H x W) metres with 0 = invalid -> float32 1 x H x W,
  values unchanged. A negative value is an error.
- ``normals``: ``normal/<i>.npy``, float H x W x 3 with components in [-1, 1] (up to ``NORMAL_SLACK``
  beyond), the all-zero vector = invalid -> float32 3 x H x W. Every other vector is rescaled to unit
  length (resized normal maps hold slightly shortened vectors); vectors shorter than
  ``NORMAL_MIN_LENGTH`` become the zero vector. The frame is MTAN's: its flip augmentation negates the
  x component, the rule of the ``normals`` target key here.

Every file must be a finite float array (labels may also be integers) of the stated shape, and each
target must have the image's H x W; otherwise the error names the file and the expected layout.

Verified against the MTAN repository (github.com/lorenmt/mtan): ``im2im_pred/create_dataset.py`` (class
``NYUv2``) reads ``<root>/train`` or ``<root>/val``, counts ``image/*.npy`` and loads
``image|label|depth|normal/{index:d}.npy`` for index 0..N-1; it moves the last axis of image, depth and
normal to the front (so all three are stored channels-last, depth as H x W x 1) and loads the label as
it is (H x W); it applies no scaling to the image. ``im2im_pred/utils.py`` ignores label -1 in the
cross-entropy (``ignore_index=-1``) and in the mIoU (``label >= 0``), and masks depth and normal pixels
whose channel sum is 0 (0 = invalid). The README names the sources: the 13-class labels of
ankurhanda/SceneNetv1.0 and nyuv2-meta-data (the 13-class mapping of Couprie et al. 2013) and the
normals of Eigen and Fergus. Not visible in that code, and taken from the format's description: the
[0, 1] image range and the 288 x 384 size (not enforced here).

``NYUV2_13_CLASSES`` follows the 13-class list of nyuv2-meta-data / SceneNet, where 0 is "unknown" and
1..13 are bed, books, ceiling, chair, floor, furniture, objects, picture, sofa, table, tv, wall, window;
MTAN's labels are those values minus one (unknown -> -1). The order was checked against the class lists
of several independent users of that mapping; the MTAN repository itself lists no class names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from rcm_nddr.data.folder import MultiTaskFolder
from rcm_nddr.data.readers import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, DatasetError
from rcm_nddr.data.targets import TargetReader
from rcm_nddr.registry import DATASETS
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)

#: the 13 NYUv2 classes of the MTAN setting, by label value 0..12
NYUV2_13_CLASSES: tuple[str, ...] = (
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "picture",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
)
NUM_CLASSES = len(NYUV2_13_CLASSES)
#: the file's label value of ignored pixels
FILE_IGNORE = -1
#: how far image values may lie outside [0, 1] (resampling overshoot) before the file is refused
IMAGE_SLACK = 0.05
#: how far normal components may lie outside [-1, 1] before the file is refused
NORMAL_SLACK = 0.05
#: non-zero normal vectors shorter than this are invalid (set to the zero vector)
NORMAL_MIN_LENGTH = 1e-6

#: the modality folders under ``<root>/<split>/``
FOLDERS = {"image": "image", "semseg": "label", "depth": "depth", "normals": "normal"}


# ---------------------------------------------------------------------------------------------------
# decoders: file -> tensor in the sample format, ValueError on a malformed file (see readers.py)


def _load_float(
    path: Path, shape: str, ndims: tuple[int, ...], channels: int | None, integers: bool = False
) -> np.ndarray:
    """A finite ``.npy`` array of one of ``ndims`` dimensions (``channels`` last when 3-D) as float32."""
    array = np.load(path, allow_pickle=False)
    if array.ndim not in ndims or (array.ndim == 3 and channels is not None and array.shape[-1] != channels):
        raise ValueError(f"array of shape {array.shape}, expected {shape}")
    if not (np.issubdtype(array.dtype, np.floating) or (integers and np.issubdtype(array.dtype, np.integer))):
        raise ValueError(f"array of dtype {array.dtype}, expected float{' or integer' if integers else ''}")
    if not np.isfinite(array).all():
        raise ValueError("array holds NaN or infinite values")
    return array


def decode_mtan_image(path: Path) -> Tensor:
    """float H x W x 3 RGB in [0, 1] -> float32 3 x H x W, ImageNet-normalized."""
    rgb = _load_float(path, "H x W x 3", (3,), 3).astype(np.float32)
    low, high = (float(rgb.min()), float(rgb.max())) if rgb.size else (0.0, 0.0)
    if low < -IMAGE_SLACK or high > 1.0 + IMAGE_SLACK:
        raise ValueError(f"values from {low:g} to {high:g}, expected RGB in [0, 1]")
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def decode_mtan_label(path: Path) -> Tensor:
    """float (or integer) H x W, -1 = ignore, 0..12 = class -> int64 H x W with 255 = ignore."""
    raw = _load_float(path, "H x W", (2,), None, integers=True)
    if np.issubdtype(raw.dtype, np.floating) and (raw != np.round(raw)).any():
        raise ValueError("label array holds non-integer values")
    labels = raw.astype(np.int64)
    bad = labels[(labels < FILE_IGNORE) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise ValueError(
            f"label values {np.unique(bad)[:8].tolist()} outside -1..{NUM_CLASSES - 1} "
            f"(-1 = ignore, k = class k of the {NUM_CLASSES} NYUv2 classes)"
        )
    tensor = torch.from_numpy(labels)
    return torch.where(tensor == FILE_IGNORE, IGNORE_INDEX, tensor)


def decode_mtan_depth(path: Path) -> Tensor:
    """float H x W x 1 (or H x W) metres, 0 = invalid -> float32 1 x H x W."""
    depth = _load_float(path, "H x W x 1 or H x W", (2, 3), 1).astype(np.float32)
    if depth.ndim == 3:
        depth = depth[..., 0]
    if (depth < 0).any():
        raise ValueError("negative depth values (expected metres >= 0, 0 = invalid)")
    return torch.from_numpy(np.ascontiguousarray(depth)).unsqueeze(0)


def decode_mtan_normals(path: Path) -> Tensor:
    """float H x W x 3 in [-1, 1], all-zero = invalid -> float32 3 x H x W unit vectors (zero = invalid)."""
    normals = _load_float(path, "H x W x 3", (3,), 3).astype(np.float64)
    extreme = float(np.abs(normals).max(initial=0.0))
    if extreme > 1.0 + NORMAL_SLACK:
        raise ValueError(f"components up to {extreme:g} in magnitude, expected vectors with components in [-1, 1]")
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = length >= NORMAL_MIN_LENGTH
    unit = np.where(valid, normals / np.where(valid, length, 1.0), 0.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------------


def _image_reader(split: str) -> TargetReader:
    return TargetReader(f"{split}/{FOLDERS['image']}", (".npy",), decode_mtan_image, "float H x W x 3 RGB in [0, 1]")


def _target_readers(split: str) -> dict[str, TargetReader]:
    return {
        "semseg": TargetReader(
            f"{split}/{FOLDERS['semseg']}",
            (".npy",),
            decode_mtan_label,
            f"float H x W, -1 = ignore, 0..{NUM_CLASSES - 1} = the {NUM_CLASSES} NYUv2 classes",
            class_map=True,
        ),
        "depth": TargetReader(
            f"{split}/{FOLDERS['depth']}", (".npy",), decode_mtan_depth, "float H x W x 1 metres, 0 = invalid"
        ),
        "normals": TargetReader(
            f"{split}/{FOLDERS['normals']}",
            (".npy",),
            decode_mtan_normals,
            "float H x W x 3 normal vectors, components in [-1, 1], all-zero = invalid",
        ),
    }


def _layout() -> str:
    """The expected layout, quoted in the errors about a missing split or id."""
    return (
        "expected <root>/<split>/{image,label,depth,normal}/<i>.npy with integer ids i "
        "(the MTAN NYUv2 release: splits train and val)"
    )


@DATASETS.register("nyuv2_mtan")
class NYUv2MTAN(MultiTaskFolder):
    """Samples of one split of the MTAN-preprocessed NYUv2: semseg (13 classes), depth and normals.

    The readers' folders depend on the split, so each instance builds its own ``IMAGE`` and
    ``TARGETS``; the class-level tables show them with a ``<split>`` placeholder.
    """

    MISSING_ROOT_HINT: ClassVar[str] = (
        "nothing is downloaded at run time; unzip the MTAN project's preprocessed NYUv2 (nyuv2.zip, see "
        "github.com/lorenmt/mtan) there: train/ and val/, each with image/, label/, depth/ and normal/ <i>.npy"
    )

    IMAGE: ClassVar[TargetReader] = _image_reader("<split>")
    TARGETS: ClassVar[Mapping[str, TargetReader]] = _target_readers("<split>")

    def __init__(
        self,
        root: str | Path,
        split: str,
        targets: Sequence[str],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
    ) -> None:
        # per-instance readers, shadowing the class-level tables (see the class docstring)
        self.IMAGE = _image_reader(split)
        self.TARGETS = _target_readers(split)
        super().__init__(root, split, targets, transform)

    def _load_info(self) -> DatasetInfo:
        """No ``meta.json``: the name and the 13 class names are built in."""
        return DatasetInfo(
            name="NYUv2-MTAN",
            classes={"semseg": list(NYUV2_13_CLASSES)},
            extra={"ignore_index": IGNORE_INDEX, "depth_unit": "m"},
        )

    def _load_split(self, split: str) -> list[str]:
        """The stems of ``<split>/image/*.npy``, sorted by their integer value."""
        folder = self.root / split / FOLDERS["image"]
        if not folder.is_dir():
            known = sorted(p.name for p in self.root.iterdir() if (p / FOLDERS["image"]).is_dir())
            found = ", ".join(known) or "(none)"
            raise DatasetError(f"no split {split!r}: missing folder {folder}; {_layout()}; splits found: {found}")
        files = sorted(folder.glob("*.npy"))
        bad = [p.name for p in files if not p.stem.isdecimal()]
        if bad:
            raise DatasetError(
                f"{folder} holds files not named <i>.npy with a non-negative integer i: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; {_layout()}"
            )
        if not files:
            raise DatasetError(f"no images in {folder}; {_layout()}")
        ids = sorted((p.stem for p in files), key=lambda stem: (int(stem), stem))
        return ids


__all__ = [
    "NUM_CLASSES",
    "NYUV2_13_CLASSES",
    "NYUv2MTAN",
    "decode_mtan_depth",
    "decode_mtan_image",
    "decode_mtan_label",
    "decode_mtan_normals",
]

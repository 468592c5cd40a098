"""NYUD-MT (NYUDv2 with 40 semantic classes, depth, surface normals and edges) in its two published layouts.

Both layouts live under one root with one folder per target and one file per sample id; for each
target the reader takes the first extension that exists (in the order below), so one root may mix
the layouts, even per sample. The split files are ``gt_sets/{train,val}.txt`` (one id per line) and
the images ``images/<id>.jpg`` (or ``.png``). NYUD has no ``meta.json``: the dataset name and the 40
class names are built in (``NYUD_CLASSES``).

ASTMT layout (the multi-task NYUD release of Maninis et al.):

- ``segmentation/<id>.png``: uint8 H x W, 0 = ignore, k + 1 = class k (k in 0..39) -> int64 H x W
  with 255 = ignore; a value above 40 is an error.
- ``depth/<id>.npy``: float H x W metres, 0 = invalid -> float32 1 x H x W.
- ``normals/<id>.npy``: float H x W x 3 unit vectors, all-zero = invalid -> float32 3 x H x W.
- ``edge/<id>.npy``: float or integer H x W holding only {0, 1} or only {0, 255} (both are accepted;
  255 is divided by 255) -> float32 1 x H x W in {0, 1}.

Older layout (NDDR-CNN / PAD-Net era):

- ``segmentation/<id>.mat`` and ``depth/<id>.mat``: MATLAB files read with ``scipy.io.loadmat``; the
  array is the file's single variable whose name does not start with ``__`` (a file with several
  candidates is an error naming them). Labels are integers with the same 0 = ignore, k + 1 = class k
  encoding; depth is float metres with 0 = invalid.
- ``normals/<id>.png`` or ``normals/<id>.jpg``: uint8 RGB with n = 2 v / 255 - 1 per channel, then
  renormalized to unit length. A pixel is invalid (zero vector) when its decoded vector is shorter
  than 0.5 (mid-grey, about (128, 128, 128), the encoding of the zero vector) or when its uint8 triple
  is exactly (0, 0, 0) (black, how masked-out pixels are commonly stored). JPEG normals carry the
  compression error of the format.
- ``edge/<id>.png``: uint8 greyscale with only {0, 255} or only {0, 1} -> float32 1 x H x W in {0, 1}.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.io
import torch
from torch import Tensor

from rcm_nddr.data.folder import MultiTaskFolder
from rcm_nddr.data.readers import IGNORE_INDEX, decode_depth_npy, decode_image, decode_normals_npy, read_png
from rcm_nddr.data.targets import TargetReader
from rcm_nddr.registry import DATASETS
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)

NYUD_CLASSES: tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refridgerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)
NUM_CLASSES = len(NYUD_CLASSES)
NORMAL_MIN_LENGTH = 0.5  # decoded uint8 normals shorter than this are invalid


# ---------------------------------------------------------------------------------------------------
# decoders: file -> tensor in the sample format, ValueError on a malformed file (see readers.py)


def read_mat_array(path: Path) -> np.ndarray:
    """The single non-``__`` array variable of a MATLAB file (ValueError naming the candidates otherwise)."""
    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise ValueError(f"unsupported MATLAB file ({exc})") from exc
    arrays = {k: v for k, v in contents.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    if len(arrays) != 1:
        found = ", ".join(repr(k) for k in arrays) or "none"
        raise ValueError(f"expected exactly one array variable (names not starting with '__'), found: {found}")
    return next(iter(arrays.values()))


def _labels_to_tensor(raw: np.ndarray) -> Tensor:
    if raw.ndim != 2:
        raise ValueError(f"label array of shape {raw.shape}, expected H x W")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise ValueError(f"label array of dtype {raw.dtype}, expected integers")
    if np.issubdtype(raw.dtype, np.floating) and (not np.isfinite(raw).all() or (raw != np.round(raw)).any()):
        raise ValueError("label array holds non-integer values")
    labels = raw.astype(np.int64)
    bad = labels[(labels < 0) | (labels > NUM_CLASSES)]
    if bad.size:
        raise ValueError(
            f"label values {np.unique(bad)[:8].tolist()} outside 0..{NUM_CLASSES} "
            f"(0 = ignore, k + 1 = class k of the {NUM_CLASSES} NYUDv2 classes)"
        )
    tensor = torch.from_numpy(labels)
    return torch.where(tensor == 0, IGNORE_INDEX, tensor - 1)


def decode_nyud_semseg(path: Path) -> Tensor:
    """``.png`` (uint8) or ``.mat`` labels, 0 = ignore, k + 1 = class k -> int64 H x W, 255 = ignore."""
    raw = read_mat_array(path) if path.suffix == ".mat" else read_png(path, ("L", "P"))
    return _labels_to_tensor(raw)


def decode_nyud_depth(path: Path) -> Tensor:
    """``.npy`` or ``.mat`` float H x W metres, 0 = invalid -> float32 1 x H x W."""
    if path.suffix != ".mat":
        return decode_depth_npy(path)
    depth = read_mat_array(path)
    if depth.ndim != 2 or not (np.issubdtype(depth.dtype, np.floating) or np.issubdtype(depth.dtype, np.integer)):
        raise ValueError(f"depth array of shape {depth.shape} and dtype {depth.dtype}, expected float H x W")
    depth = depth.astype(np.float32)
    if not np.isfinite(depth).all():
        raise ValueError("depth array holds NaN or infinite values")
    if (depth < 0).any():
        raise ValueError("negative depth values (expected metres >= 0, 0 = invalid)")
    return torch.from_numpy(np.ascontiguousarray(depth)).unsqueeze(0)


def decode_nyud_normals(path: Path) -> Tensor:
    """``.npy`` float unit vectors, or ``.png``/``.jpg`` uint8 RGB with n = 2 v / 255 - 1 (renormalized;
    decoded length < 0.5 or a (0, 0, 0) triple = invalid = zero vector) -> float32 3 x H x W."""
    if path.suffix == ".npy":
        return decode_normals_npy(path)
    raw = read_png(path, ("RGB",))
    normals = raw.astype(np.float32) * (2.0 / 255.0) - 1.0
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    invalid = (length[..., 0] < NORMAL_MIN_LENGTH) | (raw == 0).all(axis=-1)
    normals = np.where(invalid[..., None], 0.0, normals / np.maximum(length, 1e-6)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1)))


def _binary_edges(raw: np.ndarray) -> Tensor:
    if raw.ndim != 2:
        raise ValueError(f"edge array of shape {raw.shape}, expected H x W")
    values = np.unique(raw)
    if np.isin(values, (0, 1)).all():
        edges = raw == 1
    elif np.isin(values, (0, 255)).all():
        edges = raw == 255
    else:
        raise ValueError(f"values {values[:8].tolist()}..., expected only {{0, 1}} or only {{0, 255}}")
    return torch.from_numpy(edges).float().unsqueeze(0)


def decode_nyud_edge(path: Path) -> Tensor:
    """``.npy`` (float or integer) or ``.png`` (uint8) H x W in {0, 1} or {0, 255} -> float32 1 x H x W in {0, 1}."""
    if path.suffix == ".npy":
        raw = np.load(path, allow_pickle=False)
        if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
            raise ValueError(f"edge array of dtype {raw.dtype}, expected float or integer")
        return _binary_edges(raw)
    return _binary_edges(read_png(path, ("L",)))


# ---------------------------------------------------------------------------------------------------


@DATASETS.register("nyud")
class NYUDMT(MultiTaskFolder):
    """Samples of one split of NYUD-MT (ASTMT or older layout, or a mix): semseg, depth, normals, edge."""

    MISSING_ROOT_HINT: ClassVar[str] = "nothing is downloaded at run time; put NYUD-MT there (see docs/datasets.md)"

    IMAGE: ClassVar[TargetReader] = TargetReader(
        "images", (".jpg", ".png"), decode_image, "RGB uint8 H x W x 3 (.jpg or .png)"
    )
    TARGETS: ClassVar[Mapping[str, TargetReader]] = {
        "semseg": TargetReader(
            "segmentation",
            (".png", ".mat"),
            decode_nyud_semseg,
            "uint8 H x W PNG or single-array .mat, 0 = ignore, k + 1 = class k (1..40)",
            class_map=True,
        ),
        "depth": TargetReader(
            "depth", (".npy", ".mat"), decode_nyud_depth, "float H x W metres (.npy or single-array .mat), 0 = invalid"
        ),
        "normals": TargetReader(
            "normals",
            (".npy", ".png", ".jpg"),
            decode_nyud_normals,
            "float H x W x 3 unit vectors (.npy, all-zero = invalid) or uint8 RGB (.png/.jpg, n = 2 v / 255 - 1)",
        ),
        "edge": TargetReader(
            "edge",
            (".npy", ".png"),
            decode_nyud_edge,
            "H x W .npy (float or integer) or uint8 .png, values only {0, 1} or only {0, 255}",
        ),
    }

    def _load_info(self) -> DatasetInfo:
        """NYUD has no ``meta.json``: the name and the 40 NYUDv2 class names are built in."""
        return DatasetInfo(
            name="NYUD-MT",
            classes={"semseg": list(NYUD_CLASSES)},
            # the boundary benchmark's matching tolerance for NYUD, a fraction of the image diagonal
            extra={"depth_unit": "m", "ignore_index": IGNORE_INDEX, "edge_max_dist": 0.011},
        )


__all__ = ["NUM_CLASSES", "NYUD_CLASSES", "NYUDMT", "read_mat_array"]

"""Cityscapes (fine annotations) with semantic segmentation in the 19-class or the 7-category setting and
depth from the stereo disparity maps, read from the official release.

Layout: ``leftImg8bit_trainvaltest.zip``, ``gtFine_trainvaltest.zip``, ``disparity_trainvaltest.zip``
and ``camera_trainvaltest.zip`` unzipped into one root. A sample id is ``<city>/<stem>`` with
``stem = <city>_<seq>_<frame>`` (e.g. ``aachen/aachen_000000_000019``); the ids of a split are the
images ``leftImg8bit/<split>/*/*_leftImg8bit.png``, sorted. The splits are the folders of
``leftImg8bit/`` (``train``, ``val``, ``test``); there are no split files and no ``meta.json``. Only
the files of the requested targets are read. Images are 1024 x 2048; the option ``resize: [h, w]``
resizes every sample to h x w when it is read (default: not resized, see "Resizing" below).

- ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``: RGB uint8 -> float32 3 x H x W,
  ImageNet-normalized.
- ``semseg``: ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``, uint8 H x W label ids 0..33 of the
  official Cityscapes label table (``LABELS``) -> int64 H x W with 255 = ignore. The option
  ``classes`` picks the setting:

  - ``classes=19`` (default): the table's train ids, road = 0 ... bicycle = 18 (``CLASSES_19``). The
    void ids 0..6 and the ids without a train id (9 parking, 10 rail track, 14 guard rail, 15 bridge,
    16 tunnel, 18 polegroup, 29 caravan, 30 trailer) are 255.
  - ``classes=7``: the table's categories without void, flat = 0, construction = 1, object = 2,
    nature = 3, sky = 4, human = 5, vehicle = 6 (``CLASSES_7``); every non-void id belongs to one,
    including those without a train id (e.g. 9 parking is flat). The void ids 0..6 are 255.

  A value above 33 is an error naming the file (the table's id -1, license plate, never occurs in a
  ``labelIds`` PNG).
- ``depth``: ``disparity/<split>/<city>/<stem>_disparity.png``, 16-bit greyscale PNG with value p
  (read as 16 bits, never truncated to 8). p = 0 is invalid; otherwise the disparity is
  d = (p - 1) / 256 pixels, and the depth in metres is z = baseline * fx / d, computed in float64 and
  stored as float32 1 x H x W with 0 = invalid, which also covers d = 0 (p = 1). ``baseline``
  (metres) and ``fx`` (pixels) are ``extrinsic.baseline`` and ``intrinsic.fx`` of
  ``camera/<split>/<city>/<stem>_camera.json`` when that file exists, else the defaults
  ``DEFAULT_BASELINE`` = 0.209313 m and ``DEFAULT_FX`` = 2262.52 px.

``info.extra`` holds ``"ignore_index": 255``, ``"depth_unit": "m"`` and ``"classes"`` (7 or 19).

Resizing (option ``resize: [h, w]``, e.g. ``[128, 256]`` for the 128 x 256 multi-task benchmarks): the
image is resized bilinearly (antialiased, so a large reduction averages the pixels it drops), semseg and
depth by nearest neighbour (each value is a copy of one source pixel's, never a blend of classes or of
depths across a boundary; 255 and 0 stay the ignore and invalid values). Depth values are unchanged:
resizing the whole image keeps the camera's field of view, so a pixel still sees a scene point at the
same distance (unlike the random-scale augmentation, which zooms and so divides depth by its factor).
``meta["size"]`` is the resized size, the size predictions are compared at.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from rcm_nddr.data.folder import MultiTaskFolder
from rcm_nddr.data.readers import IGNORE_INDEX, DatasetError, decode_image, read_png
from rcm_nddr.data.targets import TargetReader
from rcm_nddr.data.transforms import PASSTHROUGH_KEYS, rule_for
from rcm_nddr.registry import DATASETS
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Label:
    """One row of the official Cityscapes label table: ``train_id`` 255 = ignored in the 19-class setting."""

    id: int
    name: str
    train_id: int
    category: str


LABELS: tuple[Label, ...] = (
    Label(0, "unlabeled", 255, "void"),
    Label(1, "ego vehicle", 255, "void"),
    Label(2, "rectification border", 255, "void"),
    Label(3, "out of roi", 255, "void"),
    Label(4, "static", 255, "void"),
    Label(5, "dynamic", 255, "void"),
    Label(6, "ground", 255, "void"),
    Label(7, "road", 0, "flat"),
    Label(8, "sidewalk", 1, "flat"),
    Label(9, "parking", 255, "flat"),
    Label(10, "rail track", 255, "flat"),
    Label(11, "building", 2, "construction"),
    Label(12, "wall", 3, "construction"),
    Label(13, "fence", 4, "construction"),
    Label(14, "guard rail", 255, "construction"),
    Label(15, "bridge", 255, "construction"),
    Label(16, "tunnel", 255, "construction"),
    Label(17, "pole", 5, "object"),
    Label(18, "polegroup", 255, "object"),
    Label(19, "traffic light", 6, "object"),
    Label(20, "traffic sign", 7, "object"),
    Label(21, "vegetation", 8, "nature"),
    Label(22, "terrain", 9, "nature"),
    Label(23, "sky", 10, "sky"),
    Label(24, "person", 11, "human"),
    Label(25, "rider", 12, "human"),
    Label(26, "car", 13, "vehicle"),
    Label(27, "truck", 14, "vehicle"),
    Label(28, "bus", 15, "vehicle"),
    Label(29, "caravan", 255, "vehicle"),
    Label(30, "trailer", 255, "vehicle"),
    Label(31, "train", 16, "vehicle"),
    Label(32, "motorcycle", 17, "vehicle"),
    Label(33, "bicycle", 18, "vehicle"),
)
MAX_LABEL_ID = max(label.id for label in LABELS)

#: the 19 classes by train id
CLASSES_19: tuple[str, ...] = tuple(
    label.name for label in sorted((lb for lb in LABELS if lb.train_id != IGNORE_INDEX), key=lambda lb: lb.train_id)
)
#: the 7 categories (void left out) in the table's order
CLASSES_7: tuple[str, ...] = tuple(dict.fromkeys(label.category for label in LABELS if label.category != "void"))

DEFAULT_BASELINE = 0.209313  # metres
DEFAULT_FX = 2262.52  # pixels


def _lookup(class_of: Callable[[Label], int]) -> np.ndarray:
    """label id -> class index (255 = ignore) for ids 0..MAX_LABEL_ID."""
    table = np.full(MAX_LABEL_ID + 1, IGNORE_INDEX, dtype=np.int64)
    for label in LABELS:
        table[label.id] = class_of(label)
    return table


#: the class names and the label id -> class lookup of each ``classes`` setting
SETTINGS: dict[int, tuple[tuple[str, ...], np.ndarray]] = {
    19: (CLASSES_19, _lookup(lambda label: label.train_id)),
    7: (
        CLASSES_7,
        _lookup(lambda label: CLASSES_7.index(label.category) if label.category != "void" else IGNORE_INDEX),
    ),
}

# ---------------------------------------------------------------------------------------------------
# decoders: file -> tensor in the sample format, ValueError on a malformed file (see readers.py)


def _label_decoder(lookup: np.ndarray) -> Callable[[Path], Tensor]:
    def decode(path: Path) -> Tensor:
        ids = read_png(path, ("L", "P"))
        if ids.max(initial=0) > MAX_LABEL_ID:
            bad = np.unique(ids[ids > MAX_LABEL_ID])
            raise ValueError(f"label ids {bad[:8].tolist()} above {MAX_LABEL_ID} (the Cityscapes label ids are 0..33)")
        return torch.from_numpy(lookup[ids])

    return decode


def camera_path(disparity_path: Path) -> Path:
    """``<root>/disparity/<split>/<city>/<stem>_disparity.png`` ->
    ``<root>/camera/<split>/<city>/<stem>_camera.json``."""
    city_dir = disparity_path.parent
    stem = disparity_path.name.removesuffix("_disparity.png")
    return city_dir.parents[2] / "camera" / city_dir.parent.name / city_dir.name / f"{stem}_camera.json"


def read_camera(path: Path) -> tuple[float, float]:
    """``(baseline, fx)`` from a Cityscapes camera file, the defaults when it does not exist."""
    if not path.is_file():
        log.debug("no camera file %s; using baseline %s m, fx %s px", path, DEFAULT_BASELINE, DEFAULT_FX)
        return DEFAULT_BASELINE, DEFAULT_FX
    expected = 'expected {"extrinsic": {"baseline": metres > 0}, "intrinsic": {"fx": pixels > 0}}'
    try:
        camera = json.loads(path.read_text())
        baseline, fx = camera["extrinsic"]["baseline"], camera["intrinsic"]["fx"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read camera file {path} ({exc!r}); {expected}") from exc
    values = (baseline, fx)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"camera file {path} has baseline {baseline!r} and fx {fx!r}; {expected}")
    return float(baseline), float(fx)


def decode_disparity(path: Path) -> Tensor:
    """16-bit disparity PNG (p = 0 invalid, d = (p - 1) / 256 px) -> depth z = baseline * fx / d metres,
    float32 1 x H x W with 0 = invalid; baseline and fx from the sample's camera file or the defaults."""
    raw = read_png(path, ("I;16", "I;16B", "I"))  # 16-bit greyscale PNGs open as "I;16" ("I" in old Pillow)
    if raw.min(initial=0) < 0 or raw.max(initial=0) > 65535:
        raise ValueError("values outside 0..65535 (expected a 16-bit disparity PNG)")
    baseline, fx = read_camera(camera_path(path))
    valid = raw > 1  # p = 0 is invalid and p = 1 is disparity 0
    disparity = (raw[valid].astype(np.float64) - 1.0) / 256.0
    depth = np.zeros(raw.shape, dtype=np.float64)
    depth[valid] = baseline * fx / disparity
    return torch.from_numpy(depth.astype(np.float32)).unsqueeze(0)


def check_resize(resize: Any) -> tuple[int, int] | None:
    """The ``resize`` option as ``(height, width)``, or None; anything else is a ``DatasetError``."""
    if resize is None:
        return None
    if (
        not isinstance(resize, (list, tuple))
        or len(resize) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize)
    ):
        raise DatasetError(
            f"Cityscapes option 'resize' must be null or [height, width] of two positive ints, got {resize!r}"
        )
    return int(resize[0]), int(resize[1])


def resize_sample(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Every tensor of ``sample`` resized to ``size`` with its target key's interpolation (the image
    bilinear and antialiased, label maps and depth nearest), values unchanged; ``meta["size"]`` updated."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if key in PASSTHROUGH_KEYS:
            out[key] = value
            continue
        interpolation = rule_for(key).interpolation
        if value.ndim == 2:  # class maps are H x W; torchvision wants a channel dimension
            out[key] = F.resize(value[None], list(size), interpolation=interpolation, antialias=True)[0]
        else:
            out[key] = F.resize(value, list(size), interpolation=interpolation, antialias=True)
    if "meta" in out:
        out["meta"] = {**out["meta"], "size": size}
    return out


# ---------------------------------------------------------------------------------------------------


def _image_reader(split: str) -> TargetReader:
    return TargetReader(f"leftImg8bit/{split}", ("_leftImg8bit.png",), decode_image, "RGB uint8 H x W x 3 PNG")


def _target_readers(split: str, classes: int) -> dict[str, TargetReader]:
    return {
        "semseg": TargetReader(
            f"gtFine/{split}",
            ("_gtFine_labelIds.png",),
            _label_decoder(SETTINGS[classes][1]),
            f"uint8 H x W Cityscapes label ids 0..{MAX_LABEL_ID}, mapped to the {classes}-class setting",
            class_map=True,
        ),
        "depth": TargetReader(
            f"disparity/{split}",
            ("_disparity.png",),
            decode_disparity,
            "16-bit H x W PNG, 0 = invalid, else disparity (p - 1) / 256 px; depth = baseline * fx / disparity "
            f"(camera/{split}/<id>_camera.json, else {DEFAULT_BASELINE} m and {DEFAULT_FX} px)",
        ),
    }


@DATASETS.register("cityscapes")
class Cityscapes(MultiTaskFolder):
    """Samples of one split of Cityscapes (official layout): semseg (7 or 19 classes) and depth.

    ``classes`` (keyword option, 7 or 19) picks the segmentation setting; ``resize`` (keyword option,
    ``[height, width]`` or None) resizes every sample when it is read (see the module docstring). The
    readers depend on the split (their folders) and on ``classes`` (the label mapping), so each instance
    builds its own ``IMAGE`` and ``TARGETS``; the class-level tables show the default setting with a
    ``<split>`` placeholder.
    """

    MISSING_ROOT_HINT: ClassVar[str] = "nothing is downloaded at run time; put Cityscapes there (see docs/datasets.md)"

    IMAGE: ClassVar[TargetReader] = _image_reader("<split>")
    TARGETS: ClassVar[Mapping[str, TargetReader]] = _target_readers("<split>", 19)

    def __init__(
        self,
        root: str | Path,
        split: str,
        targets: Sequence[str],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
        *,
        classes: int = 19,
        resize: Sequence[int] | None = None,
    ) -> None:
        if isinstance(classes, bool) or not isinstance(classes, int) or classes not in SETTINGS:
            raise DatasetError(
                f"Cityscapes option 'classes' must be one of {', '.join(map(str, sorted(SETTINGS)))}, got {classes!r}"
            )
        self.num_classes = classes
        self.resize = check_resize(resize)
        # per-instance readers, shadowing the class-level tables (see the class docstring)
        self.IMAGE = _image_reader(split)
        self.TARGETS = _target_readers(split, classes)
        super().__init__(root, split, targets, transform)

    def load(self, index: int) -> dict[str, Any]:
        """The untransformed sample of the ``index``-th id, resized to ``resize`` when that option is set."""
        sample = super().load(index)
        return sample if self.resize is None else resize_sample(sample, self.resize)

    def _load_info(self) -> DatasetInfo:
        """Cityscapes has no ``meta.json``: the name and the class names of the setting are built in."""
        return DatasetInfo(
            name="Cityscapes",
            classes={"semseg": list(SETTINGS[self.num_classes][0])},
            extra={"ignore_index": IGNORE_INDEX, "depth_unit": "m", "classes": self.num_classes},
        )

    def _load_split(self, split: str) -> list[str]:
        """The ids ``<city>/<stem>`` of the images ``leftImg8bit/<split>/*/*_leftImg8bit.png``, sorted."""
        images = self.root / "leftImg8bit"
        folder = images / split
        if not folder.is_dir():
            known = sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
            raise DatasetError(
                f"no split {split!r}: missing folder {folder} (expected leftImg8bit/<split>/<city>/"
                f"<city>_<seq>_<frame>_leftImg8bit.png); splits found: {', '.join(known) or '(none)'}"
            )
        suffix = "_leftImg8bit.png"
        ids = sorted(f"{p.parent.name}/{p.name.removesuffix(suffix)}" for p in folder.glob(f"*/*{suffix}"))
        if not ids:
            raise DatasetError(f"no images in {folder}; expected <city>/<city>_<seq>_<frame>{suffix}")
        return ids


__all__ = [
    "CLASSES_7",
    "CLASSES_19",
    "DEFAULT_BASELINE",
    "DEFAULT_FX",
    "LABELS",
    "Cityscapes",
    "Label",
    "camera_path",
    "check_resize",
    "decode_disparity",
    "read_camera",
    "resize_sample",
]

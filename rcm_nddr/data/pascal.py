"""PASCAL-MT (PASCAL-Context with semantic segmentation, human parts, distilled surface normals and
saliency, and edges) in the layout of the multi-task release used by ASTMT and RCM.

Everything lives under one root; each target is one file per sample id, and only the files of the
requested targets are read:

- ``JPEGImages/<id>.jpg``: the RGB image (its size is the sample's size).
- ``ImageSets/Context/{train,val}.txt``: the splits, one id per line.
- ``semseg/pascal-context/<id>.png``: uint8 H x W, 0 = background, 1..20 = the VOC classes
  (``PASCAL_CLASSES``), 255 = ignore -> int64 H x W, decoded as is; any other value is an error.
- ``human_parts/<id>.mat``: a PASCAL-Part annotation (``scipy.io.loadmat``): ``anno[0][0][1][0]`` is
  the array of objects; object ``o`` has its class index in ``o[1][0][0]`` (person = 15), its
  instance mask in ``o[2]`` and its parts in ``o[3]`` (empty, or ``o[3][0]`` lists parts ``p`` with
  the name ``p[0][0]`` and the mask ``p[1]``). The parts are merged into the 7 classes of
  ``HUMAN_PART_CLASSES`` (``HUMAN_PART_IDS`` maps the part names): an image with a person starts as
  background and each part of each person is painted in order (later parts overwrite earlier ones);
  an image without a person is all 255 (ignore), so the part metric skips it. When ``human_parts``
  is the only requested target, images without a person are dropped from the split; which images
  have one is read from the JSON cache ``ImageSets/Parts/<split>.txt`` (``{id: [class index of each
  object, ...]}``) when it covers the split, and otherwise found by reading every ``.mat`` file (the
  dataset root is never written to).
- ``normals_distill/<id>.png``: uint8 RGB with n = 2 v / 255 - 1 per channel, renormalized to unit
  length, and kept only where the PASCAL-Context label map holds a class that has normals in NYUD
  (see ``load_normals_classes``, which reads ``json/nyu_classes.json`` and
  ``json/context_classes.json``); other pixels are the zero vector (invalid).
- ``sal_distill/<id>.png``: greyscale (or RGB, converted to grey) uint8, salient where
  value / 255 > 0.5 -> float32 1 x H x W in {0, 1}.
- ``pascal-context/trainval/<id>.mat``: the variable ``LabelMap`` (integer H x W, PASCAL-Context
  classes); it masks the normals and makes the edge target: ``label_map_edges`` (ASTMT/RCM), or
  ``label_map_boundaries`` (SEISM's) under the edge task's evaluation switch ``pascal_edge_gt``.

There is no ``meta.json``: the name, the class names and the benchmark constants (the edge matching
tolerance ``edge_max_dist`` and ``ignore_index``) are built in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.io
import scipy.ndimage
import torch
from skimage.morphology import thin
from torch import Tensor
from tqdm import tqdm

from rcm_nddr.data.folder import MultiTaskFolder
from rcm_nddr.data.readers import IGNORE_INDEX, DatasetError, decode_image, read_png
from rcm_nddr.data.targets import TargetReader
from rcm_nddr.errors import ConfigError
from rcm_nddr.registry import DATASETS
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)

#: background, then the 20 PASCAL VOC classes: the label values 0..20 of the semseg target
PASCAL_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
#: the class index of a person object in the PASCAL-Part annotations (and in ``ImageSets/Parts``)
PERSON_CLASS = PASCAL_CLASSES.index("person")
#: the label values 0..6 of the human_parts target
HUMAN_PART_CLASSES: tuple[str, ...] = (
    "background",
    "head",
    "torso",
    "upper_arm",
    "lower_arm",
    "upper_leg",
    "lower_leg",
)
#: PASCAL-Part person part name -> human_parts label
HUMAN_PART_IDS: Mapping[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6),
}
#: the edge benchmark's matching tolerance on PASCAL, a fraction of the image diagonal
EDGE_MAX_DIST = 0.0075
PASCAL_EDGE_GT = ("laplacian", "seg2bmap")  # the switch pascal_edge_gt: label_map_edges, label_map_boundaries
#: a kept distilled normal shorter than this (before renormalization) is invalid
NORMAL_MIN_LENGTH = 1e-6
#: the four-neighbour Laplacian of ``cv2.Laplacian(ksize=1)``
_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

LABEL_MAP_LAYOUT = "MATLAB file with an integer H x W variable 'LabelMap' (PASCAL-Context classes)"


# ---------------------------------------------------------------------------------------------------
# decoders: file -> tensor in the sample format, ValueError on a malformed file (see readers.py)


def decode_pascal_semseg(path: Path) -> Tensor:
    """uint8 PNG, 0 = background, 1..20 = VOC classes, 255 = ignore -> int64 H x W (identity)."""
    raw = read_png(path, ("L", "P"))
    bad = raw[(raw >= len(PASCAL_CLASSES)) & (raw != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"label values {np.unique(bad)[:8].tolist()} outside 0..{len(PASCAL_CLASSES) - 1} "
            f"(0 = background, 1..20 = VOC classes) and not {IGNORE_INDEX} (ignore)"
        )
    return torch.from_numpy(raw.astype(np.int64))


def _as_mask(value: Any, size: tuple[int, int] | None, what: str) -> np.ndarray:
    mask = np.asarray(value)
    if mask.ndim != 2 or (size is not None and mask.shape != size):
        expected = f"{size[0]} x {size[1]}" if size is not None else "H x W"
        raise ValueError(f"{what} of shape {mask.shape}, expected {expected}")
    return mask.astype(bool)


def _class_index(obj: Any) -> int:
    return int(np.asarray(obj[1]).reshape(-1)[0])


def _part_objects(path: Path) -> np.ndarray:
    """The array of objects of a PASCAL-Part annotation (``anno[0][0][1][0]``)."""
    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise ValueError(f"unsupported MATLAB file ({exc})") from exc
    if "anno" not in contents:
        found = ", ".join(repr(k) for k in contents if not k.startswith("__")) or "none"
        raise ValueError(f"no variable 'anno' (found: {found}); expected a PASCAL-Part annotation")
    try:
        return contents["anno"][0][0][1][0]
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"'anno' is not a PASCAL-Part annotation struct ({exc})") from exc


def person_classes(path: Path) -> list[int]:
    """The class index of each object of a PASCAL-Part annotation (a person is ``PERSON_CLASS``)."""
    objects = _part_objects(path)
    try:
        return [_class_index(obj) for obj in objects]
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed object in 'anno' ({exc})") from exc


def decode_human_parts(path: Path, size: tuple[int, int] | None = None) -> Tensor:
    """PASCAL-Part ``.mat`` -> int64 H x W human part labels (0..6), all 255 when there is no person.

    ``size`` is the image's (H, W); every person and part mask must have it. Without ``size`` it is
    taken from the first object's mask.
    """
    objects = _part_objects(path)
    try:
        if size is None:
            if not len(objects):
                raise ValueError("no object to take the image size from")
            size = tuple(np.asarray(objects[0][2]).shape)  # type: ignore[assignment]
        target = None
        for index, obj in enumerate(objects):
            if _class_index(obj) != PERSON_CLASS:
                continue
            _as_mask(obj[2], size, f"instance mask of object {index}")
            if target is None:
                target = np.zeros(size, dtype=np.int64)
            parts = np.asarray(obj[3])
            if parts.size == 0:
                continue
            for part in parts[0]:
                name = str(np.asarray(part[0]).reshape(-1)[0])
                if name not in HUMAN_PART_IDS:
                    raise ValueError(
                        f"unknown person part name {name!r} in object {index} "
                        f"(known: {', '.join(sorted(HUMAN_PART_IDS))})"
                    )
                target[_as_mask(part[1], size, f"mask of part {name!r} of object {index}")] = HUMAN_PART_IDS[name]
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed object in 'anno' ({exc})") from exc
    if target is None:  # no person: nothing to evaluate
        target = np.full(size, IGNORE_INDEX, dtype=np.int64)
    return torch.from_numpy(target)


def decode_label_map(path: Path) -> Tensor:
    """``.mat`` with the integer H x W variable ``LabelMap`` -> int64 H x W."""
    try:
        contents = scipy.io.loadmat(path, variable_names=["LabelMap"])
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise ValueError(f"unsupported MATLAB file ({exc})") from exc
    if "LabelMap" not in contents:
        raise ValueError("no variable 'LabelMap'")
    raw = np.asarray(contents["LabelMap"])
    if raw.ndim != 2:
        raise ValueError(f"LabelMap of shape {raw.shape}, expected H x W")
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all() or (raw != np.round(raw)).any():
            raise ValueError("LabelMap holds non-integer values")
    elif not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"LabelMap of dtype {raw.dtype}, expected integers")
    return torch.from_numpy(raw.astype(np.int64))


def label_map_edges(labels: np.ndarray | Tensor) -> np.ndarray:
    """Boolean H x W edges of a label map, as in the ASTMT/RCM pipeline.

    The four-neighbour Laplacian (kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]], in float64, with the
    "reflect 101" border of OpenCV's ``cv2.Laplacian(ksize=1)``: the row or column beyond the border
    is the one next to it, not the border itself) is an edge where it is non-zero, and the edges are
    then thinned with ``skimage.morphology.thin``.

    The Laplacian sums the label differences to the four neighbours, so a pixel whose differences
    cancel (e.g. label 2 between a 1 and a 3, the other two neighbours also 2) is *not* an edge even
    though it touches other labels, exactly as in the reference pipeline.
    """
    values = np.asarray(labels, dtype=np.float64)
    laplacian = scipy.ndimage.convolve(values, _LAPLACIAN, mode="mirror")
    return thin(np.abs(laplacian) > 0)


def seg2bmap(labels: np.ndarray | Tensor) -> np.ndarray:
    """Boolean H x W boundary map of a segmentation, BSDS's ``seg2bmap`` (D. Martin, 2003): a pixel is a
    boundary when its label differs from its east, south or south-east neighbour's; on the last row only
    the east one counts, on the last column only the south one; the bottom-right pixel never is one."""
    labels = np.asarray(labels)
    boundary = np.zeros(labels.shape, dtype=bool)
    boundary[:, :-1] = labels[:, :-1] != labels[:, 1:]  # east: every row, the last one included
    boundary[:-1, :] |= labels[:-1, :] != labels[1:, :]  # south: every column, the last one included
    boundary[:-1, :-1] |= labels[:-1, :-1] != labels[1:, 1:]  # south-east: neither last row nor column
    return boundary


def label_map_boundaries(labels: np.ndarray | Tensor) -> np.ndarray:
    """Boolean H x W edges of a label map as SEISM makes its ground truth: ``thin(seg2bmap(labels))``."""
    return thin(seg2bmap(labels))


def decode_pascal_edge(path: Path) -> Tensor:
    """``LabelMap`` ``.mat`` -> float32 1 x H x W edges in {0, 1} (``label_map_edges``)."""
    return _edge_tensor(decode_label_map(path))


def _edge_tensor(labels: Tensor, ground_truth: str = "laplacian") -> Tensor:
    make = label_map_boundaries if ground_truth == "seg2bmap" else label_map_edges
    return torch.from_numpy(make(labels.numpy())).float().unsqueeze(0)


def decode_distilled_normals(path: Path) -> Tensor:
    """uint8 RGB with n = 2 v / 255 - 1 -> float32 3 x H x W, renormalized (decoded length < 1e-6 =
    zero vector). Not yet masked by the label map: ``PascalMT.load`` does that."""
    raw = read_png(path, ("RGB",))
    normals = raw.astype(np.float32) * (2.0 / 255.0) - 1.0
    return _unit_or_zero(torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1))))


def _unit_or_zero(normals: Tensor) -> Tensor:
    length = normals.norm(dim=0, keepdim=True)
    valid = length >= NORMAL_MIN_LENGTH
    return torch.where(valid, normals / length.clamp_min(NORMAL_MIN_LENGTH), torch.zeros(()))


def mask_normals(normals: Tensor, labels: Tensor, classes: Collection[int]) -> Tensor:
    """Zero (invalid) the normals of pixels whose label is not one of ``classes``."""
    keep = torch.isin(labels, torch.tensor(sorted(classes), dtype=labels.dtype))
    return torch.where(keep.unsqueeze(0), normals, torch.zeros(()))


def decode_distilled_saliency(path: Path) -> Tensor:
    """greyscale (or RGB) uint8, value / 255 > 0.5 -> float32 1 x H x W in {0, 1}."""
    raw = read_png(path, ("L", "RGB"), convert="L")
    return torch.from_numpy(raw.astype(np.float32) / 255.0 > 0.5).float().unsqueeze(0)


# ---------------------------------------------------------------------------------------------------
# metadata files


def _read_json(path: Path, expected: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"missing {path}; expected {expected}") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); expected {expected}") from exc


def load_normals_classes(root: Path) -> frozenset[int]:
    """The PASCAL-Context ``LabelMap`` indices whose pixels keep their distilled normals.

    These are the indices (``json/context_classes.json``: context class name -> index) of every NYU
    class name (``json/nyu_classes.json``: a list of names, or an object keyed by them) that is also
    a context class, except ``'unknown'``, plus the index of ``'tvmonitor'`` (NYU calls it otherwise).
    """
    nyu_path, context_path = root / "json" / "nyu_classes.json", root / "json" / "context_classes.json"
    nyu_expected = "a JSON list of NYU class names (or an object keyed by them)"
    context_expected = "a JSON object mapping each PASCAL-Context class name to its LabelMap index"
    nyu = _read_json(nyu_path, nyu_expected)
    if not isinstance(nyu, (list, dict)) or not all(isinstance(name, str) for name in nyu):
        raise DatasetError(f"malformed {nyu_path}; expected {nyu_expected}")
    context = _read_json(context_path, context_expected)
    if not isinstance(context, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in context.values()
    ):
        raise DatasetError(f"malformed {context_path}; expected {context_expected}")
    if "tvmonitor" not in context:
        raise DatasetError(f"{context_path} has no class 'tvmonitor'; expected {context_expected}")
    valid = {context[name] for name in nyu if name in context and name != "unknown"}
    return frozenset(valid | {context["tvmonitor"]})


def _read_parts_cache(path: Path) -> dict[str, list[int]] | None:
    """``ImageSets/Parts/<split>.txt``: ``{id: [class index of each object, ...]}``, or None if absent."""
    if not path.is_file():
        return None
    expected = "a JSON object {image id: [class index of each object, ...]}"
    cache = _read_json(path, expected)
    if not isinstance(cache, dict) or not all(
        isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in v) for v in cache.values()
    ):
        raise DatasetError(f"malformed {path}; expected {expected}")
    return cache


# ---------------------------------------------------------------------------------------------------


@DATASETS.register("pascal")
class PascalMT(MultiTaskFolder):
    """Samples of one split of PASCAL-MT: semseg, human_parts, normals, sal, edge (see the module doc).

    ``TARGETS`` names the file each target is read from; the normals are also masked by the
    ``LabelMap`` of the sample, which ``load`` reads once for the edges and the normals together.

    ``evaluation`` (the engine's, for validation sets): target key -> switches of the task reading it;
    ``evaluation["edge"]["pascal_edge_gt"]`` (default ``"laplacian"``) is ``edge_ground_truth``.
    """

    MISSING_ROOT_HINT: ClassVar[str] = "nothing is downloaded at run time; put PASCAL-MT there (see docs/datasets.md)"

    IMAGE: ClassVar[TargetReader] = TargetReader("JPEGImages", (".jpg",), decode_image, "RGB uint8 H x W x 3 JPEG")
    LABEL_MAP: ClassVar[TargetReader] = TargetReader(
        "pascal-context/trainval", (".mat",), decode_label_map, LABEL_MAP_LAYOUT
    )
    TARGETS: ClassVar[Mapping[str, TargetReader]] = {
        "semseg": TargetReader(
            "semseg/pascal-context",
            (".png",),
            decode_pascal_semseg,
            "uint8 H x W PNG, 0 = background, 1..20 = VOC classes, 255 = ignore",
            class_map=True,
        ),
        "human_parts": TargetReader(
            "human_parts",
            (".mat",),
            decode_human_parts,
            "PASCAL-Part annotation .mat (anno[0][0][1][0] = objects: class index, mask, parts)",
            class_map=True,
        ),
        "normals": TargetReader(
            "normals_distill", (".png",), decode_distilled_normals, "uint8 RGB PNG, n = 2 v / 255 - 1"
        ),
        "sal": TargetReader(
            "sal_distill", (".png",), decode_distilled_saliency, "uint8 greyscale PNG, salient where > 127"
        ),
        "edge": TargetReader("pascal-context/trainval", (".mat",), decode_pascal_edge, LABEL_MAP_LAYOUT),
    }
    SPLIT_FOLDER: ClassVar[str] = "ImageSets/Context"
    PARTS_CACHE_FOLDER: ClassVar[str] = "ImageSets/Parts"

    def __init__(
        self,
        root: str | Path,
        split: str,
        targets: Sequence[str],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
        *,
        evaluation: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.edge_ground_truth = ((evaluation or {}).get("edge") or {}).get("pascal_edge_gt", "laplacian")
        if not isinstance(self.edge_ground_truth, str) or self.edge_ground_truth not in PASCAL_EDGE_GT:
            raise ConfigError(
                "PASCAL-MT: the edge task's evaluation switch 'pascal_edge_gt' must be one of "
                f"{', '.join(map(repr, PASCAL_EDGE_GT))}, got {self.edge_ground_truth!r}"
            )
        super().__init__(root, split, targets, transform)
        self.normals_classes = load_normals_classes(self.root) if "normals" in self.targets else frozenset()

    def _load_info(self) -> DatasetInfo:
        """PASCAL-MT has no ``meta.json``: the name, class names and benchmark constants are built in."""
        return DatasetInfo(
            name="PASCAL-MT",
            classes={"semseg": list(PASCAL_CLASSES), "human_parts": list(HUMAN_PART_CLASSES)},
            extra={"edge_max_dist": EDGE_MAX_DIST, "ignore_index": IGNORE_INDEX},
        )

    def _load_split(self, split: str) -> list[str]:
        """The split's ids; with ``human_parts`` as the only target, only the images with a person."""
        ids = super()._load_split(split)
        if self.targets != ("human_parts",):
            return ids
        has_person = self._person_flags(split, ids)
        kept = [sample_id for sample_id in ids if has_person[sample_id]]
        log.info(
            "%s %s: %d of %d images have a person (human_parts is the only target; the others are dropped)",
            self.info.name,
            split,
            len(kept),
            len(ids),
        )
        if not kept:
            raise DatasetError(f"no image of split {split!r} of {self.root} has a person to evaluate human_parts on")
        return kept

    def _person_flags(self, split: str, ids: list[str]) -> dict[str, bool]:
        cache_path = self.root / self.PARTS_CACHE_FOLDER / f"{split}.txt"
        cache = _read_parts_cache(cache_path)
        if cache is not None and all(sample_id in cache for sample_id in ids):
            return {sample_id: PERSON_CLASS in cache[sample_id] for sample_id in ids}
        log.info(
            "%s: %s, scanning %d annotations for persons",
            self.info.name,
            f"{cache_path} does not list every id of {split!r}" if cache is not None else f"no {cache_path}",
            len(ids),
        )
        reader = dataclasses.replace(self.TARGETS["human_parts"], decode=_person_flag)
        return {
            sample_id: bool(self._read(reader, sample_id).item())
            for sample_id in tqdm(ids, desc=f"persons in {split}", unit="image", disable=not sys.stderr.isatty())
        }

    def load(self, index: int) -> dict[str, Any]:
        """The untransformed sample of the ``index``-th id: image, the requested targets and ``meta``."""
        sample_id = self.ids[index]
        image = self._read(self.IMAGE, sample_id)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        sample: dict[str, Any] = {"image": image}
        label_map: Tensor | None = None
        for key in self.targets:
            reader = self.readers[key]
            if key in ("edge", "normals") and label_map is None:
                label_map = self._read(self.LABEL_MAP, sample_id, size)
            if key == "edge":
                sample[key] = _edge_tensor(label_map, self.edge_ground_truth)
            elif key == "normals":
                normals = self._read(reader, sample_id, size)
                sample[key] = mask_normals(normals, label_map, self.normals_classes)
            elif key == "human_parts":
                reader = dataclasses.replace(reader, decode=functools.partial(decode_human_parts, size=size))
                sample[key] = self._read(reader, sample_id, size, self.info.classes[key])
            else:
                classes = self.info.classes[key] if reader.class_map else None
                sample[key] = self._read(reader, sample_id, size, classes)
        sample["meta"] = {"id": sample_id, "size": size}
        return sample


def _person_flag(path: Path) -> Tensor:
    """A 0-d bool tensor: whether the PASCAL-Part annotation has a person (a decoder for ``_read``)."""
    return torch.tensor(PERSON_CLASS in person_classes(path))


__all__ = [
    "EDGE_MAX_DIST",
    "HUMAN_PART_CLASSES",
    "HUMAN_PART_IDS",
    "PASCAL_CLASSES",
    "PERSON_CLASS",
    "PascalMT",
    "decode_human_parts",
    "label_map_boundaries",
    "label_map_edges",
    "load_normals_classes",
    "mask_normals",
    "person_classes",
]

"""A multi-task dataset in the NYUD-MT folder layout (one folder per target, one file per sample id),
as written by the SYNTH_MT generator.

The image is ImageNet-normalized when it is read, so the joint transforms pad it with 0, which is the
mean colour. The per-target readers form a table (``MultiTaskFolder.TARGETS``) that a subclass for
another dataset in a similar layout overrides.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from rcm_nddr.registry import DATASETS
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


class DatasetError(Exception):
    """A missing, unreadable or malformed dataset file; the message names the path and what was expected."""


@dataclass(frozen=True)
class TargetReader:
    """How one sample key is stored: ``<root>/<folder>/<id><ext>`` for the first extension that exists.

    ``decode`` turns a file into the sample's tensor and raises ``ValueError`` describing what is wrong
    with a malformed file; ``layout`` is the one-line description of the encoding quoted in errors.
    ``class_map`` marks label maps whose values index ``meta.json``'s class list for the key.
    """

    folder: str
    extensions: tuple[str, ...]
    decode: Callable[[Path], Tensor]
    layout: str
    class_map: bool = False


# ---------------------------------------------------------------------------------------------------
# decoders: file -> tensor in the sample format, ValueError on a malformed file


def _read_png(path: Path, modes: tuple[str, ...], convert: str | None = None) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in modes:
            raise ValueError(f"image mode {im.mode!r}, expected {' or '.join(map(repr, modes))}")
        return np.array(im.convert(convert) if convert else im)


def _read_npy(path: Path, shape: str, ndim: int, channels: int | None = None) -> np.ndarray:
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
    rgb = _read_png(path, ("RGB", "L"), convert="RGB")
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def decode_class_png(path: Path) -> Tensor:
    """uint8 label PNG with 0 = ignore and k + 1 = class k -> int64 H x W with 255 = ignore."""
    raw = torch.from_numpy(_read_png(path, ("L", "P")).astype(np.int64))
    return torch.where(raw == 0, IGNORE_INDEX, raw - 1)


def decode_depth_npy(path: Path) -> Tensor:
    """float H x W metres, 0 = invalid -> float32 1 x H x W."""
    depth = _read_npy(path, "H x W", ndim=2)
    if (depth < 0).any():
        raise ValueError("negative depth values (expected metres >= 0, 0 = invalid)")
    return torch.from_numpy(depth.copy()).unsqueeze(0)


def decode_normals_npy(path: Path) -> Tensor:
    """float H x W x 3 unit vectors, all-zero = invalid -> float32 3 x H x W."""
    normals = _read_npy(path, "H x W x 3", ndim=3, channels=3)
    return torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1)))


def decode_edge_png(path: Path) -> Tensor:
    """uint8 PNG with 0 = no edge and 255 = edge -> float32 1 x H x W in {0, 1}."""
    raw = _read_png(path, ("L",))
    if ((raw != 0) & (raw != 255)).any():
        raise ValueError(f"values {np.unique(raw)[:8].tolist()}..., expected only 0 and 255")
    return torch.from_numpy(raw == 255).float().unsqueeze(0)


def decode_saliency_png(path: Path) -> Tensor:
    """uint8 PNG, thresholded at 128 -> float32 1 x H x W in {0, 1}."""
    raw = _read_png(path, ("L",))
    return torch.from_numpy(raw >= 128).float().unsqueeze(0)


# ---------------------------------------------------------------------------------------------------


@DATASETS.register("synthetic")
class MultiTaskFolder(Dataset):
    """Samples of one split of a dataset in the NYUD-MT layout (``meta.json``, ``gt_sets/<split>.txt``,
    ``images/``, one folder per target).

    ``dataset[i]`` is the sample dict of the i-th id of the split (only the requested ``targets``
    are read), passed through ``transform(sample, generator)``. ``dataset[(i, seed)]`` draws the
    transform's randomness from ``torch.Generator().manual_seed(seed)``, so an augmented sample is a
    pure function of ``(i, seed)`` whatever process loads it; a plain ``i`` seeds the generator with
    ``i``.
    """

    IMAGE: ClassVar[TargetReader] = TargetReader(
        "images", (".png", ".jpg"), decode_image, "RGB uint8 H x W x 3 (.png or .jpg)"
    )
    TARGETS: ClassVar[Mapping[str, TargetReader]] = {
        "semseg": TargetReader(
            "segmentation",
            (".png",),
            decode_class_png,
            "uint8 H x W PNG, 0 = ignore, k + 1 = class k",
            class_map=True,
        ),
        "parts": TargetReader(
            "parts",
            (".png",),
            decode_class_png,
            "uint8 H x W PNG, 0 = ignore, k + 1 = part class k",
            class_map=True,
        ),
        "depth": TargetReader("depth", (".npy",), decode_depth_npy, "float32 H x W metres, 0 = invalid"),
        "normals": TargetReader(
            "normals", (".npy",), decode_normals_npy, "float32 H x W x 3 unit vectors, all-zero = invalid"
        ),
        "edge": TargetReader("edge", (".png",), decode_edge_png, "uint8 H x W PNG, 0 = no edge, 255 = edge"),
        "sal": TargetReader("sal", (".png",), decode_saliency_png, "uint8 H x W PNG, 0 = background, 255 = salient"),
    }
    SPLIT_FOLDER: ClassVar[str] = "gt_sets"

    def __init__(
        self,
        root: str | Path,
        split: str,
        targets: Sequence[str],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")
        if isinstance(targets, str):
            raise TypeError(f"targets must be a sequence of sample keys, not the string {targets!r}")
        unknown = [key for key in targets if key not in self.TARGETS]
        if unknown:
            raise DatasetError(
                f"{type(self).__name__} at {self.root} has no target {', '.join(map(repr, unknown))}; "
                f"it provides: {', '.join(self.TARGETS)}"
            )
        self.split = split
        self.targets = tuple(dict.fromkeys(targets))
        self.transform = transform
        self.info = self._load_info()
        for key in self.targets:
            if self.TARGETS[key].class_map and not self.info.classes.get(key):
                raise DatasetError(
                    f"{self.root / 'meta.json'} lists no classes for target {key!r} "
                    f'(expected "classes": {{"{key}": [class names...]}})'
                )
        self.ids = self._load_split(split)
        log.info("%s %s: %d samples, targets %s", self.info.name, split, len(self.ids), self.targets)

    # -- metadata -------------------------------------------------------------------------------

    def _load_info(self) -> DatasetInfo:
        path = self.root / "meta.json"
        expected = 'expected a JSON object with "name" and "classes": {target: [class names...]}'
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"missing {path}; {expected}") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read {path} ({exc}); {expected}") from exc
        classes = meta.get("classes", {}) if isinstance(meta, dict) else None
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("name"), str)
            or not isinstance(classes, dict)
            or not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in classes.values())
        ):
            raise DatasetError(f"malformed {path}; {expected}")
        extra = {k: v for k, v in meta.items() if k not in ("name", "classes")}
        return DatasetInfo(name=meta["name"], classes=classes, extra=extra)

    def _load_split(self, split: str) -> list[str]:
        folder = self.root / self.SPLIT_FOLDER
        path = folder / f"{split}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
            raise DatasetError(
                f"missing split file {path} (one sample id per line); splits found: {', '.join(known) or '(none)'}"
            )
        try:
            ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read split file {path} ({exc}); expected one sample id per line") from exc
        if not ids:
            raise DatasetError(f"split file {path} lists no sample ids; expected one sample id per line")
        return ids

    # -- samples --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = self._parse_key(key)
        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample, torch.Generator().manual_seed(seed))
        return sample

    def _parse_key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"a sample key is an index or an (index, seed) pair, got {key!r}")
            index, seed = operator.index(key[0]), operator.index(key[1])
        else:
            index = operator.index(key)
            seed = None
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        index %= len(self)
        return index, index if seed is None else seed

    def load(self, index: int) -> dict[str, Any]:
        """The untransformed sample of the ``index``-th id: image, the requested targets and ``meta``."""
        sample_id = self.ids[index]
        image = self._read(self.IMAGE, sample_id)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        sample: dict[str, Any] = {"image": image}
        for key in self.targets:
            reader = self.TARGETS[key]
            classes = self.info.classes[key] if reader.class_map else None
            sample[key] = self._read(reader, sample_id, size, classes)
        sample["meta"] = {"id": sample_id, "size": size}
        return sample

    def _read(
        self,
        reader: TargetReader,
        sample_id: str,
        size: tuple[int, int] | None = None,
        classes: list[str] | None = None,
    ) -> Tensor:
        folder = self.root / reader.folder
        candidates = [folder / f"{sample_id}{ext}" for ext in reader.extensions]
        path = next((p for p in candidates if p.is_file()), None)
        expected = f"expected {reader.folder}/<id>{'|'.join(reader.extensions)}: {reader.layout}"
        if path is None:
            names = " or ".join(str(p) for p in candidates)
            raise DatasetError(f"missing {names}; {expected}")
        try:
            value = reader.decode(path)
            if size is not None and tuple(value.shape[-2:]) != size:
                raise ValueError(f"size {tuple(value.shape[-2:])} differs from the image's {size}")
            if classes is not None:
                _check_labels(value, len(classes))
        except (OSError, ValueError, EOFError, SyntaxError) as exc:  # how PIL and numpy report bad files
            raise DatasetError(f"bad file {path}: {exc}; {expected}") from exc
        return value


def _check_labels(labels: Tensor, num_classes: int) -> None:
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() and int(valid.max()) >= num_classes:
        raise ValueError(
            f"label {int(valid.max())} but meta.json lists {num_classes} classes "
            f"(file values 1..{num_classes} are classes, 0 is ignore)"
        )

"""A multi-task dataset in the NYUD-MT folder layout (one folder per target, one file per sample id),
as written by the SYNTH_MT generator.

The image is ImageNet-normalized when it is read, so the joint transforms pad it with 0, which is the
mean colour. Every registered target key (``rcm_nddr.data.targets``) is read from its folder with its
registered reader; a subclass for another dataset in a similar layout adds readers of its own
(``TARGETS``), which take precedence.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rcm_nddr.data.readers import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, DatasetError, decode_image
from rcm_nddr.data.targets import TARGET_KEYS, TargetReader, registered_reader, task_types_reading
from rcm_nddr.registry import DATASETS
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)


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
    #: readers of this dataset's own layout, taken before the registered ones (none here: the folder
    #: layout is the registry's)
    TARGETS: ClassVar[Mapping[str, TargetReader]] = {}
    SPLIT_FOLDER: ClassVar[str] = "gt_sets"
    #: how to get the dataset, said when its root is missing (``{root}``: the root asked for)
    MISSING_ROOT_HINT: ClassVar[str] = "render SYNTH_MT there with `rcm-nddr data synth --out {root}`"

    def __init__(
        self,
        root: str | Path,
        split: str,
        targets: Sequence[str],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            hint = self.MISSING_ROOT_HINT.format(root=self.root)
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder; {hint}")
        if isinstance(targets, str):
            raise TypeError(f"targets must be a sequence of sample keys, not the string {targets!r}")
        readers = {key: self.target_reader(key) for key in dict.fromkeys(targets)}
        unknown = [key for key, reader in readers.items() if reader is None]
        if unknown:
            raise DatasetError(
                f"{type(self).__name__} at {self.root} has no target {', '.join(map(repr, unknown))}; "
                f"it provides: {', '.join(self.provided_targets())}{_unknown_key_hints(unknown)}"
            )
        self.readers: dict[str, TargetReader] = readers  # type: ignore[assignment] - None ruled out above
        self.split = split
        self.targets = tuple(readers)
        self.transform = transform
        self.info = self._load_info()
        for key, reader in self.readers.items():
            if reader.class_map and not self.info.classes.get(key):
                raise DatasetError(
                    f"{self.root / 'meta.json'} lists no classes for target {key!r} "
                    f'(expected "classes": {{"{key}": [class names...]}})'
                )
        self.ids = self._load_split(split)
        # debug: a run builds a split more than once (training, trivial baselines, RI); the trainer logs the sizes
        log.debug("%s %s: %d samples, targets %s", self.info.name, split, len(self.ids), self.targets)

    # -- targets --------------------------------------------------------------------------------

    def target_reader(self, key: str) -> TargetReader | None:
        """How this dataset reads ``key``: its own ``TARGETS`` reader, else the registered folder-layout
        reader (None: not provided). A dataset with a layout of its own takes a registered key only
        where the key's folder exists under the root, so a target it lacks stays an error here."""
        if key in self.TARGETS:
            return self.TARGETS[key]
        reader = registered_reader(key)
        if reader is not None and self.TARGETS and not (self.root / reader.folder).is_dir():
            return None
        return reader

    def provided_targets(self) -> list[str]:
        """Every target key this dataset can read."""
        keys = [*self.TARGETS, *(k for k in TARGET_KEYS.names() if k not in self.TARGETS)]
        return [k for k in keys if self.target_reader(k) is not None]

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
        for key, reader in self.readers.items():
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


def _unknown_key_hints(keys: list[str]) -> str:
    """For each key no registration covers: that it is not registered, which task types read it, and how
    to register it."""
    hints = []
    for key in keys:
        if key in TARGET_KEYS:
            continue
        readers = task_types_reading(key)
        read_by = f", the target of task type {', '.join(readers)}" if readers else ""
        hints.append(
            f"; {key!r} is not a registered target key{read_by}: register it beside its task type with "
            f"@rcm_nddr.data.targets.register_target({key!r}, ...) on the function that reads its file"
        )
    return "".join(hints)


def _check_labels(labels: Tensor, num_classes: int) -> None:
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() and int(valid.max()) >= num_classes:
        raise ValueError(
            f"label {int(valid.max())} but meta.json lists {num_classes} classes "
            f"(file values 1..{num_classes} are classes, 0 is ignore)"
        )


# the readers' constants and error stay importable from here, where the engine and commands find them
__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetError", "MultiTaskFolder", "TargetReader"]

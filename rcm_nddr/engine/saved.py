"""Predictions saved as files in the ground truth's layout: written by ``test.py --save-predictions``
and scored against a dataset by ``rcm-nddr evaluate``, so results can be checked (and compared with
other codes' outputs) without the model.

One file per sample and task: ``<dir>/<sample id><suffix>``, where the suffix is the task type's
``prediction_suffix``:

- ``.png``: uint8 greyscale map of 0-based class indices (semseg, parts, human_parts), H x W;
- ``.npy``: float32 array, H x W for one-channel predictions (depth in metres, edge and saliency
  probabilities), H x W x C otherwise (normals as unit vectors), like the datasets' own ``.npy``
  ground truth.

H x W is the size of the sample's original image: padding added for batching is cropped away.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_save_npy, atomic_write
from rcm_nddr.task import Task

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".npy")


class PredictionError(UserError):
    """A missing or malformed saved prediction; the message names the file and what was expected."""


def _suffix(task: Task) -> str:
    suffix = task.prediction_suffix
    if suffix not in SUFFIXES:
        raise PredictionError(
            f"task type {type(task).__name__} declares prediction_suffix {suffix!r}; expected one of {SUFFIXES}"
        )
    return suffix


def prediction_path(folder: str | Path, sample_id: str, task: Task) -> Path:
    """Where the prediction of ``sample_id`` for ``task`` lives under ``folder``."""
    return Path(folder) / f"{sample_id}{_suffix(task)}"


def expected_layout(task: Task) -> str:
    if _suffix(task) == ".png":
        return "a uint8 greyscale PNG of 0-based class indices, H x W"
    return "a float32 .npy array, H x W for one channel or H x W x C, the size of the ground truth"


# ----------------------------------------------------------------------------- one file


def encode_prediction(task: Task, value: Tensor) -> np.ndarray:
    """One post-processed prediction (no batch dimension, the task's target format) -> the array to save."""
    value = value.detach().to("cpu")
    if _suffix(task) == ".png":
        if value.ndim != 2 or value.dtype.is_floating_point:
            raise ValueError(f"{task.name}: a .png prediction must be an H x W integer class map, got {value.shape}")
        if value.numel() and (int(value.min()) < 0 or int(value.max()) > 255):
            raise ValueError(f"{task.name}: class indices must lie in 0..255 to be saved as a uint8 PNG")
        return value.to(torch.uint8).numpy()
    if value.ndim != 3:
        raise ValueError(f"{task.name}: a .npy prediction must be C x H x W, got shape {tuple(value.shape)}")
    array = value.float().numpy()
    return array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))


def save_prediction(task: Task, value: Tensor, path: str | Path) -> None:
    """Write one prediction atomically (a crash leaves the old file or none, never half a file)."""
    array = encode_prediction(task, value)
    path = Path(path)
    if path.suffix == ".png":
        image = Image.fromarray(array, "L")
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    else:
        atomic_save_npy(path, array)


def load_prediction(task: Task, path: str | Path) -> Tensor:
    """Read one saved prediction back into the task's target format (no batch dimension)."""
    path = Path(path)
    try:
        if _suffix(task) == ".png":
            with Image.open(path) as image:
                if image.mode not in ("L", "P"):
                    raise ValueError(f"image mode {image.mode!r}, expected 'L' (or 'P')")
                return torch.from_numpy(np.array(image).astype(np.int64))
        array = np.load(path, allow_pickle=False)
        if not np.issubdtype(array.dtype, np.floating) or array.ndim not in (2, 3):
            raise ValueError(f"array of dtype {array.dtype} and shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("array holds NaN or infinite values")
        array = array.astype(np.float32)
        tensor = torch.from_numpy(array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor
    except FileNotFoundError:
        raise PredictionError(f"missing prediction {path}; expected {expected_layout(task)}") from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise PredictionError(f"bad prediction {path}: {exc}; expected {expected_layout(task)}") from exc


# ----------------------------------------------------------------------------- batches


def sample_sizes(batch: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The original (unpadded) H x W of each sample of a collated batch."""
    heights, widths = batch["meta"]["size"]
    return [(int(h), int(w)) for h, w in zip(heights, widths, strict=True)]


def unpad(value: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop the bottom/right padding of a (C x) H x W map back to ``size``."""
    return value[..., : size[0], : size[1]]


class PredictionWriter:
    """``evaluate(..., on_batch=writer)`` callback: saves each sample's unpadded prediction of every task
    to ``<out>/<task name>/<sample id><suffix>``."""

    def __init__(self, out: str | Path, tasks: Mapping[str, Task]) -> None:
        self.out = Path(out)
        self.tasks = dict(tasks)
        self.count = 0

    def __call__(self, batch: Mapping[str, Any], predictions: Mapping[str, Tensor]) -> None:
        ids = batch["meta"]["id"]
        for i, (sample_id, size) in enumerate(zip(ids, sample_sizes(batch), strict=True)):
            for name, task in self.tasks.items():
                path = prediction_path(self.out / name, sample_id, task)
                save_prediction(task, unpad(predictions[name][i], size), path)
            self.count += 1


# ----------------------------------------------------------------------------- scoring a folder


def resolve_folder(pred: str | Path, task_name: str, first_id: str, task: Task) -> Path:
    """``pred`` itself, or ``pred/<task name>`` when that is where the files are (the layout
    ``test.py --save-predictions`` writes for several tasks)."""
    pred = Path(pred)
    if not pred.is_dir():
        raise PredictionError(f"prediction folder {pred} does not exist")
    nested = pred / task_name
    if not prediction_path(pred, first_id, task).exists() and nested.is_dir():
        return nested
    return pred


def check_complete(folder: Path, ids: Sequence[str], task: Task) -> None:
    """Every sample of the split needs a prediction: one error counting and naming the missing files."""
    missing = [prediction_path(folder, i, task) for i in ids if not prediction_path(folder, i, task).is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise PredictionError(
            f"{len(missing)} of {len(ids)} predictions missing in {folder} (e.g. {shown}); expected one file "
            f"per sample of the split: <sample id>{_suffix(task)}, {expected_layout(task)}"
        )


def evaluate_saved(
    dataset: Dataset,
    task: Task,
    folder: str | Path,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Score the predictions in ``folder`` against every sample of ``dataset`` (loaded without
    transforms, so at the ground truth's own size) with the task's metric."""
    ids = list(dataset.ids)
    if not ids:
        raise PredictionError("the split has no samples")
    folder = resolve_folder(folder, task.name, ids[0], task)
    check_complete(folder, ids, task)
    metric = task.metric()
    # batch_size=None: samples one by one (sizes may differ), decoded in worker processes
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for sample in tqdm(loader, total=len(ids), desc=f"evaluate {task.name}", disable=not progress):
        sample_id = sample["meta"]["id"]
        target = sample[task.target_key]
        path = prediction_path(folder, sample_id, task)
        prediction = load_prediction(task, path)
        if prediction.shape != target.shape:
            raise PredictionError(
                f"bad prediction {path}: shape {_layout_shape(task, prediction)} but the ground truth of "
                f"{sample_id!r} is {_layout_shape(task, target)}; expected {expected_layout(task)}"
            )
        try:
            metric.update(prediction[None], target[None])
        except ValueError as exc:  # e.g. a class index the task does not have
            raise PredictionError(f"bad prediction {path}: {exc}") from exc
    log.info("evaluated %d predictions of %s in %s", len(ids), task.name, folder)
    return metric.compute()


def _layout_shape(task: Task, value: Tensor) -> tuple[int, ...]:
    """A tensor's shape as its file stores it (H x W x C for multi-channel .npy)."""
    shape = tuple(value.shape)
    if _suffix(task) == ".npy" and len(shape) == 3:
        return shape[1:] if shape[0] == 1 else (*shape[1:], shape[0])
    return shape

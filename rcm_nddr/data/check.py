"""Checks that a run's tasks and its dataset fit together, made before anything is written: every task's
target key is registered, the dataset provides it, and sample 0's targets load and pass through every
joint transform. A plug-in's mistake is then one clear error instead of a failure inside training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rcm_nddr.data.readers import DatasetError
from rcm_nddr.data.targets import TARGET_KEYS, module_origin
from rcm_nddr.data.transforms import PadTo, RandomScale, horizontal_flip, spatial_size
from rcm_nddr.registry import RegistryError
from rcm_nddr.task import Task

# zoom in and out, so a rule that only fails one way (e.g. on_scale dividing by 1 - s) is caught too
_CHECK_SCALES = (0.5, 2.0)


def check_target_keys(tasks: Mapping[str, Task | type[Task]]) -> None:
    """Every task's target key is registered (``RegistryError`` naming the task type, the key, the
    plug-in module and how to register the key otherwise). ``tasks``: task name -> task or task type."""
    for name, task in tasks.items():
        cls = task if isinstance(task, type) else type(task)
        key = getattr(cls, "target_key", None)
        if not isinstance(key, str) or not key:
            raise RegistryError(
                f"{_task_type(name, cls)} declares no target_key (the sample key holding its target), got {key!r}"
            )
        if key not in TARGET_KEYS:
            TARGET_KEYS.load_entry_points()
        if key not in TARGET_KEYS:
            raise RegistryError(
                f"{_task_type(name, cls)} reads its target from sample key {key!r}, which is not a registered "
                f"target key (registered: {', '.join(TARGET_KEYS.names())}). Register it in that module, beside "
                f"the task type: `@register_target({key!r}, pad_value=..., extensions=('.npy',))` (from "
                f"rcm_nddr.data.targets) on the function that reads <dataset root>/{key}/<id>.npy into a tensor"
            )


def check_targets(tasks: Mapping[str, Task | type[Task]], dataset: Any) -> None:
    """``check_target_keys``, then: the dataset provides every task's target (``dataset.targets``, when
    it has that attribute), and its sample 0 holds each one as an H x W or C x H x W tensor of the
    image's size that every joint transform of the key's rule accepts (``DatasetError`` otherwise)."""
    check_target_keys(tasks)
    keys = {name: task.target_key for name, task in tasks.items()}
    provided = getattr(dataset, "targets", None)
    described = f"{type(dataset).__name__} at {getattr(dataset, 'root', '?')}"
    for name, key in keys.items():
        if provided is not None and key not in provided:
            raise DatasetError(
                f"{_task_type(name, tasks[name])} needs target {key!r}, which the dataset {described} was not "
                f"built to read (it reads: {', '.join(provided) or 'no targets'})"
            )
    if not len(dataset):
        return
    # the readers that run, and who registered them: a plug-in's reader is the usual suspect
    origins = ", ".join(f"{k!r} ({TARGET_KEYS.get(k).origin})" for k in dict.fromkeys(keys.values()))
    try:
        sample = dataset[0]
    except DatasetError as exc:  # already names the file and the expected layout
        raise DatasetError(f"sample 0 of {described} cannot be read for the targets {origins}: {exc}") from exc
    except Exception as exc:  # a reader's own bug
        raise DatasetError(
            f"sample 0 of {described} cannot be read for the targets {origins} ({type(exc).__name__}: {exc})"
        ) from exc
    for name, key in keys.items():
        _check_value(sample, name, tasks[name], key, described)


def _check_value(sample: Mapping[str, Any], name: str, task: Task | type[Task], key: str, described: str) -> None:
    where = f"{_task_type(name, task)}: target {key!r} of sample 0 of {described}"
    origin = TARGET_KEYS.get(key).origin
    if key not in sample:
        raise DatasetError(f"{where} is missing: the sample holds {', '.join(sample)}")
    value = sample[key]
    if not isinstance(value, Tensor) or value.ndim not in (2, 3):
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise DatasetError(f"{where} is {got}; expected an H x W or C x H x W tensor (reader registered by {origin})")
    image = sample.get("image")
    if isinstance(image, Tensor) and tuple(value.shape[-2:]) != tuple(image.shape[-2:]):
        raise DatasetError(
            f"{where} is {tuple(value.shape[-2:])} pixels, the image {tuple(image.shape[-2:])} "
            f"(reader registered by {origin})"
        )
    pair = {"image": image, key: value} if isinstance(image, Tensor) else {key: value}
    try:
        h, w = spatial_size(pair)
        for scale in _CHECK_SCALES:
            RandomScale((scale,))(pair, torch.Generator())  # its own generator: the run's seed stays untouched
        horizontal_flip(pair)
        PadTo((h + 1, w + 1))(pair)
    except Exception as exc:
        raise DatasetError(
            f"{where} fails the joint transforms ({type(exc).__name__}: {exc}); check the transform rule of "
            f"{key!r} registered by {origin}"
        ) from exc


def _task_type(name: str, task: Task | type[Task]) -> str:
    cls = task if isinstance(task, type) else type(task)
    return f"task {name!r} (task type {cls.__qualname__} in {module_origin(cls.__module__)})"

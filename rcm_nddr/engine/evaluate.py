"""Evaluation over a whole split with each task's metric accumulator, and Delta_MTL."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD
from rcm_nddr.engine import distributed
from rcm_nddr.engine.saved import sample_sizes, unpad
from rcm_nddr.errors import ConfigError
from rcm_nddr.task import Metric, Task


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; full precision elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def denormalize(images: Tensor) -> Tensor:
    """ImageNet-normalized B x 3 x H x W -> uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    tasks: Mapping[str, Task],
    device: torch.device,
    amp: bool = False,
    progress: bool = True,
    on_batch: Callable[[dict, dict[str, Tensor]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``model`` over ``loader`` and return ``{task: metrics}``. ``on_batch(batch, predictions)``
    sees every batch with the post-processed predictions (for saving or visualizing them).

    In a distributed run each process evaluates its shard (``eval_loader``) and the metric
    accumulators of all processes are merged, so every rank returns the metrics of the whole set.

    Metrics see each sample at its original size: the padding the validation transform adds for
    batching (bottom/right, ``meta.size`` gives the original) is cropped from predictions and targets,
    so scores equal those of the same predictions saved and scored by ``rcm-nddr evaluate``."""
    was_training = model.training
    model.eval()
    metrics = {name: task.metric() for name, task in tasks.items()}
    try:
        for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
            images = batch["image"].to(device, non_blocking=True, memory_format=torch.channels_last)
            with autocast(device, amp):
                outputs = model(images, tasks=list(tasks), raw=True)
            predictions = {name: tasks[name].postprocess(out.float()).cpu() for name, out in outputs.items()}
            update_unpadded(metrics, tasks, predictions, batch)
            if on_batch is not None:
                on_batch(batch, predictions)
    finally:
        model.train(was_training)
    return {name: metric.compute() for name, metric in merge_across_ranks(metrics).items()}


def merge_across_ranks(metrics: dict[str, Metric]) -> dict[str, Metric]:
    """Every rank's accumulators merged in rank order (the same on every rank; ``metrics`` itself in a
    single process)."""
    gathered = distributed.all_gather_objects(metrics)
    if len(gathered) == 1:
        return metrics
    merged = gathered[0]
    for other in gathered[1:]:
        for name, metric in merged.items():
            metric.merge(other[name])
    return merged


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """An evaluation loader over ``dataset`` in order; in a distributed run, over this rank's shard."""
    ctx = distributed.context()
    sampler = distributed.ShardSampler(len(dataset), ctx.rank, ctx.world_size) if ctx.enabled else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def update_unpadded(
    metrics: Mapping[str, Metric], tasks: Mapping[str, Task], predictions: Mapping[str, Tensor], batch: Mapping
) -> None:
    """Update each task's metric with a batch, each sample cropped to its original size (``meta.size``)."""
    sizes = sample_sizes(batch) if "meta" in batch else []
    padded_size = tuple(batch["image"].shape[-2:])
    for name, task in tasks.items():
        target = batch[task.target_key]
        if all(size == padded_size for size in sizes):
            metrics[name].update(predictions[name], target)
            continue
        for i, size in enumerate(sizes):
            metrics[name].update(unpad(predictions[name][i : i + 1], size), unpad(target[i : i + 1], size))


def primary_metrics(tasks: Mapping[str, Task]) -> dict[str, tuple[str, bool]]:
    """``{task: (primary metric key, higher is better)}``."""
    out = {}
    for name, task in tasks.items():
        metric = task.metric()
        out[name] = (metric.primary, metric.higher_is_better)
    return out


def evaluation_record(protocol: str, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """What the metrics of ``tasks`` followed: the protocol and every task's evaluation switches."""
    return {"protocol": protocol, "switches": {name: dict(task.evaluation) for name, task in tasks.items()}}


def describe_switches(switches: Mapping[str, Any]) -> str:
    """``beta2=1.0, empty_image=zero`` (``no switches`` for a task type without any)."""
    return ", ".join(f"{k}={v}" for k, v in switches.items()) or "no switches"


def check_same_evaluation(
    mine: Mapping[str, Any], theirs: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Task], source: str
) -> None:
    """Delta_MTL compares like with like: each task's baseline (``theirs``: task -> ``{protocol, switches}``,
    None when its results record none: ``project``, under which everything before the protocols was scored)
    must have been scored with the switches ``mine`` (an ``evaluation_record``) holds for it; otherwise a
    ConfigError names both protocols and the switches that differ."""
    for name, task in tasks.items():
        recorded = theirs.get(name) or {"protocol": "project", "switches": task.protocol_switches("project")}
        own, other = mine["switches"][name], dict(recorded.get("switches") or {})
        differ = sorted(k for k in own.keys() | other.keys() if own.get(k) != other.get(k))
        if differ:
            diffs = ", ".join(f"{k}: {other.get(k)!r} there, {own.get(k)!r} here" for k in differ)
            raise ConfigError(
                f"baselines {source}: task {name!r} was scored under protocol {recorded.get('protocol')!r} and this "
                f"evaluation follows {mine['protocol']!r} ({diffs}); Delta_MTL needs both scored alike: evaluate "
                f"with --protocol {recorded.get('protocol')} (or the same evaluation switches), or score the "
                "baselines again under this one"
            )


def delta_mtl(
    results: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    primaries: Mapping[str, tuple[str, bool]],
    floor: float | None = None,
) -> float:
    """Delta_MTL in percent: ``100/T * sum_t (-1)^{l_t} (M_t - B_t) / B_t`` over the primary metric of
    each task, l_t = 1 when lower is better. Positive means better than the baselines.

    A baseline of 0 is an error, unless ``floor`` is given: then ``|B_t|`` is at least ``floor`` (for
    model selection against an untrained first validation, where e.g. an mIoU of 0 happens)."""
    terms = []
    for name, (key, higher) in primaries.items():
        m, b = results[name][key], baselines[name][key]
        scale = abs(b) if floor is None else max(abs(b), floor)
        if scale == 0:
            raise ValueError(f"Delta_MTL: baseline {key} of task {name!r} is 0")
        terms.append((m - b) / scale * (1.0 if higher else -1.0))
    return 100.0 * sum(terms) / len(terms)


def evaluate_trivial(
    tasks: Mapping[str, Task],
    train_set: Dataset,
    val_set: Dataset,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Fit each task's trivial predictor on the (unaugmented) train split and score it on ``val_set``."""
    predictors = {name: task.trivial() for name, task in tasks.items()}
    for batch in DataLoader(train_set, batch_size=batch_size):
        for name, task in tasks.items():
            predictors[name].fit(batch[task.target_key])
    metrics = {name: task.metric() for name, task in tasks.items()}
    for batch in DataLoader(val_set, batch_size=batch_size):
        predictions = {name: predictors[name].predict(batch[task.target_key]) for name, task in tasks.items()}
        update_unpadded(metrics, tasks, predictions, batch)
    return {name: metric.compute() for name, metric in metrics.items()}


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of metric results: NaN/inf (e.g. the IoU of a class absent from a split) become null."""

    def finite(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(obj), allow_nan=False, **kwargs)

"""``fusion.sources: auto``: which stored tasks each new task reads, measured on the data before the group
trains.

The measure (``fusion.auto``: ``probe_iters``, ``batches``, ``threshold``, ``max_sources``):

1. **Probe.** The group's network reading every candidate (every stored task ``all`` would read) is built as
   the run builds its own and trained for ``probe_iters`` iterations on the first batches of the run's
   training stream: the config's optimizer and learning rates (the fusion's multiplier included) without
   the schedule, the sum of the tasks' losses times their loss weights (no loss weighting method, no
   consistency term).
2. **Ablation.** On the next ``batches`` batches of the training stream (held out from the probe), without
   gradients, dropout off, the new tasks' BatchNorm normalizing with each batch's statistics as in
   training (stored tasks as always: eval mode), each new task t has its loss ``L_t``; ``L_t^-s`` is the
   same loss when the stage features of candidate s, wherever a new task's fusion layer reads them, are
   replaced by their mean over the held-out images (per channel and position). What is the same for
   every image stays; what s says about the particular image is removed.
3. **Affinity** ``a(t, s) = (L_t^-s - L_t) / |L_t|``: the relative increase of t's loss without s. It
   favours the stored tasks whose image-specific features the probe learned to rely on for t (not
   scale-free: a source of larger feature variance weighs more in a fusion layer that starts as
   ``[alpha I, beta I, ...]``); a source that carries nothing about the image (or that t ignores) scores 0,
   one whose removal helps t scores below 0.

Task t keeps the candidates with ``a(t, s) > threshold`` (at most ``max_sources``, the highest), in store
order; its group mates are always read. The probe runs once per run, before the run's network is built,
on rank 0 (the other ranks receive the choice); it writes nothing and leaves every random generator as
it found it, so a run that chooses trains exactly as a run told the chosen sources. The choice and the
measurement are kept in the run's plan (checkpointed: ``--resume`` does not measure again) and in each
new task's store record (``model.sources_auto``)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.engine.builders import build_optimizer
from rcm_nddr.engine.evaluate import autocast
from rcm_nddr.engine.plan import GroupPlan, choose_sources
from rcm_nddr.engine.sampler import ResumableSampler
from rcm_nddr.engine.signals import ignore_stop_signals
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.store import TaskRecord
from rcm_nddr.task import Task

log = logging.getLogger(__name__)

#: the name of the measure, as recorded
MEASURE = "mean_ablation_loss_increase"

Batch = tuple[Tensor, dict[str, Tensor]]


def measure_sources(
    cfg: Config,
    plan: GroupPlan,
    records: list[TaskRecord],
    tasks: dict[str, Task],
    weights: dict[str, float],
    train_set: Dataset,
    build: Callable[[GroupPlan], MultiTaskNet],
    device: torch.device,
) -> GroupPlan:
    """``plan`` (of ``fusion.sources: auto``, reading every candidate) narrowed to the candidates each new task
    keeps, with the measurement. ``build(plan)`` makes the probe's network as the run would (nothing
    written); the global random generators are restored afterwards."""
    a = cfg.fusion.auto
    if not plan.pending:
        return plan
    started = time.perf_counter()
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            model = build(plan).to(device, memory_format=torch.channels_last)
            batches = _stream(cfg, tasks, train_set, device)
            try:
                _probe(cfg, model, tasks, weights, [next(batches) for _ in range(a.probe_iters)])
                held_out = [next(batches) for _ in range(a.batches)]
            finally:
                batches.close()  # the loader's workers, if any, end here
            losses, ablated = _ablate(cfg, model, tasks, plan.candidates, held_out)
    finally:
        random.setstate(python_state)
    seconds = round(time.perf_counter() - started, 3)
    chosen, measured = {}, {}
    for t, loss in losses.items():
        affinity = {s: (ablated[s][t] - loss) / max(abs(loss), 1e-12) for s in plan.candidates}
        chosen[t] = select(affinity, a.threshold, a.max_sources)
        measured[t] = {
            "measure": MEASURE,
            "loss": loss,
            "affinity": affinity,
            "chosen": chosen[t],
            "threshold": a.threshold,
            "max_sources": a.max_sources,
            "probe_iters": a.probe_iters,
            "batches": a.batches,
            "seconds": seconds,
        }
        listed = ", ".join(f"{s} {v:+.4f}{' (kept)' if s in chosen[t] else ''}" for s, v in affinity.items())
        log.info("fusion.sources auto: task %s (loss %.4f): affinity %s", t, loss, listed)
    log.info("fusion.sources auto: measured %d candidate(s) in %.1f s", len(plan.candidates), seconds)
    return choose_sources(plan, chosen, measured, records)


def select(affinity: dict[str, float], threshold: float, max_sources: int | None) -> list[str]:
    """The sources kept by their ``affinity`` (in store order): those above ``threshold``, at most
    ``max_sources`` of the highest (ties: the earlier stored)."""
    ranked = [s for s in sorted(affinity, key=lambda s: -affinity[s]) if affinity[s] > threshold]
    kept = set(ranked[:max_sources])
    return [s for s in affinity if s in kept]


def nothing_to_measure(plan: GroupPlan, tasks: Sequence[str]) -> GroupPlan:
    """The plan of ``fusion.sources: auto`` when the store holds no task the group could read: each new task
    records an empty measurement."""
    log.info("fusion.sources auto: the store holds no task this group could read; nothing to measure")
    plan.auto = {t: {"measure": MEASURE, "affinity": {}, "chosen": []} for t in tasks}
    return plan


def _stream(cfg: Config, tasks: dict[str, Task], train_set: Dataset, device: torch.device) -> Iterator[Batch]:
    """The run's training stream from its start (a pure function of the seed: the run's own loader draws the
    same batches again), as (channels_last images, targets) on ``device``."""
    t = cfg.train
    loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        sampler=ResumableSampler(len(train_set), t.seed, batch_size=t.batch_size),
        num_workers=t.num_workers,
        drop_last=True,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(t.seed),
    )
    for batch in loader:
        images = batch["image"].to(device, memory_format=torch.channels_last)
        yield images, {n: batch[task.target_key].to(device) for n, task in tasks.items()}


def _probe(
    cfg: Config, model: MultiTaskNet, tasks: dict[str, Task], weights: dict[str, float], batches: list[Batch]
) -> None:
    """Train ``model`` on ``batches``: one step each, the weighted sum of the tasks' losses."""
    optimizer = build_optimizer(cfg, model)
    model.train()
    for i, (images, targets) in enumerate(batches, start=1):
        with autocast(images.device, cfg.train.amp):
            outputs = model(images, raw=True)
        loss = sum(weights[n] * task.loss(outputs[n].float(), targets[n]) for n, task in tasks.items())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(
                f"{cfg.source}: key 'fusion.auto.probe_iters': the probe's loss is {value} at iteration "
                f"{i}; fewer probe iterations or a lower optimizer.lr / fusion.lr_mult"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i in (1, len(batches)):
            log.info("fusion.sources auto: probe iteration %d of %d, training loss %.4f", i, len(batches), value)


class _Ablation:
    """Forward pre-hooks on the new tasks' fusion units. While ``source`` is None they sum each candidate's
    stage features over the images (once per stage and candidate, however many units read them); with a
    ``source`` they replace its features, wherever a unit reads them, by their mean."""

    def __init__(self, candidates: list[str]) -> None:
        self.candidates = candidates
        self.source: str | None = None
        self.sums: dict[tuple[str, str], Tensor] = {}
        self.summed_by: dict[tuple[str, str], nn.Module] = {}
        self.means: dict[tuple[str, str], Tensor] = {}

    def hook(self, stage: str, sources: list[str]) -> Callable[[nn.Module, tuple], tuple | None]:
        def pre(module: nn.Module, args: tuple) -> tuple | None:
            features = list(args[0])
            for i, s in enumerate(sources):
                key = (stage, s)
                if s not in self.candidates:
                    continue
                if self.source is None and self.summed_by.setdefault(key, module) is module:
                    total = features[i].double().sum(0)
                    self.sums[key] = self.sums[key] + total if key in self.sums else total
                elif s == self.source:
                    features[i] = self.means[key].to(features[i].dtype).expand_as(features[i])
            return None if self.source is None else (features, *args[1:])

        return pre

    def remove(self, source: str, images: int) -> None:
        """From now on, replace ``source``'s features by their mean over the ``images`` summed."""
        self.source = source
        self.means = {key: total / images for key, total in self.sums.items() if key[1] == source}


@torch.no_grad()
def _ablate(
    cfg: Config, model: MultiTaskNet, tasks: dict[str, Task], candidates: list[str], batches: list[Batch]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each new task's mean loss over ``batches``, and, by candidate, the same with the candidate's features
    replaced by their mean over the batches' images at every fusion input of a new task. The new tasks'
    BatchNorm layers normalize with the batch's statistics, as in training (after a short probe their
    running statistics lag behind the weights, and a network normalized by them scores every change of
    its input's spread rather than what it says); dropout is off."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    fusion, ablation = model.fusion, _Ablation(candidates)
    handles = [
        fusion[t][stage].register_forward_pre_hook(ablation.hook(stage, list(fusion.sources[t])))
        for t in tasks
        for stage in fusion.stages.get(t, [])
    ]
    try:
        base = _losses(cfg, model, tasks, batches)
        ablated = {}
        for s in candidates:
            ablation.remove(s, sum(len(images) for images, _ in batches))
            ablated[s] = _losses(cfg, model, tasks, batches)
    finally:
        for handle in handles:
            handle.remove()
    return base, ablated


def _losses(cfg: Config, model: MultiTaskNet, tasks: dict[str, Task], batches: list[Batch]) -> dict[str, float]:
    """Each task's loss, averaged over ``batches``."""
    totals = dict.fromkeys(tasks, 0.0)
    for images, targets in batches:
        with autocast(images.device, cfg.train.amp):
            outputs = model(images, raw=True)
        for n, task in tasks.items():
            totals[n] += float(task.loss(outputs[n].float(), targets[n])) / len(batches)
    return totals

"""A training run: ``build_run`` makes everything from the config without writing a file (so a mistake in
the config, a plug-in, the data or the store is refused before anything touches the disk), and
``TrainingRun.start`` writes what the run starts with: the store, the decomposition, the run directory."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from rcm_nddr.config import Config, ConfigError, check_paths, save_config
from rcm_nddr.data.check import check_targets
from rcm_nddr.engine import distributed, provenance
from rcm_nddr.engine.affinity import measure_sources, nothing_to_measure
from rcm_nddr.engine.builders import (
    ResponseInit,
    build_dataset,
    build_model,
    build_optimizer,
    build_scheduler,
    build_tasks,
    check_store_backbone,
    loss_weights,
    open_store,
    pretrained_backbone,
    resolve_device,
    resolve_ri,
)
from rcm_nddr.engine.checkpoint import load_checkpoint
from rcm_nddr.engine.evaluate import primary_metrics, to_json
from rcm_nddr.engine.objective import BuiltObjective, build_objective
from rcm_nddr.engine.plan import GroupPlan, plan_group
from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_write_text, remove_stale_temporaries
from rcm_nddr.nn.accounting import parameter_breakdown
from rcm_nddr.nn.backbone import ResNetBackbone
from rcm_nddr.store import ModelStore, TaskRecord
from rcm_nddr.store.format import DECOMPOSITION_FILE
from rcm_nddr.task import Metric, Task

log = logging.getLogger(__name__)


class RunExistsError(UserError, RuntimeError):
    """A fresh run would overwrite the checkpoints of an earlier run."""


@dataclass(frozen=True)
class RunPaths:
    """Where one task group's run writes: ``<store>/runs/<group>`` and ``<store>/checkpoints/<group>``."""

    run: Path
    checkpoints: Path

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        store = Path(cfg.store)
        return cls(store / "runs" / cfg.group_name, store / "checkpoints" / cfg.group_name)

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def registered(self) -> Path:
        """What the run registered: each task's tensors file sha256 (``write_registration``)."""
        return self.run / "registered.json"


def finish_run(paths: RunPaths, records: list[TaskRecord], keep_checkpoints: bool) -> None:
    """Once the run registered its group (``records``): record what it registered and, unless
    ``keep_checkpoints``, remove its checkpoints."""
    write_registration(paths, records)
    if not keep_checkpoints:
        remove_checkpoints(paths)


def write_registration(paths: RunPaths, records: list[TaskRecord]) -> None:
    """Record in the run directory the sha256 of the tensors file of each task the run registered."""
    registered = {r.name: r.files[r.tensors_file] for r in records}
    atomic_write_text(paths.registered, to_json(registered, indent=2))


def read_registration(paths: RunPaths) -> dict[str, str] | None:
    """What ``write_registration`` recorded, or None (not registered, or by a version that did not record it)."""
    try:
        registered = json.loads(paths.registered.read_text())
    except (OSError, ValueError):
        return None
    return registered if isinstance(registered, dict) else None


def remove_checkpoints(paths: RunPaths) -> None:
    """Remove a finished run's checkpoints (and their folder, once empty): the store holds what it trained."""
    for path in (paths.last, paths.best):
        path.unlink(missing_ok=True)
    for folder in (paths.checkpoints, paths.checkpoints.parent):  # <store>/checkpoints too, once empty
        with contextlib.suppress(OSError):
            folder.rmdir()
    log.info("checkpoints of %s removed (set train.keep_checkpoints: true to keep them)", paths.checkpoints)


def seed_everything(seed: int) -> None:
    # Augmentations draw from per-sample generators (see ResumableSampler); these seed the model's
    # initialization and dropout.
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(eq=False)
class TrainingRun:
    """Everything a run of the config's task group is made of, built by ``build_run``. ``store`` is the
    store the group joins (not created before ``start``), None when pretraining a shared backbone;
    ``checkpoint`` is the state ``--resume`` continues from."""

    cfg: Config
    dist: distributed.Context
    device: torch.device
    paths: RunPaths
    train_set: Dataset
    val_set: Dataset
    tasks: dict[str, Task]
    weights: dict[str, float]
    primaries: dict[str, tuple[str, bool]]
    store: ModelStore | None
    plan: GroupPlan
    net: ResNetBackbone
    ri: ResponseInit
    model: nn.Module
    objective: BuiltObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_iters: int
    parameter_counts: dict[str, dict[str, int]]
    environment: dict[str, Any]
    checkpoint: dict[str, Any] | None
    replace: bool = False
    started: bool = False

    def start(self) -> None:
        """Write what the run starts with, once, on rank 0 (the only rank that writes): remove the
        temporaries a killed run left among the checkpoints, write a decomposition the build computed,
        create the store with this run's filter bank (or check an existing one), and write the run
        directory's ``config.yaml``, ``parameters.json`` and ``env.json``."""
        if self.started or not self.dist.is_main:
            return
        remove_stale_temporaries(self.paths.checkpoints)
        if self.checkpoint is None:  # a fresh run: what an earlier run of the group registered is not its own
            self.paths.registered.unlink(missing_ok=True)
        if self.store is not None:
            # a decomposition made for the store's own ri.safetensors is written with the store, under its
            # lock, so that of runs creating one store together the first one's is the one it records
            content = None
            if self.ri.path is not None and self.ri.path.resolve() == (self.store.path / DECOMPOSITION_FILE).resolve():
                content, self.ri.content = self.ri.content, None
            self.ri.write()
            self.store = open_store(self.cfg, self.net, self.ri.eigenvectors, self.ri.path, content)
        self.paths.run.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.paths.run / "config.yaml")
        atomic_write_text(self.paths.run / "parameters.json", to_json(self.parameter_counts, indent=2))
        atomic_write_text(self.paths.run / "env.json", to_json(self.environment, indent=2))
        self.started = True


def build_run(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    shared_backbone: bool = False,
    replace: bool = False,
) -> TrainingRun:
    """Build the run of the config's task group, writing nothing: every check of the config, its plug-ins,
    its data and its store comes first. A missing decomposition is computed and kept in memory (rank 0
    computes it, the other ranks receive it); ``TrainingRun.start`` writes it.

    The store's bank and the stored tasks the group reads through NDDR are loaded frozen (a config with
    another backbone or bank is refused); a task name the store already registers is refused unless
    ``replace``. ``fusion.sources: auto`` first measures which stored tasks each new task reads (rank 0
    probes, see ``rcm_nddr.engine.affinity``; a resumed run reads its checkpoint's choice).
    ``shared_backbone`` builds one plain backbone shared by the group's tasks (pretraining)."""
    check_paths(cfg)
    dist = distributed.context()
    paths = RunPaths.of(cfg)
    _check_launch(cfg, dist, paths, resume, restart=overwrite or replace)  # replacing = starting over
    t = cfg.train
    seed_everything(t.seed)
    device = distributed.process_device(t.device, dist) or resolve_device(t.device)
    if dist.enabled and t.sync_bn and device.type != "cuda":
        raise ConfigError(f"{cfg.source}: key 'train.sync_bn': SyncBatchNorm needs CUDA devices, this run is on CPU")
    train_set = build_dataset(cfg, cfg.dataset.train_split, train=True)
    val_set = build_dataset(cfg, cfg.dataset.val_split, train=False)
    tasks = build_tasks(cfg, train_set.info)
    for dataset in (train_set, val_set):  # a plug-in's target mistakes, before anything is written
        check_targets(tasks, dataset)
    if dist.enabled:
        _check_mergeable(tasks)
    checkpoint = load_checkpoint(paths.last) if resume else None
    net = pretrained_backbone(cfg)
    store, plan, ri = None, GroupPlan(), ResponseInit()
    if shared_backbone:
        model = build_model(cfg, tasks, shared=True, net=net)
    else:
        store = ModelStore(cfg.store)  # read here; created by start()
        check_store_backbone(cfg, store, net)
        resumed = checkpoint is not None and "plan" in checkpoint
        if resumed:  # what the run started with (auto's choice included), whatever was added since
            plan = GroupPlan.from_dict(checkpoint["plan"])
        else:
            plan = plan_group(cfg, store.tasks if store.exists else [], replace)
        ri = distributed.from_main(lambda: resolve_ri(cfg, net, store))
        if not dist.is_main:
            ri.content = None  # rank 0 writes the file
        if cfg.fusion.sources == "auto" and not resumed:  # measured once per run, on rank 0 (see affinity)
            plan = distributed.from_main(lambda: _choose_sources(cfg, plan, store, tasks, train_set, net, ri, device))
        model = build_model(cfg, tasks, store=store, plan=plan, net=net, decomposition=ri.eigenvectors)
    if dist.enabled and t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # channels_last: NHWC convolutions are ~25% faster on CPU and the fast layout on GPUs too.
    model = model.to(device, memory_format=torch.channels_last)
    epoch = math.ceil(len(train_set) / t.batch_size)
    max_iters = t.max_iters or t.epochs * epoch
    weights = loss_weights(cfg, tasks)
    objective = build_objective(cfg, tasks, weights, model, store, device, epoch, dist.enabled)
    w = cfg.weighting
    optimizer = build_optimizer(
        cfg, model, objective.objective.param_groups(w["lr"], w["weight_decay"], cfg.optimizer.weight_decay)
    )
    return TrainingRun(
        cfg=cfg,
        dist=dist,
        device=device,
        paths=paths,
        train_set=train_set,
        val_set=val_set,
        tasks=tasks,
        weights=weights,
        primaries=primary_metrics(tasks),
        store=store,
        plan=plan,
        net=net,
        ri=ri,
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, max_iters),
        max_iters=max_iters,
        parameter_counts={name: parameter_breakdown(model, name) for name in tasks},
        # what produced the run, recorded by rank 0, which alone registers the group
        environment=provenance.collect(cfg) if dist.is_main else {},
        checkpoint=checkpoint,
        replace=replace,
    )


def _choose_sources(
    cfg: Config,
    plan: GroupPlan,
    store: ModelStore,
    tasks: dict[str, Task],
    train_set: Dataset,
    net: nn.Module,
    ri: ResponseInit,
    device: torch.device,
) -> GroupPlan:
    """``fusion.sources: auto``: the plan narrowed to the stored tasks each new task keeps (``affinity``)."""
    if not plan.candidates:
        return nothing_to_measure(plan, list(tasks))
    probe_tasks = copy.deepcopy(tasks)  # a task's state (if any) stays as the run starts it

    def build(probe_plan: GroupPlan) -> nn.Module:
        return build_model(
            cfg, probe_tasks, store=store, plan=probe_plan, net=copy.deepcopy(net), decomposition=ri.eigenvectors
        )

    records = store.tasks if store.exists else []
    weights = loss_weights(cfg, tasks)
    return measure_sources(cfg, plan, records, probe_tasks, weights, train_set, build, device)


def _check_launch(cfg: Config, dist: distributed.Context, paths: RunPaths, resume: bool, restart: bool) -> None:
    """The global batch splits over the processes; a fresh run does not overwrite an earlier run's
    checkpoints unless ``restart``; ``resume`` has a checkpoint to continue from."""
    if dist.enabled:
        distributed.check_global_batch(cfg, dist.world_size)
    if not resume and paths.last.exists() and not restart:
        raise RunExistsError(
            f"{paths.checkpoints} already holds checkpoints of a run of {cfg.group_name!r}; "
            "continue it with --resume, or start over with --overwrite"
        )
    if resume and not paths.last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {paths.last}")


def _check_mergeable(tasks: dict[str, Task]) -> None:
    """Several processes validate shards of the split: every task's metric must merge their results."""
    for name, task in tasks.items():
        metric = task.metric()
        if not metric.state and type(metric).merge is Metric.merge:
            raise ConfigError(
                f"task {name!r}: its metric {type(metric).__name__} cannot merge the results of several "
                "processes (declare `state` or override `merge`); train it with one process"
            )

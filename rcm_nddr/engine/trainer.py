"""The training loop of one task group: iterations, validation, checkpoints, TensorBoard, resume."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm import tqdm

from ..accounting import format_breakdown, owned_by, parameter_breakdown
from ..config import Config, check_paths, save_config
from ..store import ModelStore, TaskRecord
from .builders import (
    GroupPlan,
    build_dataset,
    build_model,
    build_optimizer,
    build_scheduler,
    build_tasks,
    check_store_backbone,
    config_spec,
    load_ri,
    loss_weights,
    open_store,
    plan_group,
    pretrained_backbone,
    resolve_device,
)
from .checkpoint import atomic_write_text, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .evaluate import autocast, delta_mtl, denormalize, evaluate, primary_metrics, to_json
from .sampler import ResumableSampler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A task's loss became NaN or infinite; training stops and the last good checkpoint is kept."""


class RunExistsError(RuntimeError):
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


def seed_everything(seed: int) -> None:
    # Augmentations draw from per-sample generators (see ResumableSampler); these seed the model's
    # initialization and dropout.
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Trains the config's task group into its model store. ``fit()`` runs to ``train.max_iters`` (or
    stops early at ``stop_after`` iterations with a checkpoint, to be continued with ``resume=True``);
    ``register()`` then adds the group to the store; ``run()`` does both.

    The store is created by the first run that names it (with this run's filter bank); in an existing
    store the bank is the store's (a config with another backbone or bank is refused), and the stored
    tasks the group reads through NDDR are loaded frozen. A task name the store already registers is
    refused unless ``replace``. ``shared_backbone`` trains one plain backbone shared by the group's
    tasks (pretraining), which registers nothing."""

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        shared_backbone: bool = False,
        replace: bool = False,
    ) -> None:
        check_paths(cfg)
        self.cfg = cfg
        self.progress = progress
        self.paths = RunPaths.of(cfg)
        if not resume and self.paths.last.exists() and not (overwrite or replace):  # replacing = starting over
            raise RunExistsError(
                f"{self.paths.checkpoints} already holds checkpoints of a run of {cfg.group_name!r}; "
                "continue it with --resume, or start over with --overwrite"
            )
        if resume and not self.paths.last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.paths.last}")
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.train_set = build_dataset(cfg, cfg.dataset.train_split, train=True)
        self.val_set = build_dataset(cfg, cfg.dataset.val_split, train=False)
        self.tasks = build_tasks(cfg, self.train_set.info)
        self.weights = loss_weights(cfg, self.tasks)
        self.primaries = primary_metrics(self.tasks)
        self.replace = replace
        saved = load_checkpoint(self.paths.last) if resume else None
        net = pretrained_backbone(cfg)
        self.store: ModelStore | None = None
        self.plan = GroupPlan()
        if shared_backbone:
            model = build_model(cfg, self.tasks, shared=True, net=net)
        else:
            # Every check before anything is written: a refused config leaves no store behind.
            store = ModelStore(cfg.store)
            check_store_backbone(cfg, store, net)
            if saved is not None and "plan" in saved:  # what the run started with, whatever was added since
                self.plan = GroupPlan.from_dict(saved["plan"])
            else:
                self.plan = plan_group(cfg, store.tasks if store.exists else [], replace)
            decomposition, decomposition_file = load_ri(cfg, net, store)
            self.store = open_store(cfg, net, decomposition, decomposition_file)
            model = build_model(cfg, self.tasks, store=self.store, plan=self.plan, net=net, decomposition=decomposition)
        # channels_last: NHWC convolutions are ~25% faster on CPU and the fast layout on GPUs too.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        t = cfg.train
        self.max_iters = t.max_iters or t.epochs * math.ceil(len(self.train_set) / t.batch_size)
        self.checkpoint_every = t.checkpoint_every or t.val_every
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.max_iters)
        self.iteration = 0
        self.best_score: float | None = None
        self.reference: dict[str, dict[str, float]] | None = None
        self.last_metrics: dict[str, dict[str, float]] | None = None
        if saved is not None:
            self._restore(saved)
        self.paths.run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.paths.run / "config.yaml")
        self.parameter_counts = {name: parameter_breakdown(self.model, name) for name in self.tasks}
        atomic_write_text(self.paths.run / "parameters.json", to_json(self.parameter_counts, indent=2))
        log.info(
            "group %s: tasks %s%s, %d train / %d val samples, %d iterations on %s; parameters per task:\n%s",
            cfg.group_name,
            list(self.tasks),
            f" reading stored tasks {self.plan.frozen} (frozen)" if self.plan.frozen else "",
            len(self.train_set),
            len(self.val_set),
            self.max_iters,
            self.device,
            format_breakdown(self.parameter_counts),
        )

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best_score": self.best_score,
            "reference": self.reference,
            "last_metrics": self.last_metrics,
            "group": self.cfg.group_name,
            "plan": self.plan.to_dict(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("group") != self.cfg.group_name:
            raise RuntimeError(
                f"{self.paths.last} belongs to group {state.get('group')!r}, not {self.cfg.group_name!r}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.iteration = state["iteration"]
        self.best_score = state["best_score"]
        self.reference = state["reference"]
        self.last_metrics = state["last_metrics"]
        log.info("resumed %s at iteration %d", self.paths.last, self.iteration)

    def _save_last(self) -> None:
        save_checkpoint(self.paths.last, self._state())

    # ------------------------------------------------------------------ loaders

    def _train_loader(self) -> DataLoader:
        t = self.cfg.train
        sampler = ResumableSampler(len(self.train_set), t.seed, start=self.iteration * t.batch_size)
        return DataLoader(
            self.train_set,
            batch_size=t.batch_size,
            sampler=sampler,
            num_workers=t.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=t.num_workers > 0,
            # A private generator: creating the loader must not consume the global RNG, or a resumed
            # run would draw different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(t.seed),
        )

    def val_loader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.cfg.test.batch_size,
            shuffle=False,
            num_workers=self.cfg.train.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------------ loop

    def fit(self, stop_after: int | None = None) -> dict[str, dict[str, float]] | None:
        """Train until ``max_iters`` (or ``stop_after``); returns the last validation metrics."""
        from torch.utils.tensorboard import SummaryWriter

        end = self.max_iters if stop_after is None else min(stop_after, self.max_iters)
        writer = SummaryWriter(self.paths.run)
        self.model.train()
        bar = tqdm(total=end, initial=self.iteration, desc=f"train {self.cfg.group_name}", disable=not self.progress)
        try:
            batches = iter(self._train_loader())
            while self.iteration < end:
                losses = self._step(next(batches))
                self.iteration += 1
                bar.update(1)
                if self.iteration % self.cfg.train.log_every == 0 or self.iteration == end:
                    for name, value in losses.items():
                        writer.add_scalar(f"loss/{name}", value, self.iteration)
                    writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], self.iteration)
                    bar.set_postfix(loss=f"{losses['total']:.4f}")
                validate = self.iteration % self.cfg.train.val_every == 0 or self.iteration == self.max_iters
                if validate:
                    self._validate(writer)
                if validate or self.iteration % self.checkpoint_every == 0 or self.iteration == end:
                    self._save_last()
        finally:
            bar.close()
            writer.close()
        if self.iteration == self.max_iters:
            atomic_write_text(
                self.paths.run / "metrics.json",
                to_json({"iteration": self.iteration, "metrics": self.last_metrics}, indent=2),
            )
        return self.last_metrics

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        images = batch["image"].to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.train.amp):
            outputs = self.model(images, raw=True)
        task_losses = {}
        for name, task in self.tasks.items():
            target = batch[task.target_key].to(self.device, non_blocking=True)
            task_losses[name] = task.loss(outputs[name].float(), target)
        total = sum(self.weights[name] * loss for name, loss in task_losses.items())
        values = {name: loss.item() for name, loss in task_losses.items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the loss of task {name!r} is {value} at iteration {self.iteration + 1}; training stopped. "
                    f"The last good checkpoint is kept at {self.paths.last}"
                    + ("" if self.paths.last.exists() else " (none was written yet)")
                )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        values["total"] = float(total.item())
        return values

    def _validate(self, writer) -> None:
        shown: list[bool] = []

        def show(batch, predictions) -> None:
            if shown:
                return
            shown.append(True)
            n = min(4, batch["image"].shape[0])
            writer.add_image("val/input", make_grid(denormalize(batch["image"][:n])), self.iteration)
            for name, task in self.tasks.items():
                target = batch[task.target_key][:n]
                writer.add_image(f"val/{name}/target", make_grid([task.visualize(x) for x in target]), self.iteration)
                writer.add_image(
                    f"val/{name}/prediction",
                    make_grid([task.visualize(x) for x in predictions[name][:n]]),
                    self.iteration,
                )

        metrics = evaluate(
            self.model, self.val_loader(), self.tasks, self.device, self.cfg.train.amp, self.progress, on_batch=show
        )
        for name, values in metrics.items():
            for key, value in values.items():
                writer.add_scalar(f"val/{name}/{key}", value, self.iteration)
        if self.reference is None:
            self.reference = metrics
        # One score for a group: Delta_MTL against the first validation (for one task: its primary metric's
        # relative change), so "best" is defined the same way for one task or several.
        score = delta_mtl(metrics, self.reference, self.primaries, floor=1e-6)
        summary = ", ".join(f"{n} {k} {metrics[n][k]:.3f}" for n, (k, _) in self.primaries.items())
        log.info("iteration %d: %s", self.iteration, summary)
        self.last_metrics = metrics
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            save_checkpoint(
                self.paths.best,
                {
                    "iteration": self.iteration,
                    "model": self.model.state_dict(),
                    "metrics": metrics,
                    "group": self.cfg.group_name,
                    "plan": self.plan.to_dict(),
                },
            )

    # ------------------------------------------------------------------ store

    def run(self) -> list[TaskRecord]:
        """``fit()`` to the end, then ``register()``."""
        self.fit()
        return self.register()

    def register(self) -> list[TaskRecord]:
        """Add the trained group to the model store: each task's tensors (those of the ``test.checkpoint``
        checkpoint: ``best`` or ``last``), its probe outputs, sources, config, parameter breakdown,
        validation metrics and model description. Earlier tasks and their files are not touched."""
        if self.store is None:
            raise RuntimeError("a pretraining run registers nothing in a model store")
        if self.iteration < self.max_iters:
            raise RuntimeError(
                f"group {self.cfg.group_name!r} is trained to iteration {self.iteration} of {self.max_iters}; "
                "finish it (--resume) before registering it"
            )
        which = self.cfg.test.checkpoint
        if which == "best" and self.paths.best.is_file():
            saved = load_checkpoint(self.paths.best)
            state, metrics, iteration = saved["model"], saved["metrics"], saved["iteration"]
        else:
            state, metrics, iteration = self.model.state_dict(), self.last_metrics, self.iteration
        tensors = {t: {k: v for k, v in state.items() if owned_by(k, t)} for t in self.tasks}
        records = []
        for name, task in self.tasks.items():
            spec = config_spec(self.cfg, name, task, self.plan.sources.get(name, []))
            key, _ = self.primaries[name]
            records.append(
                {
                    "name": name,
                    "type": spec.type,
                    "sources": spec.sources,
                    "config": self.cfg.to_dict(),
                    "parameters": self.parameter_counts[name],
                    "metrics": {
                        "primary": key,
                        "split": self.cfg.dataset.val_split,
                        "checkpoint": f"{which} (iteration {iteration})",
                        **(metrics or {}).get(name, {}),
                    },
                    "model": spec.model_description(),
                    "dataset": spec.dataset,
                }
            )
        probes = self.store.compute_probes(records, tensors)
        registered = self.store.register_group(records, tensors, probes, replace=self.replace)
        log.info(
            "registered %s in the store %s (group %d)",
            ", ".join(r.name for r in registered),
            self.store.path,
            registered[0].group,
        )
        return registered

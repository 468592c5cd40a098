"""The training loop of one task group: iterations, validation, checkpoints, resume, registration.
What the loop trains is built without side effects by ``rcm_nddr.engine.run``."""

from __future__ import annotations

import json
import logging
import math
import signal
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from rcm_nddr.config import Config
from rcm_nddr.engine import distributed
from rcm_nddr.engine.board import Board
from rcm_nddr.engine.builders import config_spec
from rcm_nddr.engine.calibration import keep_calibration_set
from rcm_nddr.engine.checkpoint import (
    CheckpointError,
    cause,
    checkpoint_state,
    load_checkpoint,
    model_state,
    rebuilt_record,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rcm_nddr.engine.evaluate import autocast, delta_mtl, eval_loader, evaluate, evaluation_record, to_json
from rcm_nddr.engine.fast import DevicePrefetcher, LossWindow, configure_backends, maybe_compile
from rcm_nddr.engine.run import RunExistsError, RunPaths, TrainingRun, build_run, finish_run, read_registration
from rcm_nddr.engine.sampler import ResumableSampler
from rcm_nddr.engine.signals import StopSignals, TrainingInterrupted, ignore_stop_signals
from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_write_text
from rcm_nddr.nn.accounting import format_breakdown, owned_by
from rcm_nddr.store import ModelStore, TaskRecord

# RunExistsError, RunPaths and TrainingInterrupted are imported from here by the commands
__all__ = ["NonFiniteLossError", "RunExistsError", "RunPaths", "Trainer", "TrainingInterrupted", "stored_group"]

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """A task's loss became NaN or infinite; training stops and the last good checkpoint is kept."""

    same_on_every_rank = True  # the losses are summed over the ranks: every rank finds the same value


#: what to do about an unreadable ``best.pt`` when registering
BEST_REMEDY = "delete it (the group is then registered from the last checkpoint) or set test.checkpoint: last"


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def stored_group(cfg: Config) -> tuple[list[TaskRecord], bool]:
    """The records the config's store holds under the names of the config's tasks, and whether they are
    this run's own registration: the whole group registered together, with this resolved config, and
    with the tensors the run registered (``runs/<group>/registered.json``; for a run registered before that
    file was written, those of the checkpoint that registering takes, ``test.checkpoint``). That is what a
    requeued ``--auto-resume`` job finds when its run had already ended."""
    store = ModelStore(cfg.store)
    records = [r for r in store.tasks if r.name in cfg.tasks] if store.exists else []
    if not records:
        return [], False
    together = [r.name for r in store.tasks if r.group == records[0].group]
    same_config = all(_canonical(r.config) == _canonical(cfg.to_dict()) for r in records)
    if sorted(together) != sorted(cfg.tasks) or len(records) != len(cfg.tasks) or not same_config:
        return records, False
    paths = RunPaths.of(cfg)
    registered = read_registration(paths)
    if registered is not None:  # the run wrote what it registered (and may have kept no checkpoint)
        return records, all(registered.get(r.name) == r.files.get(r.tensors_file) for r in records)
    which = paths.best if cfg.test.checkpoint == "best" and paths.best.is_file() else paths.last
    if not which.is_file():
        return records, False
    state = load_checkpoint(which)["model"]
    for r in records:
        stored = store.load_task_tensors(r.name)
        trained = {k: v for k, v in state.items() if owned_by(k, r.name)}
        if stored.keys() != trained.keys() or not all(torch.equal(stored[k], trained[k]) for k in stored):
            return records, False
    return records, True


class Trainer:
    """Trains the config's task group into its model store. ``fit()`` runs to ``train.max_iters`` (or
    stops early at ``stop_after`` iterations with a checkpoint, to be continued with ``resume=True``);
    ``register()`` then adds the group to the store; ``run()`` does both.

    Constructing a Trainer builds the run (``build_run``) and writes nothing: a refused config, plug-in,
    dataset or store leaves no file behind. The first ``fit()`` starts the run (``TrainingRun.start``):
    the store is created by the first run that names it (with this run's filter bank), and the run
    directory gets its config and provenance. ``shared_backbone`` trains one plain backbone shared by the
    group's tasks (pretraining), which registers nothing."""

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        shared_backbone: bool = False,
        replace: bool = False,
    ) -> None:
        self.setup: TrainingRun = build_run(
            cfg, resume=resume, overwrite=overwrite, shared_backbone=shared_backbone, replace=replace
        )
        s = self.setup
        self.cfg, self.dist, self.device, self.paths = cfg, s.dist, s.device, s.paths
        self.is_main = self.dist.is_main
        self.progress = progress and self.is_main
        self.train_set, self.val_set, self.tasks, self.plan = s.train_set, s.val_set, s.tasks, s.plan
        self.primaries = s.primaries
        self.model, self.optimizer, self.scheduler = s.model, s.optimizer, s.scheduler
        self.objective = s.objective  # the group objective (its weighting, consistency terms, shared layers)
        self.max_iters, self.parameter_counts = s.max_iters, s.parameter_counts
        t = cfg.train
        self.checkpoint_every = t.checkpoint_every or t.val_every
        self.iteration = 0
        self.best_score: float | None = None
        self.reference: dict[str, dict[str, float]] | None = None
        self.last_metrics: dict[str, dict[str, float]] | None = None
        self._signals = StopSignals()
        self._stop_requested = False
        self._rebuilt_record: dict[str, Any] | None = None
        if self.dist.enabled:
            # Every rank starts from the same weights (same seed); dropout and other draws differ per rank.
            torch.manual_seed(t.seed + 1_000_003 * self.dist.rank)
        if s.checkpoint is not None:
            self._restore(s.checkpoint)
        # The module the step runs: DDP averages the gradients of the ranks. Buffers (BatchNorm statistics,
        # the filter bank) are not broadcast every step; rank 0's are given to all before an evaluation.
        step_module: torch.nn.Module = (
            DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            if self.dist.enabled
            else self.model
        )
        configure_backends(self.device)
        # train.compile: the step and the validation run compiled code over the same parameters and buffers
        # (self.model stays the module that is checkpointed and registered)
        self.step_module = maybe_compile(step_module, t.compile)
        self.eval_module = maybe_compile(self.model, t.compile)
        log.info(
            "group %s: tasks %s%s, %d train / %d val samples, %d iterations on %s%s; parameters per task:\n%s",
            cfg.group_name,
            list(self.tasks),
            f" reading stored tasks {self.plan.frozen} (frozen)" if self.plan.frozen else "",
            len(self.train_set),
            len(self.val_set),
            self.max_iters,
            self.device,
            f" x {self.dist.world_size} processes" if self.dist.enabled else "",
            format_breakdown(self.parameter_counts),
        )

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            **checkpoint_state(self.model, self._rebuilt()),  # the model without the bank and stored tasks
            "objective": self.objective.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # every rank's generators (one entry per rank), so each rank resumes its own draws
            "rng": distributed.all_gather_objects(rng_state()),
            "world_size": self.dist.world_size,
            "best_score": self.best_score,
            "reference": self.reference,
            "last_metrics": self.last_metrics,
            "group": self.cfg.group_name,
            "plan": self.plan.to_dict(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        last, again = self.paths.last, "resume with the config that wrote it, or start over with --overwrite"
        keys = ("group", "iteration", "optimizer", "scheduler", "rng", "best_score", "reference", "last_metrics")
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"{last} is not a resumable checkpoint (no {', '.join(missing)}); {again}")
        if state["group"] != self.cfg.group_name:
            raise CheckpointError(f"{last} belongs to group {state['group']!r}, not {self.cfg.group_name!r}")
        objective = self.objective.objective
        if "objective" not in state and objective.state_dict():
            kind = self.cfg.weighting["type"]
            raise CheckpointError(f"{last} holds no state of the group objective ({kind}); {again}")
        try:
            self.model.load_state_dict(model_state(self.model, state, last, again))
            if "objective" in state:
                objective.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{last} does not fit the model of this config ({cause(exc)}); {again}") from exc
        rng = state["rng"]
        if isinstance(rng, dict):  # written by a version that saved one process's generators
            rng = [rng]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:
            log.warning(
                "%s was written by %d process(es), this run has %d: random draws (dropout) continue from fresh "
                "seeds; the data order and augmentations are unaffected",
                self.paths.last,
                len(rng),
                self.dist.world_size,
            )
        self.iteration = state["iteration"]
        self.best_score = state["best_score"]
        self.reference = state["reference"]
        self.last_metrics = state["last_metrics"]
        log.info("resumed %s at iteration %d", self.paths.last, self.iteration)

    def _rebuilt(self) -> dict[str, Any]:
        """What checkpoints record of the tensors they leave out (computed once: they never change)."""
        if self._rebuilt_record is None:
            self._rebuilt_record = rebuilt_record(self.model)
        return self._rebuilt_record

    def _save_last(self) -> None:
        state = self._state()  # a collective: every rank takes part, rank 0 writes
        if self.is_main:
            save_checkpoint(self.paths.last, state)

    # ------------------------------------------------------------------ loaders

    def _train_loader(self) -> DataLoader:
        t = self.cfg.train
        sampler = ResumableSampler(
            len(self.train_set),
            t.seed,
            start=self.iteration * t.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            batch_size=t.batch_size,
        )
        return DataLoader(
            self.train_set,
            batch_size=t.batch_size // self.dist.world_size,  # train.batch_size is the global batch
            sampler=sampler,
            num_workers=t.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=t.num_workers > 0,
            worker_init_fn=ignore_stop_signals,
            # A private generator: creating the loader must not consume the global RNG, or a resumed
            # run would draw different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(t.seed),
        )

    def val_loader(self) -> DataLoader:
        """The validation split in order (this rank's shard in a distributed run)."""
        return eval_loader(self.val_set, self.cfg.test.batch_size, self.cfg.train.num_workers, self.device)

    # ------------------------------------------------------------------ loop

    def fit(self, stop_after: int | None = None) -> dict[str, dict[str, float]] | None:
        """Start the run (its store and files, see ``TrainingRun.start``) and train until ``max_iters`` (or
        ``stop_after``); returns the last validation metrics.

        SIGTERM or SIGINT (a preempted job, Ctrl-C) lets the current iteration finish, writes the
        checkpoint ``--resume`` continues from and raises ``TrainingInterrupted``; a second signal
        stops at once. In a distributed run the ranks agree on stopping at the same iteration."""
        self.setup.start()
        end = self.max_iters if stop_after is None else min(stop_after, self.max_iters)
        board = Board(self.paths.run, enabled=self.is_main)
        self.model.train()
        bar = tqdm(total=end, initial=self.iteration, desc=f"train {self.cfg.group_name}", disable=not self.progress)
        window = LossWindow(self.objective.objective.log_names, self.device)
        self._stop_requested = False
        try:
            with self._signals:
                batches = DevicePrefetcher(self._train_loader(), self.device)
                while self.iteration < end:
                    self._iterate(batches, window, board, bar, end)
        finally:
            bar.close()
            board.close()
        if self.iteration == self.max_iters and self.is_main:
            weighting = self.objective.objective.weighting
            final = dict(zip(weighting.names, weighting.current().tolist(), strict=True))
            summary = {"iteration": self.iteration, "evaluation": evaluation_record(self.cfg.protocol, self.tasks)}
            summary["metrics"] = self.last_metrics
            summary["objective"] = {"weighting": self.cfg.weighting["type"], "weights": final}
            atomic_write_text(self.paths.run / "metrics.json", to_json(summary, indent=2))
        return self.last_metrics

    def _iterate(self, batches: DevicePrefetcher, window: LossWindow, board: Board, bar: tqdm, end: int) -> None:
        """One iteration, then what falls due after it: fetching the losses, validating, checkpointing,
        stopping on a signal."""
        try:
            batch = next(batches)
        except Exception:
            if self._signals.received is None or self.dist.enabled:
                raise
            # the signal also reached the loader's workers (e.g. one that was still starting)
            log.warning("the data loader stopped after the %s", signal.Signals(self._signals.received).name)
            self._stop_requested = True
        else:
            window.add(self.iteration + 1, self._step(batch))
            self.iteration += 1
            bar.update(1)
        if not self.dist.enabled and self._signals.received is not None:
            self._stop_requested = True  # one process: stop now; several: agreed at the next fetch
        validate = self.iteration % self.cfg.train.val_every == 0 or self.iteration == self.max_iters
        save = validate or self.iteration % self.checkpoint_every == 0 or self.iteration == end
        # Losses reach the host every log_every iterations, and before anything is validated or saved
        # (a NaN is caught before it can reach a checkpoint); every rank fetches at the same iterations.
        if save or self._stop_requested or self.iteration % self.cfg.train.log_every == 0:
            self._fetch_losses(window, board, bar)
        if validate and not self._stop_requested:
            self._validate(board)
        if save or self._stop_requested:
            self._save_last()
        if self._stop_requested:
            distributed.barrier()  # rank 0 has written the checkpoint before any rank exits
            raise TrainingInterrupted(self._signals.received or signal.SIGTERM, self.iteration, self.paths.last)

    # ------------------------------------------------------------------ step

    def _step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step: the group objective fills the gradients (``GroupObjective.step``), the
        optimizer steps, the objective updates its weighting. Returns the detached values of the objective's
        ``log_names`` (a vector on the device, not read here: the step never waits for the device)."""
        images = batch["image"].to(self.device, non_blocking=True, memory_format=torch.channels_last)

        def forward() -> dict[str, torch.Tensor]:
            with autocast(self.device, self.cfg.train.amp):
                return self.step_module(images, raw=True)

        outputs = forward()
        targets = {n: batch[task.target_key].to(self.device, non_blocking=True) for n, task in self.tasks.items()}
        context = self.objective.context(self.iteration + 1, forward, targets, images, [self.model])
        self.optimizer.zero_grad(set_to_none=True)
        values = self.objective.objective.step(outputs, targets, context, images)
        self.optimizer.step()
        self.objective.objective.after_step(context)
        self.scheduler.step()
        return values

    def _fetch_losses(self, window: LossWindow, board: Board, bar: tqdm) -> None:
        """The losses of the iterations since the last fetch, in one transfer (across ranks, one all-reduce
        that also carries the stop flag, so all ranks agree to stop at the same iteration). A NaN or
        infinite loss of any rank stops training naming its first iteration; TensorBoard gets the mean
        of each task's loss over the window."""
        if not window:
            return
        flag = 0.0 if self._signals.received is None else 1.0
        rows, (stops,) = window.fetch([flag])
        if stops > 0:
            self._stop_requested = True
        for iteration, values in rows:
            for name, value in values.items():
                if not math.isfinite(value):
                    what = f"the loss of task {name!r}" if name in self.tasks else f"the objective's {name!r}"
                    raise NonFiniteLossError(
                        f"{what} is {value} at iteration {iteration}; training stopped. "
                        f"The last good checkpoint is kept at {self.paths.last}"
                        + ("" if self.paths.last.exists() else " (none was written yet)")
                    )
        means = {name: sum(v[name] for _, v in rows) / len(rows) for name in window.names}
        losses = {name: means.pop(name) for name in self.tasks}
        # the total as the weighting saw it: each task's loss times its (mean) weight over the window
        losses["total"] = sum(means[f"weights/{name}"] * value for name, value in losses.items())
        board.scalars("loss", losses, self.iteration)
        board.scalars("", means, self.iteration)  # consistency/<term> and weights/<task>
        board.scalars("", {"lr": self.optimizer.param_groups[0]["lr"]}, self.iteration)
        bar.set_postfix(loss=f"{losses['total']:.4f}")

    def _validate(self, board: Board) -> None:
        # Every rank evaluates rank 0's model (its BatchNorm statistics) on its shard; the metrics are merged.
        distributed.broadcast_buffers(self.model)
        metrics = evaluate(
            self.eval_module,
            self.val_loader(),
            self.tasks,
            self.device,
            self.cfg.train.amp,
            self.progress,
            on_batch=board.predictions(self.tasks, self.iteration),
        )
        for name, values in metrics.items():
            board.scalars(f"val/{name}", values, self.iteration)
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
            if not self.is_main:
                return
            save_checkpoint(
                self.paths.best,
                {
                    "iteration": self.iteration,
                    **checkpoint_state(self.model, self._rebuilt()),
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
        validation metrics, model description and run environment (``env.json``). Earlier tasks and their
        files are not touched. In a distributed run rank 0 registers (once) while the others wait.

        The run directory records what was registered (``registered.json``); the run's checkpoints are then
        removed unless ``train.keep_checkpoints`` (the store, metrics and logs are what a finished run keeps)."""
        if self.setup.store is None:
            raise RuntimeError("a pretraining run registers nothing in a model store")
        if self.iteration < self.max_iters:
            raise RuntimeError(
                f"group {self.cfg.group_name!r} is trained to iteration {self.iteration} of {self.max_iters}; "
                "finish it (--resume) before registering it"
            )
        self.setup.start()  # a resumed run that was already at its end writes nothing before
        if not self.is_main:
            distributed.barrier()
            return []
        try:
            records = self._register()
            finish_run(self.paths, records, self.cfg.train.keep_checkpoints)
            return records
        finally:
            distributed.barrier()

    def _register(self) -> list[TaskRecord]:
        which = self.cfg.test.checkpoint
        if which == "best" and self.paths.best.is_file():
            saved = load_checkpoint(self.paths.best, remedy=BEST_REMEDY)
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
                    "source_pins": self.plan.source_pins(name),  # refused if a source was replaced since
                    "config": self.cfg.to_dict(),
                    "parameters": self.parameter_counts[name],
                    "metrics": {
                        "primary": key,
                        "split": self.cfg.dataset.val_split,
                        "checkpoint": f"{which} (iteration {iteration})",
                        "protocol": self.cfg.protocol,
                        "evaluation": dict(task.evaluation),
                        **(metrics or {}).get(name, {}),
                    },
                    # fusion.sources: auto: what was measured and chosen (rcm_nddr.engine.affinity)
                    "model": {**spec.model_description(), **self._auto_record(name)},
                    "dataset": spec.dataset,
                    "environment": self.setup.environment,
                }
            )
        store = self.setup.store
        probes = store.compute_probes(records, tensors)
        registered = store.register_group(records, tensors, probes, replace=self.setup.replace)  # the store logs it
        keep_calibration_set(self.cfg, store, self.train_set)  # int8's calibration crops, once per store
        return registered

    def _auto_record(self, name: str) -> dict[str, Any]:
        return {"sources_auto": self.plan.auto[name]} if name in self.plan.auto else {}

"""``rcm-nddr study``: many runs as one experiment. A study spec (YAML) names variants (a config, or a
sequence of configs trained into one store), the tasks that fill a config's ``{task}``, a grid of
overrides crossed with them (e.g. seeds) and the baseline variant of Delta_MTL. Every cell (variant x
task x grid point) trains and tests in its own store in the cells folder (``<out>/cells/`` unless the
spec names one), named by a hash of its resolved configs (less the keys at their schema default:
``rcm_nddr.schema.non_defaults``) and of the content of their ``backbone.weights``, so running the
study again skips finished cells and resumes interrupted ones. A spec naming a ``records`` folder keeps
every finished cell's result there too (one small JSON each, meant to be kept under version control): a
cell with a record is finished, on any machine or clone that has the record.
Cells run in local worker processes (one GPU each when there are several) or as submitit jobs (SLURM,
or its local executor); a failed cell is reported with its log and never stops the others. The results
are aggregated by ``rcm_nddr.commands.study_report``: one row per variant and setting (the grid point
less its replicate keys, the seeds)."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import queue
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from rcm_nddr.commands.study_report import report, validation_scalars
from rcm_nddr.commands.study_spec import Cell, Spec, StudyError, expand, load_spec, weights_identity
from rcm_nddr.config import load_config
from rcm_nddr.files import atomic_write_text
from rcm_nddr.nn.assembly import TaskSpec
from rcm_nddr.store import ModelStore
from rcm_nddr.store.format import STORE_FILE
from rcm_nddr.store.sharing import link_identical

log = logging.getLogger(__name__)


def run_cell(cell: Cell, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``cell`` (``_run_cell``) holding its lock: a study that shares the cell (the same ``cells``
    folder) and is running it meanwhile finishes it first, and its result is returned as it is."""
    cell.directory.mkdir(parents=True, exist_ok=True)
    with open(cell.directory / "cell.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if cell.finished():
            return cell.result()
        result = _run_cell(cell, env)
        cell.keep_record()
        return result


def _run_cell(cell: Cell, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Train and test every step of ``cell`` into its store (``--auto-resume``: an interrupted cell goes on
    from its checkpoint), then write and return its result. A failing step raises ``CellError``."""
    store, logfile = cell.directory / "store", cell.directory / "cell.log"
    resumed = any(store.glob("checkpoints/*/last.pt"))
    start, training = time.monotonic(), 0.0
    with open(logfile, "a") as out:
        for step in cell.steps:
            sets = [x for o in [f"store={store}", *step.overrides] for x in ("--set", o)]
            for command in (["train", "--auto-resume"], ["test"]):
                argv = [sys.executable, "-m", "rcm_nddr", *command, "--config", step.config, "--quiet", *sets]
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                began = time.monotonic()
                done = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=None if env is None else dict(env)
                )
                if command[0] == "train":
                    training += time.monotonic() - began
                if done.returncode != 0:
                    raise CellError(cell, f"{command[0]} of {step.config} exited with status {done.returncode}")
    result = collect(cell, store, time.monotonic() - start, resumed)
    # the training processes' wall time (their start-up included) per iteration
    result["training_seconds"] = training
    result["seconds_per_iteration"] = training / result["iterations"] if result["iterations"] else None
    atomic_write_text(cell.result_file, json.dumps(result, indent=2))
    return result


class CellError(RuntimeError):
    def __init__(self, cell: Cell, message: str) -> None:
        super().__init__(f"{cell.name}: {message}; log: {cell.directory / 'cell.log'}")
        self.cell = cell


def inference_flops(store: Path, tasks: list[str], size: tuple[int, int]) -> dict[str, int | None]:
    """Per task, the FLOPs of one ``size`` image through the store's deploy form of the task with the stored
    tasks it reads (what serving it alone costs). A task that cannot be loaded or counted is None, with a
    warning: the cell's training stays valid."""
    image = torch.zeros(1, 3, *size)
    out: dict[str, int | None] = {}
    for task in tasks:
        try:
            model = ModelStore(store).load_model(tasks=[task], device="cpu", deploy=True)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(image, raw=True)
            out[task] = int(counter.get_total_flops())
        except Exception as exc:  # noqa: BLE001 - a count that failed is reported, not fatal
            log.warning("%s: FLOPs of %s not counted: %s", store, task, exc)
            out[task] = None
    return out


def collect(cell: Cell, store: Path, seconds: float, resumed: bool) -> dict[str, Any]:
    """A finished cell's result: every task's test metrics, primary metric and direction, how it was
    scored, its parameters (trainable, and with the shared filter bank), its inference FLOPs per task, the
    tasks each task reads, stored ones and group mates (with ``fusion.sources: auto``'s measurement), the
    bank it read, the iterations and the time."""
    records = ModelStore(store).tasks
    metrics, evaluation, primary, parameters, sources, iterations = {}, {}, {}, {}, {}, 0
    configs = [load_config(s.config, s.overrides) for s in cell.steps]
    weights = {c.backbone.weights: weights_identity(c.backbone.weights, {}) for c in configs}
    for group in dict.fromkeys("+".join(c.tasks) for c in configs):
        tested = json.loads((store / "runs" / group / "test_metrics.json").read_text())
        metrics.update(tested["metrics"])
        for name, switches in tested.get("evaluation", {}).get("switches", {}).items():
            evaluation[name] = {"protocol": tested["evaluation"]["protocol"], "switches": switches}
        iterations += int(tested["iteration"])
    for record in records:
        if record.name in metrics:
            metric = TaskSpec.from_record(record).build_task().metric()
            primary[record.name] = [metric.primary, metric.higher_is_better]
            trainable = record.trainable_parameters
            parameters[record.name] = {
                "trainable": trainable,
                "total": trainable + record.parameters.get("filter_bank", 0),
            }
            sources[record.name] = {"read": list(record.sources), "auto": record.model.get("sources_auto")}
    return {
        "cell": cell.name,
        "key": cell.key,
        "variant": cell.variant,
        "task": cell.task,
        "point": cell.point,
        "steps": [asdict(s) for s in cell.steps],
        "metrics": metrics,
        "primary": primary,
        "evaluation": evaluation,
        "parameters": parameters,
        "sources": sources,
        "inference_flops": inference_flops(store, list(parameters), tuple(configs[0].dataset.crop)),
        # the runs' validation scalars, {tag: [[iteration, value], ...]}: the report's curves without the store
        "validation": {tag: sorted(points.items()) for tag, points in validation_scalars(cell.directory).items()},
        "weights": {str(k): v for k, v in weights.items()},  # backbone.weights -> its sha256 (None: no file)
        "iterations": iterations,
        "seconds": seconds,
        "resumed": resumed,
    }


def run_local(cells: list[Cell], workers: int, gpus: int, bar: tqdm) -> list[str]:
    """Run ``cells`` in ``workers`` threads, each driving one cell's processes; with ``gpus`` > 1 each
    running cell sees one GPU (``CUDA_VISIBLE_DEVICES``). The cores are shared out between the workers."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    free: queue.Queue[int | None] = queue.Queue()
    for slot in range(gpus) if gpus > 1 else [None] * workers:
        free.put(slot)

    def one(cell: Cell) -> dict[str, Any]:
        slot = free.get()
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        try:
            return run_cell(cell, env)
        finally:
            free.put(slot)

    failures: list[str] = []
    with ThreadPoolExecutor(max(workers, gpus if gpus > 1 else 1)) as pool:
        pending: set[Future] = {pool.submit(one, cell) for cell in cells}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                _settle(future.exception(), failures, bar)
    return failures


def run_submitit(cells: list[Cell], spec: Spec, cluster: str | None, bar: tqdm) -> list[str]:
    """Run ``cells`` as submitit jobs: on SLURM (``cluster`` None: submitit's detection) with the spec's
    ``slurm`` parameters, or with submitit's local executor (``cluster="local"``)."""
    try:
        import submitit  # noqa: PLC0415 - an optional dependency, needed by this executor only
    except ImportError as exc:
        raise StudyError("--executor slurm needs submitit: pip install 'rcm-nddr[cluster]'") from exc
    executor = submitit.AutoExecutor(folder=str(spec.out / "submitit"), cluster=cluster)
    executor.update_parameters(**{"timeout_min": 24 * 60, **spec.slurm})
    jobs = {executor.submit(run_cell_job, cell): cell for cell in cells}
    failures: list[str] = []
    waiting = list(jobs)
    while waiting:
        time.sleep(1.0)
        for job in [j for j in waiting if j.done()]:
            waiting.remove(job)
            try:
                message = job.result()
            except Exception as exc:  # the job itself failed (killed, out of time, ...): submitit's report
                first = str(exc).strip().splitlines()[0]
                message = f"{jobs[job].name}: job {job.job_id} failed ({first}); logs: {job.paths.stderr}"
            _settle(message, failures, bar)
    return failures


def run_cell_job(cell: Cell) -> str | None:
    """``run_cell`` as a submitit job: a failed cell comes back as its message, not as an exception."""
    try:
        run_cell(cell)
    except CellError as exc:
        return str(exc)
    return None


def _settle(error: BaseException | str | None, failures: list[str], bar: tqdm) -> None:
    """Count a finished cell; a failure is logged and kept (its message names the cell and its log)."""
    if error is not None:
        failures.append(str(error))
        log.error("%s", failures[-1])
    bar.update(1)
    bar.set_postfix(failed=len(failures))


def run_order(cells: list[Cell], spec: Spec) -> list[Cell]:
    """``cells`` with the first replicate (seed) of every variant and setting first, then the second...: a
    study stopped halfway has whole replicates to compare, not some variants' every seed. Within a
    replicate, cells of more training runs (sequences) start first: started last, a sequence of four
    runs would leave the other workers idle while it finishes."""

    def rank(cell: Cell) -> tuple[int, ...]:
        replicate = tuple(spec.grid[k].index(cell.point[k]) for k in spec.replicates if k in cell.point)
        return (*replicate, -len(cell.steps))

    return sorted(cells, key=rank)  # stable: the spec's order among cells of a replicate and a length


def main(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    cells = expand(spec)
    todo = run_order([c for c in cells if not c.finished()], spec)
    log.info(
        "study %s: %d cells, %d finished, %d to run (%s)",
        spec.path,
        len(cells),
        len(cells) - len(todo),
        len(todo),
        spec.out,
    )
    if args.dry_run:
        for cell in cells:
            state = "todo" if not cell.finished() else "done" if cell.result_file.is_file() else "done (record)"
            sys.stdout.write(f"{state}  {cell.name}  {cell.point}\n")
        return 0
    failures: list[str] = []
    if todo and not args.report_only:
        with tqdm(total=len(todo), desc="cells", disable=args.quiet, dynamic_ncols=True) as bar:
            if args.executor == "local":
                gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
                failures = run_local(todo, args.workers, gpus, bar)
            else:
                failures = run_submitit(todo, spec, "local" if args.executor == "submitit-local" else None, bar)
    finished = [c for c in cells if c.finished()]
    for cell in finished:  # (cells finished before the spec named its records folder, or by another study)
        cell.keep_record()
    stores = [c.directory / "store" for c in finished if (c.directory / "store" / STORE_FILE).is_file()]
    shared = link_identical(stores)  # one bank, decomposition and calibration set on disk, not one per cell
    if shared.linked:
        log.info(
            "%d identical files of the cells' stores hard-linked: %.0f MB freed",
            len(shared.linked),
            shared.freed_bytes / 1e6,
        )
    results = [c.result() for c in finished]
    markdown = report(spec, results, spec.out)
    sys.stdout.write(markdown + "\n")
    if failures:
        sys.stderr.write(f"{len(failures)} of {len(todo)} cells failed:\n" + "".join(f"  {f}\n" for f in failures))
        return 1
    return 0

"""The main job, offline on a CPU: the incremental story on SYNTH_MT.

Generate SYNTH_MT when missing, pretrain a filter bank on it (or reuse it), then train the tasks of the
incremental sequence (``configs/synthetic/incremental/*.yaml``, in name order) into one model store: a
first group of two tasks fused by NDDR, then one task per step, each reading every task before it
one-way, with ``store verify`` (sha256s and probe outputs of every stored task) after each step. For
comparison every task is also trained as its fully fine-tuned single-task baseline
(``<task>_single_task.yaml``) and as a reparameterized task alone (``<task>_RC_RI_NFF.yaml``). The
table gives each task's primary metric for the trivial predictor and the three variants, Delta_MTL
against the baselines, and the trainable parameters each variant adds per task."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rcm_nddr.commands import arguments as a
from rcm_nddr.config import Config, load_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine.builders import build_dataset, make_decomposition
from rcm_nddr.engine.evaluate import delta_mtl, evaluate_trivial, primary_metrics, to_json
from rcm_nddr.engine.pretrain import describe_bank, pretrain, read_recipe
from rcm_nddr.engine.run import RunPaths, remove_checkpoints
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.files import atomic_write_text
from rcm_nddr.source import source_tree
from rcm_nddr.store import ModelStore, StoreError
from rcm_nddr.store.sharing import link_identical

log = logging.getLogger(__name__)

BASELINE, VARIANT, FUSED = "single_task", "RC_RI_NFF", "RC_RI_NFF_NDDR"
INCREMENTAL = "incremental"
BENCHMARK_SPEC = "studies/synth_mt_4000.yaml"  # the multi-seed figures the demo points to


def default_configs() -> Path:
    """``configs/synthetic`` of the source tree, else of the current directory."""
    here = source_tree() / "configs" / "synthetic"
    return here if here.is_dir() else Path("configs/synthetic")


def run_demo(
    out: str | Path = a.DEMO_OUT,
    data: str | Path = a.DEMO_DATA,
    bank: str | Path = a.DEMO_BANK,
    configs: str | Path | None = None,
    n_train: int = a.DEMO_TRAIN,
    n_val: int = a.DEMO_VAL,
    size: tuple[int, int] = a.DEMO_SIZE,
    max_iters: int = a.DEMO_ITERS,
    pretrain_iters: int = a.DEMO_PRETRAIN_ITERS,
    progress: bool = True,
    lanes: int | None = None,
) -> dict:
    """Run the demo; return ``{"rows": [...], "delta_mtl": {...}, "steps": [...]}`` (also written to
    ``<out>/demo_results.json``, and the table to ``<out>/demo_results.md``). ``lanes``: how many runs
    train at once, each in its own process (default ``default_lanes()``; 1: one after the other, here)."""
    start = time.monotonic()
    out = Path(out)
    configs = Path(configs) if configs is not None else default_configs()
    steps = sorted((configs / INCREMENTAL).glob("*.yaml"))
    if not steps or not (configs / "pretrain.yaml").is_file():
        raise FileNotFoundError(f"{configs} needs pretrain.yaml and the incremental sequence in {INCREMENTAL}/*.yaml")
    # On a CPU a sample loads in ~2 ms, ~1% of a training step: worker processes would only compete
    # with the model for the cores.
    common = [f"dataset.root={data}", f"dataset.crop=[{size[0]}, {size[1]}]", "train.num_workers=0"]
    bank = Path(bank)
    decomposition = bank.with_name(bank.stem + "_ri.safetensors")  # what the synthetic configs name
    schedule = [
        f"train.max_iters={max_iters}",
        "train.epochs=null",
        f"train.val_every={max_iters}",
        f"backbone.weights={bank}",
        f"backbone.decomposition={decomposition}",
    ]

    def config(path: Path, store: str) -> Config:
        return load_config(path, [*common, *schedule, f"store={out / store}"])

    sequence = [config(p, INCREMENTAL) for p in steps]
    names = [t for cfg in sequence for t in cfg.tasks]
    for name in names:
        for variant in (BASELINE, VARIANT):
            if not (configs / f"{name}_{variant}.yaml").is_file():
                raise FileNotFoundError(f"{configs / f'{name}_{variant}.yaml'} is missing (task {name} of {steps})")

    generate(data, n_train, n_val, size=size, seed=0, progress=progress)
    if bank.is_file():
        log.info("reusing the pretrained filter bank %s", describe_bank(bank))
    else:
        log.info(
            "no filter bank at %s: pretraining a quick one (%d iterations on %s); `make bank` makes the longer "
            "recipe of configs/synthetic/pretrain.yaml, which the SYNTH_MT benchmark uses",
            bank,
            pretrain_iters,
            data,
        )
        cfg = load_config(
            configs / "pretrain.yaml",
            [*common, f"store={out / 'pretrain'}", f"train.max_iters={pretrain_iters}", "train.epochs=null"],
        )
        pretrain(cfg, bank, overwrite=True, progress=progress)
        if not cfg.train.keep_checkpoints:  # the bank is written: its run's checkpoints serve nothing more
            remove_checkpoints(RunPaths.of(cfg))
        decomposition.unlink(missing_ok=True)  # made for the bank this one replaces; made again below
    log.info("filter bank ready (%.0f s)", time.monotonic() - start)
    for store in (BASELINE, VARIANT, INCREMENTAL):  # the demo's own stores start empty on every run
        shutil.rmtree(out / store, ignore_errors=True)
    if not decomposition.is_file():  # made once, here, for every RC run of both lanes
        log.info("computing the decomposition of the bank's responses for RI: %s", decomposition)
        make_decomposition(config(configs / f"{names[0]}_{VARIANT}.yaml", VARIANT), decomposition, progress=progress)

    # The incremental sequence (the longest job) first, then every task's baseline and RC run: in two
    # lanes where the machine has two cores or more (one process each, half the cores each).
    sequence_job = (_train_sequence, ([str(p) for p in steps], [*common, *schedule], str(out / INCREMENTAL)))
    jobs = [sequence_job]
    for name in names:
        for variant in (BASELINE, VARIANT):
            overrides = [*common, *schedule, f"store={out / variant}"]
            jobs.append((_train_variant, (str(configs / f"{name}_{variant}.yaml"), overrides, name, variant)))
    results = _run_jobs(jobs, lanes if lanes is not None else default_lanes(), progress)
    step_log, records = results[0]
    rows = {name: {"task": name} for name in names}
    for (_, (_, _, name, _)), result in zip(jobs[1:], results[1:], strict=True):
        rows[name].update(result)
    for name, record in records.items():
        row = rows[name]
        row[FUSED] = record["metrics"][row["metric"]]
        row[f"{FUSED}_parameters"] = record["parameters"]
        row["reads"] = record["sources"]

    rows_list = [rows[n] for n in names]
    overall = {}
    for variant in (VARIANT, FUSED):
        for r in rows_list:
            r[f"delta_{variant}"] = _delta([r], variant)
        overall[variant] = _delta(rows_list, variant)
    # The three stores hold one bank, decomposition and calibration set: one copy on disk, hard-linked (the
    # decomposition also with the one beside the bank, which the RC runs copied into their stores)
    shared = link_identical([out / store for store in (BASELINE, VARIANT, INCREMENTAL)], sources=[decomposition])
    log.info("the stores' identical files hard-linked: %.0f MB freed", shared.freed_bytes / 1e6)
    recipe = read_recipe(bank)
    summary = {
        "rows": rows_list,
        "delta_mtl": overall,
        "steps": step_log,
        "bank": recipe,
        "seconds": round(time.monotonic() - start),
    }
    table = format_table(rows_list, overall, max_iters, describe_bank(bank, recipe))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo_results.json", to_json(summary, indent=2))
    atomic_write_text(out / "demo_results.md", table + "\n")
    log.info("demo finished in %.0f s; results in %s", time.monotonic() - start, out)
    print(table)  # noqa: T201 - the demo's result is this table on stdout
    return summary


def _cores() -> int:
    """The cores this process may run on (all of the machine's where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_lanes() -> int:
    """Two runs at once where this process may use two cores or more, else one: on a 2-core CPU two
    single-threaded runs side by side finish sooner than two two-threaded runs in turn (0.79x, docs/demo.md):
    part of every run is single-threaded (loading samples, the edge benchmark's matching), and the rest
    does not keep two threads busy at batch 8 of 128 x 128."""
    return 2 if _cores() >= 2 else 1


def _lane_setup(threads: int, level: int) -> None:
    """A lane process: its share of the cores, and the command's log format and level."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format=a.LOG_FORMAT, datefmt=a.LOG_DATEFMT)


def _run_jobs(jobs: list[tuple[Callable[..., Any], tuple]], lanes: int, progress: bool) -> list[Any]:
    """Each ``(function, args)`` of ``jobs`` called as ``function(*args, progress=...)``; their results in
    order. With ``lanes`` > 1 they run in that many spawned processes sharing the cores (a job's own
    progress bars are off there: one bar counts the finished jobs); a failure stops the jobs not started
    and is raised here."""
    if lanes <= 1:
        return [function(*args, progress=progress) for function, args in jobs]
    threads = max(1, _cores() // lanes)
    log.info("training %d runs in %d lanes of %d thread(s)", len(jobs), lanes, threads)
    context = multiprocessing.get_context("spawn")
    setup = (threads, logging.getLogger().getEffectiveLevel())
    with ProcessPoolExecutor(lanes, mp_context=context, initializer=_lane_setup, initargs=setup) as pool:
        futures = [pool.submit(function, *args, progress=False) for function, args in jobs]
        try:
            with tqdm(total=len(futures), desc="demo runs", disable=not progress, dynamic_ncols=True) as bar:
                for future in as_completed(futures):
                    future.result()
                    bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [future.result() for future in futures]


def _train_variant(path: str, overrides: list[str], name: str, variant: str, progress: bool) -> dict[str, Any]:
    """Train task ``name`` alone as ``variant`` (a fresh store); its row's entries for that variant: the
    primary metric after training (one validation, at the end: what test.py reports for the registered
    checkpoint), parameters, seconds, and for the baseline the trivial predictor's metric."""
    t0 = time.monotonic()
    cfg = load_config(path, overrides)
    trainer = Trainer(cfg, overwrite=True, progress=progress)
    trainer.run()
    key, higher = primary_metrics(trainer.tasks)[name]
    row = {
        "metric": key,
        "higher_is_better": higher,
        variant: trainer.last_metrics[name][key],
        f"{variant}_parameters": trainer.parameter_counts[name]["total"],
    }
    if variant == BASELINE:
        # The trainer's tasks and validation set serve as they are; only the train split is read again,
        # without augmentation, to fit the trivial predictor.
        train_set = build_dataset(cfg, cfg.dataset.train_split, train=False)
        row["trivial"] = evaluate_trivial(trainer.tasks, train_set, trainer.val_set, cfg.test.batch_size)[name][key]
    row[f"{variant}_seconds"] = round(time.monotonic() - t0, 1)
    return row


def _train_sequence(
    paths: list[str], overrides: list[str], store_path: str, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Train the incremental sequence into the store at ``store_path``, ``store verify`` after each step.
    Returns each step's log and, per task, its metrics, trainable parameters and the tasks it reads."""
    store = ModelStore(store_path)
    step_log, records = [], {}
    for path in paths:
        t0, step = time.monotonic(), Path(path).name
        cfg = load_config(path, [*overrides, f"store={store_path}"])
        trainer = Trainer(cfg, overwrite=True, progress=progress)
        registered = trainer.run()
        problems = store.verify()
        if problems:
            raise StoreError(f"store verify after {step}: " + "; ".join(problems))
        stored = [t.name for t in store.tasks]
        log.info("step %s: %s registered; store verify: ok (%d tasks: %s)", step, cfg.tasks, len(stored), stored)
        step_log.append(
            {
                "config": step,
                "tasks": cfg.tasks,
                "reads": trainer.plan.frozen,
                "seconds": round(time.monotonic() - t0, 1),
                "verified": stored,
            }
        )
        for record in registered:
            records[record.name] = {
                "metrics": record.metrics,
                "parameters": record.trainable_parameters,
                "sources": record.sources,
            }
    return step_log, records


def _delta(rows: list[dict], variant: str) -> float:
    """Delta_MTL of ``variant`` against the single-task baselines over ``rows``."""
    return delta_mtl(
        {r["task"]: {r["metric"]: r[variant]} for r in rows},
        {r["task"]: {r["metric"]: r[BASELINE]} for r in rows},
        {r["task"]: (r["metric"], r["higher_is_better"]) for r in rows},
    )


def format_table(rows: list[dict], overall: dict[str, float], iterations: int, bank: str = "") -> str:
    lines = [
        f"| task | reads | metric | trivial | {BASELINE} | {VARIANT} | {FUSED} | Delta {VARIANT} (%) | "
        f"Delta {FUSED} (%) | params {BASELINE} | params {VARIANT} | params {FUSED} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        arrow = "higher is better" if r["higher_is_better"] else "lower is better"
        lines.append(
            f"| {r['task']} | {', '.join(r['reads']) or '-'} | {r['metric']} ({arrow}) | {r['trivial']:.4g} | "
            f"{r[BASELINE]:.4g} | {r[VARIANT]:.4g} | {r[FUSED]:.4g} | {r[f'delta_{VARIANT}']:+.1f} | "
            f"{r[f'delta_{FUSED}']:+.1f} | {r[f'{BASELINE}_parameters']:,} | {r[f'{VARIANT}_parameters']:,} | "
            f"{r[f'{FUSED}_parameters']:,} |"
        )
    lines.append("")
    for variant, value in overall.items():
        lines.append(f"Delta_MTL of {variant} against the single-task baselines: {value:+.2f}%")
    if bank:
        lines.append(f"filter bank: {bank}")
    lines.append(
        f"(one seed, {iterations} iterations per model: differences of a few points lie within the run-to-run "
        f"spread; the multi-seed figures are the SYNTH_MT benchmark's, `rcm-nddr study --spec {BENCHMARK_SPEC}` "
        "(README: Studies))"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    run_demo(
        out=args.out,
        data=args.data,
        bank=args.bank,
        configs=args.configs,
        n_train=args.train,
        n_val=args.val,
        size=tuple(args.size),
        max_iters=args.iters,
        pretrain_iters=args.pretrain_iters,
        progress=not args.quiet,
        lanes=args.lanes,
    )
    return 0

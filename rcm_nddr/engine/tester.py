"""Evaluate a trained task group on a split: metrics JSON beside the run and an optional CSV log."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rcm_nddr.config import Config, ConfigError, check_paths
from rcm_nddr.engine import distributed, provenance
from rcm_nddr.engine.builders import build_dataset, build_tasks, resolve_device
from rcm_nddr.engine.evaluate import (
    check_same_evaluation,
    delta_mtl,
    eval_loader,
    evaluate,
    evaluation_record,
    primary_metrics,
    to_json,
)
from rcm_nddr.engine.evaluated import evaluated_network
from rcm_nddr.engine.fast import configure_backends, maybe_compile
from rcm_nddr.engine.run import RunPaths
from rcm_nddr.engine.saved import PredictionWriter
from rcm_nddr.files import atomic_write_text
from rcm_nddr.store import ModelStore

log = logging.getLogger(__name__)

CSV_FIELDS = [
    "config",
    "store",
    "group",
    "task",
    "split",
    "checkpoint",
    "iteration",
    "protocol",
    "evaluation",
    "primary",
    "value",
    "metrics",
]


def run_test(
    cfg: Config,
    split: str | None = None,
    checkpoint: str | None = None,
    log_performance: str | Path | None = None,
    progress: bool = True,
    save_predictions: str | Path | None = None,
    baselines: str | Path | None = None,
    form: str = "deploy",
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Evaluate the config's task group; write ``test_metrics.json`` in the run directory and append one
    CSV row per task to ``log_performance`` (header when the file is new).

    What is evaluated (``rcm_nddr.engine.evaluated``): the group as the store registers it, which is what
    ``rcm-nddr predict`` runs, when it was registered from the ``test.checkpoint`` checkpoint; else, or
    when ``checkpoint`` (best or last) is given, the run's checkpoint. ``form``: ``deploy`` (default: the
    inference form, checked on the probe input) or ``training`` (the network as trained). ``precision``:
    of the deploy form (fp32, bf16 or int8; ``rcm_nddr.nn.precision``), checked within its tolerance.

    ``save_predictions``: also write every prediction to ``<dir>/<task>/<sample id>.png|.npy`` (the
    layout ``rcm-nddr evaluate`` reads). ``baselines`` (default ``test.baselines``): a model store or a
    JSON file with single-task results; Delta_MTL against them is logged and written to the JSON.
    The JSON also records the run environment (``environment``, as in ``env.json``).

    Under ``torchrun`` every process evaluates a shard of the split and the metrics are merged; rank 0
    writes the JSON and the CSV, and each rank writes the predictions of its own samples."""
    check_paths(cfg)
    baselines = baselines if baselines is not None else cfg.test.baselines
    # read the baselines first: a wrong path should fail before a long evaluation, not after
    baseline_metrics, baseline_evaluation = load_baselines(baselines, cfg.tasks) if baselines else (None, {})
    if log_performance is not None:
        check_csv_header(log_performance)
    split = split or cfg.dataset.val_split
    which = checkpoint or cfg.test.checkpoint
    paths = RunPaths.of(cfg)
    dataset = build_dataset(cfg, split, train=False)
    tasks = build_tasks(cfg, dataset.info)
    scored = evaluation_record(cfg.protocol, tasks)
    if baseline_metrics is not None:
        check_same_evaluation(scored, baseline_evaluation, tasks, str(baselines))
    ctx = distributed.context()
    device = distributed.process_device(cfg.train.device, ctx) or resolve_device(cfg.train.device)
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"--precision int8 runs on the CPU (x86), not on {device}: use bf16 on a GPU")
    tested = evaluated_network(cfg, tasks, which, explicit=checkpoint is not None, form=form, precision=precision)
    # channels_last: NHWC convolutions are ~25% faster on CPU and the fast layout on GPUs too.
    model = tested.model.to(device, memory_format=torch.channels_last)
    configure_backends(device)
    loader = eval_loader(dataset, cfg.test.batch_size, cfg.train.num_workers, device)
    writer = PredictionWriter(save_predictions, tasks) if save_predictions is not None else None
    evaluated = maybe_compile(model, cfg.test.compile)  # the same parameters; compiled code when asked for
    metrics = evaluate(evaluated, loader, tasks, device, cfg.train.amp, progress and ctx.is_main, on_batch=writer)
    written = sum(distributed.all_gather_objects(writer.count if writer is not None else 0))
    if not ctx.is_main:
        return metrics
    environment = provenance.collect(cfg)
    result: dict[str, Any] = {
        "config": cfg.source,
        "group": cfg.group_name,
        "split": split,
        "form": tested.form,
        "precision": tested.precision,
        "source": tested.source,
        "checkpoint": which,
        "iteration": tested.iteration,
        "evaluation": scored,
        "metrics": metrics,
        "environment": environment,
    }
    primaries = primary_metrics(tasks)
    for name, values in metrics.items():
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "/" not in k))
    if baseline_metrics is not None:
        result["delta_mtl"] = delta_report(metrics, baseline_metrics, primaries, str(baselines))
        log.info(
            "Delta_MTL vs %s: %+.2f%% (%s)",
            baselines,
            result["delta_mtl"]["value"],
            ", ".join(f"{k} {v:+.2f}%" for k, v in result["delta_mtl"]["per_task"].items()),
        )
    if writer is not None:
        atomic_write_text(Path(save_predictions) / "env.json", to_json(environment, indent=2))
        log.info("%d predictions per task written to %s", written, save_predictions)
    atomic_write_text(paths.run / "test_metrics.json", to_json(result, indent=2))
    if log_performance is not None:
        append_csv(
            log_performance,
            [
                {
                    "config": cfg.source,
                    "store": cfg.store,
                    "group": cfg.group_name,
                    "task": name,
                    "split": split,
                    "checkpoint": which,
                    "iteration": tested.iteration,
                    "protocol": cfg.protocol,
                    "evaluation": to_json(scored["switches"][name], sort_keys=True),
                    "primary": primaries[name][0],
                    "value": f"{values[primaries[name][0]]:.6g}",
                    "metrics": to_json(values, sort_keys=True),
                }
                for name, values in metrics.items()
            ],
        )
    return metrics


def check_csv_header(path: str | Path) -> None:
    """A CSV log written before its columns changed cannot take the new rows: refused before evaluating."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != CSV_FIELDS:
        raise ConfigError(
            f"--log-performance {path}: its columns {header} are not this version's {CSV_FIELDS} (which record "
            "the evaluation protocol); log to a new file"
        )


def append_csv(path: str | Path, rows: list[dict[str, object]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def load_baselines(
    source: str | Path, task_names: Sequence[str]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any] | None]]:
    """Single-task results of ``task_names`` from a model store (each record's metrics) or a JSON file:
    ``{task: {metric: value}}``, or a ``test_metrics.json`` (its ``metrics``); and how each was scored
    (``{protocol, switches}`` as recorded, None where nothing is recorded)."""
    source = Path(source)
    evaluation: dict[str, dict[str, Any] | None] = {}
    if (source / "store.yaml").is_file():
        records = {record.name: record.metrics for record in ModelStore(source).tasks}
        for name, metrics in records.items():
            if "protocol" in metrics:
                evaluation[name] = {"protocol": metrics["protocol"], "switches": metrics.get("evaluation") or {}}
        what = f"model store {source}"
    elif source.is_file():
        try:
            data = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"baselines file {source}: not readable JSON ({exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            scored = data.get("evaluation")
            if isinstance(scored, dict) and isinstance(scored.get("switches"), dict):
                protocol = scored.get("protocol")
                evaluation = {n: {"protocol": protocol, "switches": v} for n, v in scored["switches"].items()}
            data = data["metrics"]
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ConfigError(
                f"baselines file {source}: expected a JSON object {{task: {{metric: value}}}} "
                "or a test_metrics.json written by test.py"
            )
        records, what = data, f"baselines file {source}"
    else:
        raise ConfigError(f"baselines {source}: neither a model store (no store.yaml) nor a JSON file")
    missing = [name for name in task_names if name not in records]
    if missing:
        raise ConfigError(
            f"{what} has no result for task(s) {', '.join(missing)} (it has: {', '.join(records) or 'none'})"
        )
    return {name: dict(records[name]) for name in task_names}, {name: evaluation.get(name) for name in task_names}


def delta_report(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, Any]],
    primaries: Mapping[str, tuple[str, bool]],
    source: str,
) -> dict[str, Any]:
    """Delta_MTL over the group and each task's own term (percent), with what it was computed from."""
    for name, (key, _) in primaries.items():
        value = baselines[name].get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"baselines {source}: task {name!r} has no numeric {key!r} (its primary metric)")
    per_task = {name: delta_mtl(metrics, baselines, {name: primaries[name]}) for name in primaries}
    return {
        "value": delta_mtl(metrics, baselines, primaries),
        "per_task": per_task,
        "primary": {name: key for name, (key, _) in primaries.items()},
        "baselines": {name: baselines[name][key] for name, (key, _) in primaries.items()},
        "source": source,
    }

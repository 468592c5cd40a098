"""``rcm-nddr evaluate``: score predictions saved as files against a dataset split with a task's metric,
without the model (the files ``test.py --save-predictions`` writes, or another code's outputs in
the same layout; see ``rcm_nddr.engine.saved``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import yaml

from rcm_nddr.engine.builders import dataset_evaluation
from rcm_nddr.engine.evaluate import describe_switches, to_json
from rcm_nddr.engine.saved import evaluate_saved
from rcm_nddr.errors import UserError
from rcm_nddr.registry import DATASETS, TASKS, RegistryError, discover, options_error
from rcm_nddr.yamlio import load_yaml

log = logging.getLogger(__name__)


class EvaluateError(UserError):
    """Bad ``rcm-nddr evaluate`` arguments: an unknown dataset, task or option."""


def parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, values parsed as YAML (``7`` is an int, ``0.01`` a float)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise EvaluateError(f"{flag} {item!r}: expected key=value, e.g. {flag} classes=7")
        try:
            options[key.strip()] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise EvaluateError(f"{flag} {item!r}: value is not valid YAML ({exc})") from exc
    return options


def evaluate_folder(
    dataset_name: str,
    root: str,
    split: str,
    task_name: str,
    pred: str,
    dataset_options: dict[str, Any] | None = None,
    task_options: dict[str, Any] | None = None,
    plugins: list[str] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    protocol: str = "project",
    switches: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the dataset split and the task (task name = task type), its metric following ``protocol``
    and ``switches``, score the folder, and return ``{dataset, root, split, task, pred, samples, evaluation,
    metrics}`` (``evaluation``: the protocol and the value of every switch)."""
    discover(plugins or [])
    try:
        dataset_cls, task_cls = DATASETS.get(dataset_name), TASKS.get(task_name)
    except RegistryError as exc:
        raise EvaluateError(str(exc)) from exc
    dataset_options, task_options = dict(dataset_options or {}), dict(task_options or {})
    error = options_error(dataset_cls, (root, split, [task_cls.target_key], None), dataset_options)
    if error:
        raise EvaluateError(f"--option of dataset {dataset_name!r}: {error}")
    switches = dict(switches or {})
    dataset_options.update(dataset_evaluation(dataset_cls, {task_name: task_cls}, protocol, {task_name: switches}))
    dataset = dataset_cls(root, split, [task_cls.target_key], **dataset_options)
    error = options_error(task_cls, (task_name, dataset.info), task_options)
    if error:
        raise EvaluateError(f"--task-option of task type {task_name!r}: {error}")
    try:
        task = task_cls(task_name, dataset.info, **task_options)
    except ValueError as exc:
        raise EvaluateError(f"--task-option: {exc}") from exc
    try:
        task.configure_evaluation(protocol, switches)
    except ValueError as exc:
        raise EvaluateError(f"--switch: {exc}") from exc
    metrics = evaluate_saved(dataset, task, pred, num_workers=num_workers, progress=progress)
    return {
        "dataset": dataset_name,
        "root": str(root),
        "split": split,
        "task": task_name,
        "pred": str(pred),
        "samples": len(dataset),
        "evaluation": {"protocol": protocol, "switches": {task_name: dict(task.evaluation)}},
        "metrics": metrics,
    }


def main(args: argparse.Namespace) -> int:
    result = evaluate_folder(
        args.dataset,
        args.root,
        args.split,
        args.task,
        args.pred,
        dataset_options=parse_options(args.option, "--option"),
        task_options=parse_options(args.task_option, "--task-option"),
        plugins=args.plugin,
        num_workers=args.workers,
        progress=not args.quiet and not args.json,
        protocol=args.protocol,
        switches=parse_options(args.switch, "--switch"),
    )
    if args.json:
        sys.stdout.write(to_json(result, indent=2) + "\n")
        return 0
    metrics = result["metrics"]
    header = (
        f"{result['task']} on {result['dataset']} {result['split']} ({result['samples']} samples, {args.pred}; "
        f"protocol {args.protocol}: {describe_switches(result['evaluation']['switches'][result['task']])})"
    )
    lines = [header] + [f"  {key:<16} {value:.4f}" for key, value in metrics.items() if "/" not in key]
    per_class = {k: v for k, v in metrics.items() if "/" in k}
    if per_class:
        lines.append("  " + json.dumps({k: round(v, 4) for k, v in per_class.items()}))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0

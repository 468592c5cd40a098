"""``rcm-nddr bench precision``: the accuracy of the deploy form in reduced precision (``rcm_nddr.nn.precision``).
Every task of a model store is evaluated on a dataset split in fp32, bf16 and int8; the report gives each
task's primary metric, its change relative to fp32 and Delta_MTL against fp32. (Their speed is part of the
model benchmark, ``rcm-nddr bench``: ``ratios.bf16_vs_fp32_infer`` and ``ratios.int8_vs_fp32_infer``.)"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from rcm_nddr.commands.bench_speed import publish
from rcm_nddr.commands.predict import calibration_images
from rcm_nddr.config import Config, ConfigError, load_config
from rcm_nddr.engine.builders import build_dataset, build_tasks
from rcm_nddr.engine.evaluate import delta_mtl, eval_loader, evaluate, primary_metrics
from rcm_nddr.nn.precision import PRECISIONS
from rcm_nddr.store import ModelStore

log = logging.getLogger(__name__)


def store_config(store: ModelStore, root: str | None, overrides: Sequence[str] = ()) -> Config:
    """A config evaluating every task of ``store``: the dataset and evaluation protocol of its first task's
    config, at ``root`` when given."""
    records = store.tasks
    if not records:
        raise ConfigError(f"model store {store.path} holds no tasks")
    recorded = records[0].config
    dataset = dict(recorded.get("dataset", {}))
    if root is not None:
        dataset["root"] = str(root)
    names = [r.name for r in records]
    items = [
        f"tasks=[{', '.join(names)}]",
        f"store={store.path}",
        f"dataset={json.dumps(dataset)}",
        f"evaluation={json.dumps(recorded.get('evaluation', {}))}",
        "train.device=cpu",
        *overrides,
    ]
    return load_config(None, items)


def bench_precision(
    store_path: str,
    root: str | None = None,
    split: str | None = None,
    precisions: Sequence[str] = PRECISIONS,
    batch_size: int = 8,
    progress: bool = True,
    calibration: str | None = None,
) -> dict[str, Any]:
    """Every task of the store evaluated on ``split`` (default: the dataset's val split) in each of
    ``precisions`` (the deploy form, on the CPU; int8 calibrated on the images of the folder ``calibration``,
    default the store's calibration set: checked before anything is evaluated); returns the report:
    metrics per precision, each task's primary metric, its change relative to fp32 (percent) and Delta_MTL
    against fp32."""
    store = ModelStore(store_path)
    images = calibration_images(calibration) if calibration is not None and "int8" in precisions else None
    if "int8" in precisions and images is None and store.metadata().get("calibration") is None:
        raise ConfigError(
            f"int8: model store {store.path} keeps no calibration set (registered before stores kept one): "
            "give calibration images with --calibration DIR, or leave int8 out of --precisions"
        )
    cfg = store_config(store, root)
    split = split or cfg.dataset.val_split
    dataset = build_dataset(cfg, split, train=False)
    tasks = build_tasks(cfg, dataset.info)
    primaries = primary_metrics(tasks)
    device = torch.device("cpu")
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for precision in precisions:
        model = store.load_model(deploy=True, precision=precision, calibration=images if precision == "int8" else None)
        model.to(memory_format=torch.channels_last)
        loader = eval_loader(dataset, batch_size, 0, device)
        metrics[precision] = evaluate(model, loader, tasks, device, progress=progress)
        log.info("%s: %s", precision, {t: round(metrics[precision][t][k], 4) for t, (k, _) in primaries.items()})
    reference = metrics.get("fp32")
    rows = []
    for name, (key, higher) in primaries.items():
        row = {"task": name, "metric": key, "higher_is_better": higher}
        for precision in precisions:
            row[precision] = metrics[precision][name][key]
            if reference is not None:
                base = reference[name][key]
                row[f"{precision}_change_pct"] = 100.0 * (row[precision] - base) / abs(base) if base else 0.0
        rows.append(row)
    deltas = {p: delta_mtl(metrics[p], reference, primaries) for p in precisions} if reference is not None else {}
    return {
        "benchmark": "precision",
        "store": str(store.path),
        "split": split,
        "images": len(dataset),
        "precisions": list(precisions),
        "rows": rows,
        "delta_mtl_vs_fp32": deltas,
        "metrics": metrics,
    }


def format_precision_report(report: dict[str, Any]) -> str:
    precisions = report["precisions"]
    lines = [
        f"{report['store']}, {report['split']} split ({report['images']} images), the deploy form on the CPU",
        "",
        "| task | metric | "
        + " | ".join(precisions)
        + " | "
        + " | ".join(f"{p} vs fp32" for p in precisions[1:])
        + " |",
        "|---|---|" + "---:|" * (2 * len(precisions) - 1),
    ]
    for row in report["rows"]:
        arrow = "higher is better" if row["higher_is_better"] else "lower is better"
        values = " | ".join(f"{row[p]:.4g}" for p in precisions)
        changes = " | ".join(f"{row.get(f'{p}_change_pct', 0.0):+.2f}%" for p in precisions[1:])
        lines.append(f"| {row['task']} | {row['metric']} ({arrow}) | {values} | {changes} |")
    for precision, value in report["delta_mtl_vs_fp32"].items():
        if precision != "fp32":
            lines.append(f"\nDelta_MTL of {precision} against fp32: {value:+.2f}%")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = bench_precision(
        args.store,
        args.root,
        args.split,
        args.precisions,
        args.batch_size,
        progress=not args.quiet,
        calibration=args.calibration,
    )
    publish(format_precision_report(report), report, args.json)
    return 0

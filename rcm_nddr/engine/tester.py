"""Evaluate a trained task group on a split: metrics JSON beside the run and an optional CSV log."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import Config, check_paths
from ..store import ModelStore
from .builders import GroupPlan, build_dataset, build_model, build_tasks, resolve_device
from .checkpoint import atomic_write_text, load_checkpoint
from .evaluate import evaluate, primary_metrics, to_json
from .trainer import RunPaths

log = logging.getLogger(__name__)

CSV_FIELDS = ["config", "store", "group", "task", "split", "checkpoint", "iteration", "primary", "value", "metrics"]


def run_test(
    cfg: Config,
    split: str | None = None,
    checkpoint: str | None = None,
    log_performance: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate the run's ``best`` (or ``last``) checkpoint; write ``test_metrics.json`` in the run
    directory and append one CSV row per task to ``log_performance`` (header when the file is new)."""
    check_paths(cfg)
    split = split or cfg.dataset.val_split
    which = checkpoint or cfg.test.checkpoint
    paths = RunPaths.of(cfg)
    ckpt_path = paths.best if which == "best" else paths.last
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"no {which} checkpoint at {ckpt_path}: train this config first (python train.py --config {cfg.source})"
        )
    state = load_checkpoint(ckpt_path)
    dataset = build_dataset(cfg, split, train=False)
    tasks = build_tasks(cfg, dataset.info)
    device = resolve_device(cfg.train.device)
    # The network the run trained: its group, and the stored tasks it read (from the store, frozen).
    store = ModelStore(cfg.store)
    plan = GroupPlan.from_dict(state["plan"]) if "plan" in state else GroupPlan()
    model = build_model(cfg, tasks, store=store if store.exists else None, plan=plan, for_checkpoint=True)
    model.load_state_dict(state["model"])
    # channels_last: NHWC convolutions are ~25% faster on CPU and the fast layout on GPUs too.
    model.to(device, memory_format=torch.channels_last)
    loader = DataLoader(
        dataset,
        batch_size=cfg.test.batch_size,
        num_workers=cfg.train.num_workers,
        pin_memory=device.type == "cuda",
    )
    metrics = evaluate(model, loader, tasks, device, cfg.train.amp, progress)
    result = {
        "config": cfg.source,
        "group": cfg.group_name,
        "split": split,
        "checkpoint": str(ckpt_path),
        "iteration": state["iteration"],
        "metrics": metrics,
    }
    atomic_write_text(paths.run / "test_metrics.json", to_json(result, indent=2))
    primaries = primary_metrics(tasks)
    for name, values in metrics.items():
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "/" not in k))
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
                    "iteration": state["iteration"],
                    "primary": primaries[name][0],
                    "value": f"{values[primaries[name][0]]:.6g}",
                    "metrics": to_json(values, sort_keys=True),
                }
                for name, values in metrics.items()
            ],
        )
    return metrics


def append_csv(path: str | Path, rows: list[dict[str, object]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)

"""How much the evaluation protocol moves the numbers, on SYNTH_MT: one model of five tasks (semseg, parts,
depth, edge, sal; hard parameter sharing, ``configs/synthetic/semseg+edge_hard_sharing.yaml`` with the
tasks added), its validation predictions saved once, then scored under every protocol, and under
``project`` with each switch alone set to the value another protocol gives it.

    python scripts/protocols_study.py [--out results/studies/protocols] [--iters 200] [--crop 64]

The training run is a cell like the other studies' (``<out>/cells/model``, resumable, skipped once
finished). Writes ``<out>/study.md`` (both tables) and ``<out>/study.json``. PASCAL's edge ground truth
(``pascal_edge_gt``) needs PASCAL-MT and is not part of it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from study_cells import DATA, REPO, prepare, train_cell

from rcm_nddr.commands.evaluate import evaluate_folder
from rcm_nddr.config import load_config
from rcm_nddr.engine.tester import run_test
from rcm_nddr.protocols import PROTOCOLS
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.store import ModelStore

TASK_NAMES = ("semseg", "parts", "depth", "edge", "sal")
#: the metrics shown per task: its primary metric first
SHOWN = {
    "semseg": ("mIoU",),
    "parts": ("mIoU",),
    "depth": ("rmse", "log_rmse"),
    "edge": ("odsF", "oisF"),
    "sal": ("maxF", "mIoU"),
}
CONFIG = REPO / "configs" / "synthetic" / "semseg+edge_hard_sharing.yaml"

log = logging.getLogger("protocols_study")


def train_model(args: argparse.Namespace) -> list[str]:
    """Train (once) the five-task model; returns the config overrides that name it."""
    store = args.out / "cells" / "model"
    overrides = [
        f"store={store}",
        f"tasks=[{', '.join(TASK_NAMES)}]",
        f"train.max_iters={args.iters}",
        f"train.val_every={args.iters}",
        f"dataset.crop=[{args.crop}, {args.crop}]",
        "train.num_workers=0",
        "test.checkpoint=last",
    ]
    if not ModelStore(store).exists or not ModelStore(store).tasks:  # not trained, or interrupted: (re)start
        trained = train_cell(store, CONFIG, overrides[1:], "+".join(TASK_NAMES))
        log.info("model trained in %.0f s", trained["seconds"])
    return overrides


def score(pred: Path, task: str, protocol: str, switches: dict | None = None) -> dict[str, float]:
    result = evaluate_folder("synthetic", str(DATA), "val", task, str(pred), protocol=protocol, switches=switches)
    return {k: result["metrics"][k] for k in SHOWN[task]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/studies/protocols"), help="study directory")
    parser.add_argument("--iters", type=int, default=200, help="training iterations (default: 200)")
    parser.add_argument("--crop", type=int, default=64, help="training crop side (default: 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out = args.out.resolve()
    prepare()
    overrides = train_model(args)
    pred = args.out / "predictions"
    if not pred.is_dir():
        run_test(load_config(CONFIG, overrides), progress=False, save_predictions=pred)
    discover([])
    by_protocol = {p: {t: score(pred, t, p) for t in TASK_NAMES} for p in PROTOCOLS}
    switches = []
    for task in TASK_NAMES:
        cls = TASKS.get(task)
        project = cls.protocol_switches("project")
        for name, value in project.items():
            # the value another protocol gives the switch (the first that differs)
            other = next((v for p in PROTOCOLS if (v := cls.protocol_switches(p)[name]) != value), value)
            if other == value or name == "pascal_edge_gt":
                continue
            alone = score(pred, task, "project", {name: other})
            switches.append({"task": task, "switch": name, "project": value, "other": other})
            switches[-1].update(before=by_protocol["project"][task], after=alone)

    lines = ["| task | metric | " + " | ".join(PROTOCOLS) + " |", "|---|---|" + "---|" * len(PROTOCOLS)]
    for task in TASK_NAMES:
        for key in SHOWN[task]:
            cells = " | ".join(f"{by_protocol[p][task][key]:.4g}" for p in PROTOCOLS)
            lines.append(f"| {task} | {key} | {cells} |")
    lines += ["", "| task | switch (project -> other) | metric: project -> with the switch alone |", "|---|---|---|"]
    for s in switches:
        moved = ", ".join(f"{k} {s['before'][k]:.4g} -> {s['after'][k]:.4g}" for k in SHOWN[s["task"]])
        lines.append(f"| {s['task']} | `{s['switch']}`: {s['project']} -> {s['other']} | {moved} |")
    markdown = "\n".join(lines)
    (args.out / "study.md").write_text(markdown + "\n")
    (args.out / "study.json").write_text(json.dumps({"protocols": by_protocol, "switches": switches}, indent=2))
    sys.stdout.write(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

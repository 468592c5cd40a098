"""The SYNTH_MT study of the papers' baselines: the RCM paper's encoder variants (one task per run) and the
multi-task baselines (the two tasks in one run), on semseg and edge, over several seeds, ranked by
Delta_MTL against the single-task baselines of the same seed and by trainable parameters per task.

    python scripts/baselines_study.py [--out results/studies/baselines] [--seeds 0 1 2] [--workers 2]

An encoder variant is ``configs/synthetic/<task>_<variant>.yaml`` for each task; a multi-task baseline is
``configs/synthetic/semseg+edge_<variant>.yaml`` (RC_RI_NFF + NDDR: ``objectives/semseg+edge_fixed.yaml``).
A cell is one training run in its own store under ``<out>/cells/<cell>`` (resumable, skipped once
finished); every run is shortened the same way (``--iters``, ``--crop``) and scored by its last
validation. Writes ``<out>/study.md`` (mean +- std over seeds), ``<out>/study.json``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study_cells import DATA, REPO, mean_std, prepare, train_cell

from rcm_nddr.config import load_config
from rcm_nddr.engine.builders import build_dataset, build_tasks
from rcm_nddr.engine.evaluate import delta_mtl, primary_metrics
from rcm_nddr.store import ModelStore

TASKS = ("semseg", "edge")
ENCODERS = ("single_task", "decoder_only", "RA_series", "RA_parallel", "RC_random", "RC", "RC_RI", "RC_RI_NFF")
MULTI = {
    "hard_sharing": "semseg+edge_hard_sharing.yaml",
    "NDDR_CNN": "semseg+edge_NDDR_CNN.yaml",
    "cross_stitch": "semseg+edge_cross_stitch.yaml",
    "RC_RI_NFF+NDDR": "objectives/semseg+edge_fixed.yaml",
}
SYNTHETIC = REPO / "configs" / "synthetic"

log = logging.getLogger("baselines_study")


def cells(args: argparse.Namespace) -> list[dict]:
    """Every run: each encoder variant for each task, each multi-task baseline, for every seed."""
    out = []
    for seed in args.seeds:
        for variant in args.encoders:
            for task in TASKS:
                config = SYNTHETIC / f"{task}_{variant}.yaml"
                out.append({"id": f"{variant}_{task}_s{seed}", "variant": variant, "group": task, "config": config})
                out[-1]["seed"] = seed
        for variant in args.multi:
            group = "+".join(TASKS)
            out.append(
                {"id": f"{variant}_s{seed}", "variant": variant, "group": group, "config": SYNTHETIC / MULTI[variant]}
            )
            out[-1]["seed"] = seed
    return out


def run_cell(cell: dict, args: argparse.Namespace) -> dict:
    store = args.out / "cells" / cell["id"]
    result_file = store / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    overrides = [
        f"train.seed={cell['seed']}",
        f"train.max_iters={args.iters}",
        f"train.val_every={args.iters}",
        f"dataset.crop=[{args.crop}, {args.crop}]",
        "train.num_workers=0",
        "test.checkpoint=last",
    ]
    trained = train_cell(store, Path(cell["config"]), overrides, cell["group"])
    records = ModelStore(store).tasks
    result = {k: (str(v) if isinstance(v, Path) else v) for k, v in cell.items()}
    result.update(trained, parameters={r.name: r.trainable_parameters for r in records})
    result_file.write_text(json.dumps(result, indent=2))
    log.info("%s: %.0f s", cell["id"], trained["seconds"])
    return result


def aggregate(results: list[dict], out: Path) -> str:
    cfg = load_config(None, [f"tasks=[{', '.join(TASKS)}]", f"dataset.root={DATA}"])
    prim = primary_metrics(build_tasks(cfg, build_dataset(cfg, cfg.dataset.val_split, train=False).info))
    # per (variant, seed): every task's metrics and trainable parameters, from one run or one per task
    runs: dict[tuple[str, int], dict] = {}
    for r in results:
        joined = runs.setdefault((r["variant"], r["seed"]), {"metrics": {}, "parameters": {}})
        joined["metrics"].update(r["metrics"])
        joined["parameters"].update(r["parameters"])
    seeds = sorted({s for (v, s) in runs if v == "single_task" and set(runs[(v, s)]["metrics"]) == set(TASKS)})
    header = " | ".join(f"{t} {prim[t][0]}" for t in TASKS)
    lines = [
        f"| variant | kind | n | {header} | Delta_MTL (%) | trainable parameters per task |",
        "|" + "---|" * (len(TASKS) + 5),
    ]
    rows = []
    for variant in [*ENCODERS, *MULTI]:
        mine = [(s, runs[(variant, s)]) for s in seeds if (variant, s) in runs]
        mine = [(s, r) for s, r in mine if set(r["metrics"]) == set(TASKS)]
        if not mine:
            continue
        deltas = [
            delta_mtl(r["metrics"], {t: runs[("single_task", s)]["metrics"][t] for t in TASKS}, prim) for s, r in mine
        ]
        metric = {t: mean_std([r["metrics"][t][prim[t][0]] for _, r in mine]) for t in TASKS}
        params = mean_std([sum(r["parameters"].values()) / len(TASKS) for _, r in mine])[0]
        d = mean_std(deltas)
        kind = "encoder (one task per run)" if variant in ENCODERS else "multi-task (both in one run)"
        cells_md = " | ".join(f"{metric[t][0]:.4g} +- {metric[t][1]:.2g}" for t in TASKS)
        lines.append(f"| {variant} | {kind} | {len(mine)} | {cells_md} | {d[0]:+.2f} +- {d[1]:.2f} | {params:,.0f} |")
        rows.append(
            {
                "variant": variant,
                "n": len(mine),
                "delta_mtl": d,
                "per_seed": deltas,
                "metrics": metric,
                "trainable_parameters_per_task": params,
            }
        )
    markdown = "\n".join(lines)
    (out / "study.md").write_text(markdown + "\n")
    (out / "study.json").write_text(json.dumps({"rows": rows, "seeds": seeds}, indent=2))
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/studies/baselines"), help="study directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--workers", type=int, default=2, help="cells trained at once (default: 2)")
    parser.add_argument("--iters", type=int, default=60, help="iterations per run (default: 60)")
    parser.add_argument("--crop", type=int, default=64, help="training crop side (default: 64)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS, help="encoder variants")
    parser.add_argument("--multi", nargs="+", default=list(MULTI), choices=list(MULTI), help="multi-task baselines")
    args = parser.parse_args(argv)
    if "single_task" not in args.encoders:
        parser.error("--encoders must include single_task (the baselines of Delta_MTL)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out = args.out.resolve()
    prepare()
    todo = cells(args)
    log.info("%d cells in %s", len(todo), args.out)
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda c: run_cell(c, args), todo))
    sys.stdout.write(aggregate(results, args.out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

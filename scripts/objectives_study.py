"""The SYNTH_MT study of the multi-task objectives: every loss weighting, with and without cross-task
consistency, on two task groups, over several seeds, against single-task baselines of the same seeds.

    python scripts/objectives_study.py [--out results/studies/objectives] [--seeds 0 1 2] [--workers 2]

A cell is one training run (a config, a seed, with or without consistency) in its own store under
``<out>/cells/<cell>``; a finished cell leaves ``result.json`` and is skipped when the study runs again,
an interrupted one resumes from its checkpoint (``train.py --auto-resume``). Cells run in ``--workers``
processes of one thread each. The groups are ``configs/synthetic/objectives/<group>_<method>.yaml``; the
consistency terms of a group are those of its ``<group>_xtask.yaml``; the baseline of a task is
``configs/synthetic/<task>_RC_RI_NFF.yaml`` (the same backbone, no fusion, one task). Every run is
shortened the same way (``--iters``, ``--crop``) and scored by its last validation (``metrics.json``).

Writes ``<out>/study.md`` (mean +- std over seeds of each task's primary metric, Delta_MTL against the
baselines of the same seed, wall time per iteration relative to ``fixed``: medians over the seeds, of cells
run from their start, two at a time on the machine), ``<out>/study.json`` (every
metric's mean and std) and ``<out>/cells.csv`` (one row per cell). The data and the filter bank are made
first when missing (``rcm-nddr data synth``, ``rcm-nddr pretrain``)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from study_cells import DATA, REPO, mean_std, prepare, train_cell

from rcm_nddr.config import load_config
from rcm_nddr.engine.builders import build_dataset, build_tasks
from rcm_nddr.engine.evaluate import delta_mtl, primary_metrics

GROUPS = ("semseg+depth+normals", "semseg+edge")
METHODS = ("fixed", "uncertainty", "gradnorm", "dwa", "pcgrad", "famo")

log = logging.getLogger("objectives_study")


def consistency_terms(group: str) -> list[dict]:
    """The consistency terms of ``<group>_xtask.yaml`` (resolved through its bases)."""
    cfg = load_config(REPO / "configs" / "synthetic" / "objectives" / f"{group}_xtask.yaml")
    return cfg.to_dict()["loss"].get("consistency", [])


def cells(args: argparse.Namespace) -> list[dict]:
    """Every run of the study: the baselines, then each group x method x consistency x seed."""
    out = []
    tasks = sorted({t for g in args.groups for t in g.split("+")})
    for seed in args.seeds:
        for task in tasks:
            config = REPO / "configs" / "synthetic" / f"{task}_RC_RI_NFF.yaml"
            out.append(
                {"id": f"baseline_{task}_s{seed}", "kind": "baseline", "task": task, "config": config, "seed": seed}
            )
        for group in args.groups:
            terms = consistency_terms(group)
            for method in args.methods:
                config = REPO / "configs" / "synthetic" / "objectives" / f"{group}_{method}.yaml"
                for xtask in (False, True) if args.consistency else (False,):
                    cell = {"group": group, "method": method, "xtask": xtask, "config": config, "seed": seed}
                    cell.update(id=f"{group}_{method}{'_xtask' if xtask else ''}_s{seed}", kind="group")
                    cell["terms"] = terms if xtask else []
                    out.append(cell)
    # the cells without consistency (the weightings' comparison) first, for every seed; the slower cells
    # with transfer nets after them
    return sorted(out, key=lambda c: bool(c.get("terms")))


def run_cell(cell: dict, args: argparse.Namespace) -> dict:
    """Train one cell (or read its result); returns the result."""
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
    if cell.get("method") == "dwa":
        overrides.append(f"loss.weighting.period={args.dwa_period}")
    if cell.get("terms"):
        overrides.append("loss.consistency=" + yaml.safe_dump(cell["terms"], default_flow_style=True).strip())
    group = cell["task"] if cell["kind"] == "baseline" else cell["group"]
    trained = train_cell(store, Path(cell["config"]), overrides, group)
    result = {k: (str(v) if isinstance(v, Path) else v) for k, v in cell.items() if k != "terms"}
    result.update(trained, iters=args.iters)
    result_file.write_text(json.dumps(result, indent=2))
    log.info("%s: %.0f s", cell["id"], trained["seconds"])
    return result


def primaries(groups: list[str]) -> dict[str, tuple[str, bool]]:
    """``{task: (primary metric, higher is better)}`` of every task of the groups."""
    tasks = sorted({t for g in groups for t in g.split("+")})
    cfg = load_config(None, [f"tasks=[{', '.join(tasks)}]", f"dataset.root={DATA}"])
    return primary_metrics(build_tasks(cfg, build_dataset(cfg, cfg.dataset.val_split, train=False).info))


def aggregate(results: list[dict], groups: list[str], out: Path) -> str:
    """Write study.md, study.json and cells.csv; returns the markdown."""
    prim = primaries(groups)
    base = {(r["task"], r["seed"]): r["metrics"][r["task"]] for r in results if r["kind"] == "baseline"}
    rows, lines = [], []
    for group in groups:
        tasks = group.split("+")
        runs = [r for r in results if r["kind"] == "group" and r["group"] == group]
        variants = sorted({(r["method"], r["xtask"]) for r in runs}, key=lambda v: (METHODS.index(v[0]), v[1]))
        timed = [r for r in runs if not r.get("resumed")]
        fixed_time = [r["seconds"] / r["iters"] for r in timed if r["method"] == "fixed" and not r["xtask"]]
        header = " | ".join(f"{t} {prim[t][0]} ({'higher' if prim[t][1] else 'lower'} better)" for t in tasks)
        title = f"| weighting | consistency | n | {header} | Delta_MTL (%) | time/iter vs fixed |"
        lines += [f"### {group}", "", title, "|" + "---|" * (len(tasks) + 5)]
        seeds = sorted({s for (t, s) in base if t in tasks})
        base_row = [mean_std([base[(t, s)][prim[t][0]] for s in seeds]) for t in tasks]
        cells_md = " | ".join(f"{m:.4g} +- {s:.2g}" for m, s in base_row)
        lines.append(f"| single-task (RC_RI_NFF) | - | {len(seeds)} | {cells_md} | 0 | - |")
        for method, xtask in variants:
            # a cell counts once the baselines of its seed are there (Delta_MTL is taken per seed)
            mine = [r for r in runs if r["method"] == method and r["xtask"] == xtask]
            mine = sorted((r for r in mine if all((t, r["seed"]) in base for t in tasks)), key=lambda r: r["seed"])
            if not mine:
                continue
            deltas = [
                delta_mtl(r["metrics"], {t: base[(t, r["seed"])] for t in tasks}, {t: prim[t] for t in tasks})
                for r in mine
            ]
            per_iter = [r["seconds"] / r["iters"] for r in mine if not r.get("resumed")]
            # medians: a cell's wall time depends on what ran beside it
            ratio = (
                statistics.median(per_iter) / statistics.median(fixed_time) if per_iter and fixed_time else float("nan")
            )
            metrics = {
                t: {k: mean_std([r["metrics"][t][k] for r in mine]) for k in mine[0]["metrics"][t]} for t in tasks
            }
            d = mean_std(deltas)
            cells_md = " | ".join(f"{metrics[t][prim[t][0]][0]:.4g} +- {metrics[t][prim[t][0]][1]:.2g}" for t in tasks)
            lines.append(
                f"| {method} | {'yes' if xtask else 'no'} | {len(mine)} | {cells_md} | {d[0]:+.2f} +- {d[1]:.2f} | "
                f"{ratio:.2f} |"
            )
            rows.append(
                {
                    "group": group,
                    "weighting": method,
                    "consistency": xtask,
                    "n": len(mine),
                    "delta_mtl": d,
                    "delta_mtl_per_seed": deltas,
                    "time_per_iter_vs_fixed": ratio,
                    "metrics": metrics,
                }
            )
        lines.append("")
    markdown = "\n".join(lines)
    (out / "study.md").write_text(markdown + "\n")
    (out / "study.json").write_text(
        json.dumps({"rows": rows, "baselines": {f"{t}_s{s}": m for (t, s), m in base.items()}}, indent=2)
    )
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "kind", "group", "weighting", "consistency", "seed", "seconds", "metrics"])
        for r in results:
            writer.writerow(
                [
                    r["id"],
                    r["kind"],
                    r.get("group", r.get("task")),
                    r.get("method", ""),
                    r.get("xtask", ""),
                    r["seed"],
                    f"{r['seconds']:.1f}",
                    json.dumps(r["metrics"]),
                ]
            )
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/studies/objectives"), help="study directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--workers", type=int, default=2, help="cells trained at once (default: 2)")
    parser.add_argument("--iters", type=int, default=60, help="iterations per run (default: 60)")
    parser.add_argument("--crop", type=int, default=64, help="training crop side (default: 64)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS, help="task groups")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="loss weightings")
    parser.add_argument(
        "--dwa-period", type=int, default=10, help="DWA's period in iterations (default: 10, six periods per run)"
    )
    parser.add_argument("--no-consistency", dest="consistency", action="store_false", help="skip the xtask cells")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out = args.out.resolve()
    prepare()
    todo = cells(args)
    log.info(
        "%d cells (%d finished) in %s",
        len(todo),
        sum((args.out / "cells" / c["id"] / "result.json").is_file() for c in todo),
        args.out,
    )
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda c: run_cell(c, args), todo))
    sys.stdout.write(aggregate(results, args.groups, args.out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

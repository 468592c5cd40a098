"""A study's aggregate: per variant, setting (the grid point less its replicate keys) and task, mean +- std
(and n) of every metric over the replicates, Delta_MTL per grid point against the baseline variant's cells
of the same point (mean +- std), trainable and total parameters per task, training time per iteration.
Written as ``study.md``, ``study.json``, ``cells.csv`` (one row per cell and task),
``delta_vs_parameters.png`` (one point per variant and setting) and TensorBoard HParams (one run per cell
under ``hparams/``)."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from rcm_nddr.engine.evaluate import delta_mtl
from rcm_nddr.engine.pretrain import describe_bank, read_recipe
from rcm_nddr.files import atomic_write_text


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{mean, std, n, values}`` of ``values``."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": list(values)}


def point_key(point: Mapping[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def by_point(results: Sequence[Mapping[str, Any]], variant: str) -> dict[str, dict[str, Any]]:
    """A variant's cells joined per grid point: every task's metrics, primaries, evaluation, parameters."""
    joined: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["variant"] != variant:
            continue
        j = joined.setdefault(point_key(r["point"]), {"metrics": {}, "primary": {}, "evaluation": {}, "parameters": {}})
        for part in ("metrics", "primary", "evaluation", "parameters"):
            j[part].update(r.get(part) or {})
    return joined


def _paired(
    cells: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]], baseline: str | None
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, tuple[str, bool]]]]:
    """For each grid point of ``cells`` (one variant) where the baseline variant has cells: the variant's
    metrics, the baseline's, and the primaries of the tasks both have, scored under the same evaluation
    switches (a point where any differ is left out)."""
    if baseline is None or not cells:
        return []
    mine, theirs = by_point(cells, cells[0]["variant"]), by_point(results, baseline)
    out = []
    for key, run in mine.items():
        base = theirs.get(key)
        tasks = [t for t in run["metrics"] if base is not None and t in base["metrics"]]
        if not tasks or any(run["evaluation"].get(t) != base["evaluation"].get(t) for t in tasks):
            continue
        primaries = {t: (run["primary"][t][0], bool(run["primary"][t][1])) for t in tasks}
        out.append((run["metrics"], base["metrics"], primaries))
    return out


def deltas(
    cells: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]], baseline: str | None
) -> tuple[list[float], list[str]]:
    """Delta_MTL of ``cells`` (one variant) at each grid point paired with the baseline's (primary metrics,
    baselines scored under the same evaluation switches), and the tasks it is over: those that every
    paired point has, so that the values pooled are over one set of tasks (a study part-way through can
    have a task at one seed and not yet at another)."""
    paired = _paired(cells, results, baseline)
    common = [t for t in paired[0][2] if all(t in p for _, _, p in paired)] if paired else []
    if not common:
        return [], []
    return [delta_mtl(mine, base, {t: p[t] for t in common}) for mine, base, p in paired], common


def task_deltas(
    cells: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]], baseline: str | None
) -> dict[str, list[float]]:
    """Per task, its relative difference from the baseline in percent at each grid point (Delta_MTL of that
    task alone: positive is better), paired as :func:`deltas` pairs them."""
    out: dict[str, list[float]] = {}
    for mine, base, primaries in _paired(cells, results, baseline):
        for task, primary in primaries.items():
            out.setdefault(task, []).append(delta_mtl(mine, base, {task: primary}))
    return out


def setting(point: Mapping[str, Any], replicates: Sequence[str]) -> dict[str, Any]:
    """The grid point without its replicate keys (the seed): what a row of the report stands for."""
    return {k: v for k, v in point.items() if k not in replicates}


def label(variant: str, values: Mapping[str, Any]) -> str:
    """``variant`` or ``variant (key=value, ...)`` (a path value by its file name)."""
    if not values:
        return variant
    shown = ", ".join(f"{k}={Path(v).name if isinstance(v, str) and '/' in v else v}" for k, v in values.items())
    return f"{variant} ({shown})"


def summarize(
    results: Sequence[Mapping[str, Any]], baseline: str | None, replicates: Sequence[str] = ("train.seed",)
) -> list[dict[str, Any]]:
    """One row per variant and setting (the grid point less ``replicates``): per task, every metric's mean,
    std and n over the replicates; Delta_MTL; parameters; time."""
    rows = []
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["variant"], point_key(setting(r["point"], replicates))), []).append(r)
    for (variant, _), cells in groups.items():
        tasks: dict[str, Any] = {}
        for name in dict.fromkeys(t for r in cells for t in r["metrics"]):
            runs = [r for r in cells if name in r["metrics"]]
            keys = dict.fromkeys(k for r in runs for k, v in r["metrics"][name].items() if _number(v))
            values = {k: [r["metrics"][name][k] for r in runs if _number(r["metrics"][name].get(k))] for k in keys}
            tasks[name] = {
                "primary": runs[0]["primary"][name][0],
                "higher_is_better": bool(runs[0]["primary"][name][1]),
                "metrics": {k: {"mean": m, "std": s, "n": len(v)} for k, v in values.items() for m, s in [mean_std(v)]},
                "trainable_parameters": runs[0]["parameters"][name]["trainable"],
                "total_parameters": runs[0]["parameters"][name]["total"],
            }
        d, over = deltas(cells, results, baseline)
        per_task = task_deltas(cells, results, baseline)
        per_iteration = [
            r["seconds_per_iteration"] for r in cells if r.get("seconds_per_iteration") and not r["resumed"]
        ]
        values = setting(cells[0]["point"], replicates)
        counted = [f for r in cells for f in (r.get("inference_flops") or {}).values() if f is not None]
        rows.append(
            {
                "variant": variant,
                "setting": values,
                "label": label(variant, values),
                "cells": len(cells),
                "cell_names": [r["cell"] for r in cells],
                "tasks": tasks,
                "delta_mtl": spread(d) if d else None,
                "delta_mtl_tasks": over,
                "task_deltas": {t: spread(v) for t, v in per_task.items()},
                "trainable_parameters_per_task": statistics.fmean(t["trainable_parameters"] for t in tasks.values()),
                # a task served alone, with the stored tasks it reads: one image at the training crop
                "inference_gflops_per_task": statistics.fmean(counted) / 1e9 if counted else None,
                "seconds_per_iteration": statistics.median(per_iteration) if per_iteration else None,
            }
        )
    return rows


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The report's task columns, in the rows' order: each task's summary in the first row that has it."""
    names = dict.fromkeys(t for row in rows for t in row["tasks"])
    return {t: next(row["tasks"][t] for row in rows if t in row["tasks"]) for t in names}


def markdown(rows: Sequence[Mapping[str, Any]], baseline: str | None) -> str:
    primary = columns(rows)
    names = list(primary)
    head = " | ".join(
        f"{t} {primary[t]['primary']} ({'higher' if primary[t]['higher_is_better'] else 'lower'})" for t in names
    )
    lines = [
        f"| variant | n | {head} | Delta_MTL (%) vs {baseline or '-'} | trainable parameters per task | "
        "inference GFLOPs per task | s/iteration |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for row in rows:
        n = max((m["n"] for task in row["tasks"].values() for m in task["metrics"].values()), default=0)
        cells = []
        for t in names:
            task = row["tasks"].get(t)
            m = task["metrics"].get(task["primary"]) if task else None
            fewer = f" (n={m['n']})" if m and m["n"] != n else ""  # a task some cells have not finished
            cells.append(f"{m['mean']:.4g} +- {m['std']:.2g}{fewer}" if m else "-")
        d, over = row["delta_mtl"], row.get("delta_mtl_tasks") or []
        partial = f"; over {', '.join(over)}" if d and set(over) != set(names) else ""
        delta = f"{d['mean']:+.2f} +- {d['std']:.2f} (n={d['n']}{partial})" if d else "-"
        seconds = f"{row['seconds_per_iteration']:.3g}" if row["seconds_per_iteration"] else "-"
        params = f"{row['trainable_parameters_per_task']:,.0f}"
        flops = row.get("inference_gflops_per_task")
        gflops = f"{flops:.3g}" if flops else "-"
        lines.append(f"| {row['label']} | {n} | {' | '.join(cells)} | {delta} | {params} | {gflops} | {seconds} |")
    return "\n".join(lines)


def task_delta_table(rows: Sequence[Mapping[str, Any]], baseline: str | None) -> str:
    """Per row and task, the paired relative difference from the baseline (%, positive is better): mean +-
    std (n). "" when no row other than the baseline's has one."""
    shown = [row for row in rows if row["variant"] != baseline and row.get("task_deltas")]
    if not shown:
        return ""
    primary = columns(rows)
    lines = [
        f"Per task against {baseline}, paired by grid point (% of the baseline's primary metric, positive is "
        "better; mean +- std (n)):",
        "",
        "| variant | " + " | ".join(f"{t} {task['primary']}" for t, task in primary.items()) + " |",
        "|---|" + "---:|" * len(primary),
    ]
    for row in shown:
        cells = []
        for t in primary:
            d = row["task_deltas"].get(t)
            cells.append(f"{d['mean']:+.2f} +- {d['std']:.2f} ({d['n']})" if d else "-")
        lines.append(f"| {row['label']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_csv(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One row per cell and task: the grid point, the primary metric and every metric as JSON."""
    fields = ["cell", "variant", "task", "point", "primary", "value", "trainable_parameters", "seconds", "metrics"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            for name, values in r["metrics"].items():
                key = r["primary"][name][0]
                writer.writerow(
                    {
                        "cell": r["cell"],
                        "variant": r["variant"],
                        "task": name,
                        "point": json.dumps(r["point"], sort_keys=True),
                        "primary": key,
                        "value": values.get(key),
                        "trainable_parameters": r["parameters"][name]["trainable"],
                        "seconds": f"{r['seconds']:.1f}",
                        "metrics": json.dumps(values, sort_keys=True),
                    }
                )


def plot(rows: Sequence[Mapping[str, Any]], path: Path, baseline: str | None) -> bool:
    """Delta_MTL (mean +- std) against trainable parameters per task, one point per row (variant and
    setting); False when no row has a Delta_MTL (no baseline)."""
    points = [r for r in rows if r["delta_mtl"]]
    if not points:
        return False
    fig = Figure(figsize=(6.4, 4.2))  # no pyplot: no display backend, no global figure state
    ax = fig.subplots()
    for r in points:
        x, d = r["trainable_parameters_per_task"] / 1e6, r["delta_mtl"]
        ax.errorbar(x, d["mean"], yerr=d["std"], fmt="o", capsize=3)
        ax.annotate(r["label"], (x, d["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters per task (millions)")
    ax.set_ylabel(f"Delta_MTL (%) vs {baseline}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def hparams(results: Sequence[Mapping[str, Any]], folder: Path) -> None:
    """Each cell's variant, task and grid point with its final metrics, for TensorBoard's HParams: one
    events file per cell, written anew with every aggregate."""
    shutil.rmtree(folder, ignore_errors=True)
    for r in results:
        params = {"variant": r["variant"], "task": r["task"] or "group", **{k: str(v) for k, v in r["point"].items()}}
        values = {
            f"{t}/{k}": float(v) for t, m in r["metrics"].items() for k, v in m.items() if _number(v) and "/" not in k
        }
        with SummaryWriter(str(folder / r["cell"])) as writer:
            for summary in hparams_summary(params, values):
                writer.file_writer.add_summary(summary)
            for key, value in values.items():
                writer.add_scalar(key, value)


def bank_line(path: str, sha256: str) -> str:
    """What the cells' ``backbone.weights`` file was: its recipe while the file at ``path`` is still the one
    they read (sha256), else only its sha256."""
    recipe = read_recipe(path)
    if recipe is not None and recipe["sha256"] == sha256:
        return describe_bank(path, recipe)
    return f"{path} (sha256 {sha256[:12]}; no recipe of this file here)"


def validation_scalars(cell: Path) -> dict[str, dict[int, float]]:
    """Every ``val/...`` scalar of the cell's runs as ``{tag: {iteration: value}}``, each run's TensorBoard
    events read once (a resumed run's repeated iterations keep their last value)."""
    scalars: dict[str, dict[int, float]] = {}
    # its directory watcher logs a line per event file at INFO: noise in a report of many cells
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    for run in sorted((cell / "store" / "runs").glob("*")):
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            if tag.startswith("val/"):
                scalars.setdefault(tag, {}).update((e.step, e.value) for e in events.Scalars(tag))
    return scalars


def cell_validation(result: Mapping[str, Any], cells_dir: Path) -> dict[str, dict[int, float]]:
    """A cell's validation scalars: those its result carries (``validation``), else its runs' events."""
    if "validation" in result:
        return {tag: {int(i): float(v) for i, v in points} for tag, points in result["validation"].items()}
    return validation_scalars(cells_dir / result["cell"])


def add_curves(rows: Sequence[dict[str, Any]], cells_dir: Path, results: Sequence[Mapping[str, Any]] = ()) -> None:
    """Each row's validation curves: per task, ``[iteration, mean, std, n]`` of its primary metric over the
    row's cells that ran the task, at the iterations every one of them validated."""
    by_name = {r["cell"]: r for r in results}
    for row in rows:
        scalars = [cell_validation(by_name.get(name, {"cell": name}), cells_dir) for name in row["cell_names"]]
        row["curves"] = {}
        for task, summary in row["tasks"].items():
            # (the cells that ran the task: a row of single-task cells has one cell per task)
            runs = [c for c in (s.get(f"val/{task}/{summary['primary']}") for s in scalars) if c]
            common = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
            row["curves"][task] = [[i, *mean_std([c[i] for c in runs]), len(runs)] for i in common]


def _at(curve: Sequence[Sequence[float]], fraction: float) -> Sequence[float]:
    """The point of ``curve`` validated at or after ``fraction`` of its last iteration (the first such)."""
    target = fraction * curve[-1][0]
    return next(p for p in curve if p[0] >= target)


def convergence_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Whether the curves have flattened: per row and task with at least 3 validations, the mean primary
    metric at half, three quarters and the end of training, and its change over the last quarter ("" when
    no row has such a curve)."""
    lines = []
    for row in rows:
        for task, curve in row.get("curves", {}).items():
            if len(curve) < 3:
                continue
            half, three_quarters, last = _at(curve, 0.5), _at(curve, 0.75), curve[-1]
            points = " | ".join(f"{p[1]:.4g} (it {p[0]})" for p in (half, three_quarters, last))
            lines.append(
                f"| {row['label']} | {task} {row['tasks'][task]['primary']} | {points} | "
                f"{last[1] - three_quarters[1]:+.3g} |"
            )
    if not lines:
        return ""
    head = "| variant | task | at 1/2 | at 3/4 | at the end | change over the last 1/4 |\n|---|---|---:|---:|---:|---:|"
    return "Validation curves (mean over the row's cells):\n\n" + head + "\n" + "\n".join(lines)


def sources_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Per cell and task trained with ``fusion.sources: auto``: each candidate's measured affinity and the
    tasks it reads, stored ones and group mates ("" when no cell has such a task)."""
    lines = []
    for r in sorted(results, key=lambda r: (r["variant"], point_key(r["point"]))):
        for task, read in (r.get("sources") or {}).items():
            auto = read.get("auto")
            if auto is None:
                continue
            affinity = ", ".join(f"{s} {a:+.4f}" for s, a in auto.get("affinity", {}).items()) or "(no stored task)"
            chosen = ", ".join(read["read"]) or "(none)"
            lines.append(f"| {label(r['variant'], r['point'])} | {task} | {affinity} | {chosen} |")
    if not lines:
        return ""
    head = "| cell | task | affinity of each candidate | reads |\n|---|---|---|---|"
    return "Sources chosen by `fusion.sources: auto`:\n\n" + head + "\n" + "\n".join(lines)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """One panel per task: each row's validation curve of the task's primary metric (mean, +- std band);
    False when no row has a curve."""
    tasks = list(dict.fromkeys(t for r in rows for t, c in r.get("curves", {}).items() if len(c) > 1))
    if not tasks:
        return False
    fig = Figure(figsize=(3.6 * len(tasks), 3.2))
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks, strict=True):
        for r in rows:
            curve = r.get("curves", {}).get(task) or []
            if len(curve) < 2:
                continue
            steps, means, stds = ([p[k] for p in curve] for k in range(3))
            ax.plot(steps, means, label=r["label"])
            low = [m - d for m, d in zip(means, stds, strict=True)]
            high = [m + d for m, d in zip(means, stds, strict=True)]
            ax.fill_between(steps, low, high, alpha=0.2)
        primary = next(r["tasks"][task] for r in rows if task in r["tasks"])
        ax.set_title(f"{task} {primary['primary']} ({'higher' if primary['higher_is_better'] else 'lower'} better)")
        ax.set_xlabel("iteration")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def report(spec: Any, results: Sequence[Mapping[str, Any]], out: Path) -> str:
    """Aggregate ``results`` (the finished cells) into ``out``; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, spec.baseline, spec.replicates)
    add_curves(rows, spec.cells_dir, results)
    table = markdown(rows, spec.baseline) if rows else "(no finished cell)"
    banks = dict.fromkeys((path, sha) for r in results for path, sha in (r.get("weights") or {}).items() if sha)
    if banks:
        table += "\n\n" + "\n".join(f"backbone.weights: {bank_line(path, sha)}" for path, sha in banks)
    for extra in (task_delta_table(rows, spec.baseline), convergence_table(rows), sources_table(results)):
        if extra:
            table += "\n\n" + extra
    atomic_write_text(out / "study.md", table + "\n")
    atomic_write_text(out / "study.json", json.dumps({"spec": str(spec.path), "rows": rows}, indent=2))
    write_csv(results, out / "cells.csv")
    plot(rows, out / "delta_vs_parameters.png", spec.baseline)
    plot_curves(rows, out / "validation_curves.png")
    hparams(results, out / "hparams")
    return table

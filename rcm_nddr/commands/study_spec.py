"""A study's spec and cells: ``load_spec`` reads and checks the YAML (every error names the file and the
key), ``expand`` crosses its variants, tasks and grid into cells, each named by a hash of its resolved
configs (less the keys at their schema default: ``rcm_nddr.schema.non_defaults``) and of the content of
their ``backbone.weights``. A cell is finished when its ``result.json`` or its record exists."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rcm_nddr.config import load_config
from rcm_nddr.errors import ConfigError, UserError
from rcm_nddr.files import atomic_write_text, file_sha256
from rcm_nddr.inheritance import parse_override
from rcm_nddr.schema import non_defaults
from rcm_nddr.yamlio import load_yaml

SPEC_KEYS = (
    "out",
    "cells",
    "records",
    "tasks",
    "variants",
    "grid",
    "replicates",
    "set",
    "task_set",
    "baseline",
    "slurm",
)
RESULT_FILE = "result.json"


class StudyError(UserError):
    """A study spec or argument that cannot run: the message names the file and the key."""


@dataclass
class Step:
    """One training run of a cell: a config and the overrides it runs with (``store`` comes from the cell)."""

    config: str
    overrides: list[str]


@dataclass
class Cell:
    """One point of the study: a variant, the task that filled its configs (None: a group or a sequence),
    a grid point, and the runs that make it, in order, into one store under ``directory``."""

    name: str
    variant: str
    task: str | None
    point: dict[str, Any]
    steps: list[Step]
    directory: Path
    key: str = ""
    #: the cell's record (``<records>/<name>.json``) where the spec names a records folder
    record: Path | None = None

    @property
    def result_file(self) -> Path:
        return self.directory / RESULT_FILE

    def finished(self) -> bool:
        return self.result_file.is_file() or (self.record is not None and self.record.is_file())

    def result(self) -> dict[str, Any]:
        """The finished cell's result: its ``result.json``, else its record (a record of another cell, or
        not a result, is an error naming the file)."""
        path = self.result_file if self.result_file.is_file() else self.record
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StudyError(f"result of cell {self.name}: {path} is not readable JSON ({exc})") from exc
        if not isinstance(result, dict) or result.get("cell") != self.name:
            raise StudyError(f"{path}: not the result of cell {self.name} (its 'cell' is not that name)")
        return result

    def keep_record(self) -> None:
        """Copy the finished cell's ``result.json`` to its record when the record is missing or differs."""
        if self.record is not None and self.result_file.is_file():
            text = self.result_file.read_text()
            if not self.record.is_file() or self.record.read_text() != text:
                atomic_write_text(self.record, text)


@dataclass
class Spec:
    path: Path
    out: Path
    tasks: list[str]
    variants: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]
    overrides: list[str]
    baseline: str | None
    slurm: dict[str, Any] = field(default_factory=dict)
    #: grid keys whose values repeat one setting (seeds): the report pools them; other grid keys give rows
    replicates: list[str] = field(default_factory=lambda: ["train.seed"])
    #: the cells' folder (default ``<out>/cells``): studies naming the same one share their identical cells
    cells: Path | None = None
    #: a folder of finished cells' results, ``<cell name>.json`` (None: none kept outside the cells)
    records: Path | None = None
    #: per task, the overrides of every run that trains it (after ``overrides``, before a variant's own)
    task_overrides: dict[str, list[str]] = field(default_factory=dict)

    @property
    def cells_dir(self) -> Path:
        return self.cells if self.cells is not None else self.out / "cells"


def load_spec(path: str | Path) -> Spec:
    """Read and check a study spec; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study spec {path} does not exist")
    try:
        doc = load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise StudyError(f"study spec {path}: not readable YAML ({exc})") from exc

    def fail(key: str, message: str) -> StudyError:
        return StudyError(f"{path}: key '{key}': {message}")

    if not isinstance(doc, dict):
        raise StudyError(f"{path}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = [k for k in doc if k not in SPEC_KEYS]
    if unknown:
        raise fail(unknown[0], f"unknown key; known: {', '.join(SPEC_KEYS)}")
    variants = doc.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise fail("variants", "expected a mapping of variant name -> config path, {config, set} or {sequence, set}")
    checked = {name: _variant(value, f"variants.{name}", fail) for name, value in variants.items()}
    tasks = doc.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise fail("tasks", f"expected a list of task names, got {tasks!r}")
    templated = [n for n, v in checked.items() if any("{task}" in s["config"] for s in v["steps"])]
    if templated and not tasks:
        raise fail("tasks", f"variants {templated} name configs with {{task}}: list the tasks that fill it")
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise fail("grid", f"expected a mapping of config key -> non-empty list of values, got {grid!r}")
    replicates = doc.get("replicates", ["train.seed"])
    if not isinstance(replicates, list) or not all(isinstance(k, str) for k in replicates):
        raise fail("replicates", f"expected a list of grid keys, got {replicates!r}")
    if "replicates" in doc and (missing := [k for k in replicates if k not in grid]):
        raise fail("replicates", f"{missing} are not keys of the grid {list(grid)}")
    overrides = _overrides(doc.get("set") or [], "set", fail)
    task_set = doc.get("task_set") or {}
    if not isinstance(task_set, dict) or not all(isinstance(t, str) and t for t in task_set):
        raise fail("task_set", f"expected a mapping of task name -> list of KEY=VALUE overrides, got {task_set!r}")
    task_overrides = {t: _overrides(v, f"task_set.{t}", fail) for t, v in task_set.items()}
    baseline = doc.get("baseline")
    if baseline is not None and baseline not in checked:
        raise fail("baseline", f"{baseline!r} is not one of the variants {list(checked)}")
    slurm = doc.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise fail("slurm", f"expected a mapping of submitit executor parameters, got {slurm!r}")
    out = Path(doc.get("out") or Path("results") / "studies" / path.stem)
    folders = {k: doc.get(k) for k in ("cells", "records")}
    for key, value in folders.items():
        if value is not None and not (isinstance(value, str) and value):
            raise fail(key, f"expected a folder path, got {value!r}")
    return Spec(
        path,
        out,
        list(tasks),
        checked,
        dict(grid),
        overrides,
        baseline,
        dict(slurm),
        list(replicates),
        *(Path(v) if v else None for v in folders.values()),
        task_overrides,
    )


def _overrides(items: Any, key: str, fail: Callable[[str, str], StudyError]) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise fail(key, f"expected a list of KEY=VALUE overrides, got {items!r}")
    return list(items)


def _variant(value: Any, key: str, fail: Callable[[str, str], StudyError]) -> dict[str, Any]:
    """``{steps: [{config}], set: [...]}`` from a config path, ``{config, set}`` or ``{sequence, set}``."""
    if isinstance(value, str):
        value = {"config": value}
    if not isinstance(value, dict) or len({"config", "sequence"} & set(value)) != 1:
        raise fail(key, "expected a config path, {config: PATH, set: [...]} or {sequence: [PATH, ...], set: [...]}")
    extra = set(value) - {"config", "sequence", "set"}
    if extra:
        raise fail(f"{key}.{sorted(extra)[0]}", "unknown key; known: config, sequence, set")
    configs = [value["config"]] if "config" in value else value["sequence"]
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) and c for c in configs):
        raise fail(key, f"expected config paths, got {configs!r}")
    return {"steps": [{"config": c} for c in configs], "set": _overrides(value.get("set") or [], f"{key}.set", fail)}


def grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the spec's order (one empty point without a grid)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def weights_identity(value: Any, known: dict[str, str]) -> str | None:
    """sha256 of a ``backbone.weights`` file (cached in ``known``), so a cell's name changes with the bank's
    content and not only with its path; None for a name that is no file (``none``, ``imagenet``)."""
    if not isinstance(value, str) or not Path(value).is_file():
        return None
    if value not in known:
        known[value] = file_sha256(value)
    return known[value]


def expand(spec: Spec) -> list[Cell]:
    """Every cell of the study, its configs loaded and checked (a bad config fails before any run)."""
    cells, banks, used = [], {}, set()
    for variant, v in spec.variants.items():
        templated = any("{task}" in s["config"] for s in v["steps"])
        for task in spec.tasks if templated else [None]:
            for point in grid_points(spec.grid):
                last = [*v["set"], *(f"{k}={json.dumps(x)}" for k, x in point.items())]
                steps, resolved = [], []
                for s in v["steps"]:
                    config = s["config"].replace("{task}", task or "")
                    try:
                        first = load_config(config, [*spec.overrides, *last])
                        own = _task_overrides(spec, first.tasks, config)
                        overrides = [*spec.overrides, *own, *last]
                        cfg = load_config(config, overrides) if own else first
                    except ConfigError as exc:
                        raise StudyError(f"{spec.path}: variant {variant!r}: {exc}") from exc
                    used.update(cfg.tasks)
                    steps.append(Step(config, overrides))
                    # (what the config chose: an option added later, at its default, keeps the cells' names)
                    resolved.append({k: val for k, val in non_defaults(cfg).items() if k != "store"})
                    resolved[-1]["weights_sha256"] = weights_identity(cfg.backbone.weights, banks)
                key = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]
                label = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{variant}__{task or 'group'}")
                directory = spec.cells_dir / f"{label}__{key}"
                record = spec.records / f"{directory.name}.json" if spec.records is not None else None
                cells.append(Cell(directory.name, variant, task, point, steps, directory, key, record))
    if unused := [t for t in spec.task_overrides if t not in used]:
        raise StudyError(f"{spec.path}: key 'task_set.{unused[0]}': no config of the study trains a task {unused[0]!r}")
    return cells


def _task_overrides(spec: Spec, tasks: list[str], config: str) -> list[str]:
    """The ``task_set`` overrides of a run training ``tasks``: each task's, merged; two of its tasks that
    set one key to different values are an error (one run has one schedule)."""
    merged: dict[str, tuple[str, Any, str]] = {}  # key -> (task, value, the override)
    for task in tasks:
        for item in spec.task_overrides.get(task, []):
            path, value = parse_override(item, f"{spec.path}: key 'task_set.{task}'")
            key = ".".join(path)
            if key in merged and merged[key][0] != task and merged[key][1] != value:
                raise StudyError(
                    f"{spec.path}: key 'task_set': {config} trains {merged[key][0]} and {task} in one run, "
                    f"whose task_set give {merged[key][2]} and {item}"
                )
            merged[key] = (task, value, item)
    return [item for _, _, item in merged.values()]

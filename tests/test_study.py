"""``rcm-nddr study``: spec checks, cells named by their resolved configs, the aggregate against values
computed here from the cells' own metrics, restarting a killed study, a failing cell, submitit's local
executor."""

import csv
import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rcm_nddr.commands import cli, study_report
from rcm_nddr.commands.study import run_cell, run_order
from rcm_nddr.commands.study_report import convergence_table, plot_curves, summarize
from rcm_nddr.commands.study_spec import Cell, StudyError, expand, load_spec
from rcm_nddr.config import load_config
from rcm_nddr.files import file_sha256
from rcm_nddr.schema import non_defaults

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(tmp_path: Path, data: Path, name: str = "spec", bank: Path | None = None, **changes) -> Path:
    """A 2 x 2 study: single_task and RC_RI_NFF for sal, seeds 0 and 1, 2 iterations each, on the fixed
    random bank ``bank`` (one RI decomposition for every seed)."""
    spec = {
        "out": str(tmp_path / "out"),
        "tasks": ["sal"],
        "variants": {
            "single_task": "configs/synthetic/{task}_single_task.yaml",
            "RC_RI_NFF": "configs/synthetic/{task}_RC_RI_NFF.yaml",
        },
        "grid": {"train.seed": [0, 1]},
        "set": [
            f"dataset.root={data}",
            "dataset.crop=[48, 48]",
            "head.channels=8",
            "train.max_iters=2",
            "train.val_every=2",
            "train.batch_size=2",
            "train.num_workers=0",
            "train.device=cpu",
            "test.batch_size=2",
            f"backbone.weights={bank or 'none'}",
            f"backbone.decomposition={tmp_path / 'ri.safetensors'}",
        ],
        "baseline": "single_task",
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, synth, bank) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    spec = tiny_spec(tmp, synth, bank=bank, records=str(tmp / "records"))
    assert cli.main(["study", "--spec", str(spec), "--workers", "2", "--quiet"]) == 0
    return spec


def test_spec_errors_name_the_file_and_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    good = yaml.safe_load(tiny_spec(tmp_path, tmp_path).read_text())
    cases = [
        ({"seeds": [0]}, r"key 'seeds': unknown key"),
        ({"variants": {}}, r"key 'variants': expected a mapping"),
        ({"variants": {"a": {"config": "x.yaml", "sequence": ["y.yaml"]}}}, r"key 'variants.a': expected a config"),
        ({"variants": {"a": {"config": "x.yaml", "sets": []}}}, r"key 'variants.a.sets': unknown key"),
        ({"tasks": []}, r"key 'tasks': variants \['single_task', 'RC_RI_NFF'\] name configs with \{task\}"),
        ({"grid": {"train.seed": []}}, r"key 'grid': expected a mapping of config key -> non-empty list"),
        ({"set": ["train.max_iters"]}, r"key 'set': expected a list of KEY=VALUE"),
        ({"baseline": "plain"}, r"key 'baseline': 'plain' is not one of the variants"),
        ({"replicates": ["seed"]}, r"key 'replicates': \['seed'\] are not keys of the grid \['train.seed'\]"),
        ({"replicates": "train.seed"}, r"key 'replicates': expected a list of grid keys"),
        ({"cells": 3}, r"key 'cells': expected a folder path"),
        ({"task_set": ["sal"]}, r"key 'task_set': expected a mapping of task name -> list"),
        ({"task_set": {"sal": "train.max_iters=5"}}, r"key 'task_set.sal': expected a list of KEY=VALUE"),
    ]
    for change, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**good, **change}, sort_keys=False))
        with pytest.raises(StudyError, match=rf"bad.yaml: {message}"):
            load_spec(path)
    # a config key the schema does not know fails before anything runs, naming the variant
    path.write_text(yaml.safe_dump({**good, "set": [*good["set"], "train.iters=3"]}, sort_keys=False))
    with pytest.raises(StudyError, match=r"variant 'single_task': .*unknown key 'train.iters'"):
        expand(load_spec(path))


def test_cells_are_named_by_their_resolved_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = load_spec(tiny_spec(tmp_path, tmp_path))
    cells = expand(spec)
    assert [(c.variant, c.task, c.point) for c in cells] == [
        ("single_task", "sal", {"train.seed": 0}),
        ("single_task", "sal", {"train.seed": 1}),
        ("RC_RI_NFF", "sal", {"train.seed": 0}),
        ("RC_RI_NFF", "sal", {"train.seed": 1}),
    ]
    assert len({c.key for c in cells}) == 4 and [c.key for c in expand(spec)] == [c.key for c in cells]
    assert all(c.directory == spec.out / "cells" / f"{c.variant}__sal__{c.key}" for c in cells)
    # another value of any config key is another cell; the output folder is not part of the name
    other = load_spec(tiny_spec(tmp_path, tmp_path, "other", out=str(tmp_path / "elsewhere")))
    assert [c.key for c in expand(other)] == [c.key for c in cells]
    changed = yaml.safe_load(tiny_spec(tmp_path, tmp_path).read_text())
    changed["set"] = [s.replace("train.max_iters=2", "train.max_iters=3") for s in changed["set"]]
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert not {c.key for c in expand(load_spec(tmp_path / "changed.yaml"))} & {c.key for c in cells}
    # the cells run replicate by replicate: every variant's seed 0 before any seed 1
    assert [(c.variant, c.point["train.seed"]) for c in run_order(cells, spec)] == [
        ("single_task", 0),
        ("RC_RI_NFF", 0),
        ("single_task", 1),
        ("RC_RI_NFF", 1),
    ]
    # within a replicate, a cell of more runs (a sequence) starts first, the others keep the spec's order
    long = [Cell(f"seq{seed}", "seq", None, {"train.seed": seed}, cells[0].steps * 3, tmp_path) for seed in (0, 1)]
    assert [(c.variant, c.point["train.seed"]) for c in run_order([*cells, *long], spec)] == [
        ("seq", 0),
        ("single_task", 0),
        ("RC_RI_NFF", 0),
        ("seq", 1),
        ("single_task", 1),
        ("RC_RI_NFF", 1),
    ]
    assert cli.main(["study", "--spec", str(tmp_path / "spec.yaml"), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("todo  ") == 4


def test_task_set_gives_the_runs_of_a_task_their_own_overrides(tmp_path, monkeypatch):
    """``task_set`` overrides every run that trains the task (a step of a sequence too), after the spec's
    ``set`` and before a variant's; the cell is the one the same values give through ``set``."""
    monkeypatch.chdir(REPO)
    sequence = {
        "sequence": ["configs/synthetic/incremental/1_semseg+edge.yaml", "configs/synthetic/incremental/2_depth.yaml"]
    }
    variants = {
        "single_task": "configs/synthetic/{task}_single_task.yaml",
        "longer": {"config": "configs/synthetic/{task}_single_task.yaml", "set": ["train.max_iters=7"]},
        "seq": sequence,
    }
    task_set = {"edge": ["train.max_iters=5", "train.val_every=5"], "semseg": ["train.max_iters=5"]}
    spec = load_spec(tiny_spec(tmp_path, tmp_path, tasks=["sal", "edge"], variants=variants, task_set=task_set))
    cells = {(c.variant, c.task, c.point["train.seed"]): c for c in expand(spec)}

    def schedule(cell, step=0):
        cfg = load_config(cell.steps[step].config, cell.steps[step].overrides)
        return cfg.train.max_iters, cfg.train.val_every

    assert schedule(cells["single_task", "edge", 0]) == (5, 5)
    assert schedule(cells["single_task", "sal", 0]) == (2, 2)
    assert schedule(cells["longer", "edge", 0]) == (7, 5)  # the variant's set comes after task_set
    seq = cells["seq", None, 1]
    assert [schedule(seq, i) for i in (0, 1)] == [(5, 5), (2, 2)]  # semseg + edge, then depth
    # the same values through `set` name the same cell
    plain = yaml.safe_load(tiny_spec(tmp_path, tmp_path).read_text())
    plain.update(tasks=["edge"], variants={"single_task": variants["single_task"]})
    plain["set"] += ["train.max_iters=5", "train.val_every=5"]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    assert [c.key for c in expand(load_spec(tmp_path / "plain.yaml"))] == [
        cells["single_task", "edge", s].key for s in (0, 1)
    ]
    # one run of two tasks has one value per key; a task no config trains is a typo
    clash = {"edge": ["train.max_iters=5"], "semseg": ["train.max_iters=6"]}
    spec = load_spec(tiny_spec(tmp_path, tmp_path, variants={"seq": sequence}, task_set=clash, baseline=None))
    with pytest.raises(
        StudyError,
        match=r"incremental/1_semseg\+edge.yaml trains semseg and edge in one run, "
        r"whose task_set give train.max_iters=6 and train.max_iters=5",
    ):
        expand(spec)
    spec = load_spec(tiny_spec(tmp_path, tmp_path, task_set={"parts": ["train.max_iters=5"]}))
    with pytest.raises(StudyError, match=r"key 'task_set.parts': no config of the study trains a task 'parts'"):
        expand(spec)


def test_a_key_at_its_default_does_not_rename_the_cells(tmp_path, monkeypatch):
    """A version that adds an option at a default keeping the old behaviour keeps the finished cells: a
    key set to its schema default is the same cell as the key left out (the study's keys are those that
    differ from the defaults, ``non_defaults``)."""
    monkeypatch.chdir(REPO)
    cells = expand(load_spec(tiny_spec(tmp_path, tmp_path)))
    explicit = yaml.safe_load(tiny_spec(tmp_path, tmp_path).read_text())
    explicit["set"] += ["train.keep_checkpoints=false", "train.compile=false", "fusion.type=none"]
    (tmp_path / "explicit.yaml").write_text(yaml.safe_dump(explicit, sort_keys=False))
    assert [c.key for c in expand(load_spec(tmp_path / "explicit.yaml"))] == [c.key for c in cells]
    explicit["set"][-1] = "train.keep_checkpoints=true"  # another value: other cells
    (tmp_path / "explicit.yaml").write_text(yaml.safe_dump(explicit, sort_keys=False))
    assert not {c.key for c in expand(load_spec(tmp_path / "explicit.yaml"))} & {c.key for c in cells}


def test_non_defaults_keeps_what_differs_from_the_schema():
    @dataclass
    class Inner:
        a: int = 1
        b: str = "x"

    @dataclass
    class Other(Inner):
        pass

    @dataclass
    class Outer:
        name: str
        inner: Inner = field(default_factory=Inner)
        per_task: dict = field(default_factory=dict)
        added_later: bool = False

    assert non_defaults(Outer("n")) == {"name": "n"}  # a field without a default is always kept
    assert non_defaults(Outer("n", Inner(a=2), {"t": Inner()}, True)) == {
        "name": "n",
        "inner": {"a": 2},
        "per_task": {"t": {}},  # the entry is a choice even when its fields are at their defaults
        "added_later": True,
    }
    assert non_defaults(Outer("n", Other())) == {"name": "n", "inner": {"type": "Other"}}


def test_a_cell_name_follows_the_content_of_its_weights_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bank = tmp_path / "bank.pth"
    bank.write_bytes(b"one")
    spec = load_spec(tiny_spec(tmp_path, tmp_path, bank=bank))
    first = [c.key for c in expand(spec)]
    bank.write_bytes(b"two")  # the same path, another bank: the cells are others
    assert not set(first) & {c.key for c in expand(spec)}
    bank.write_bytes(b"one")
    assert [c.key for c in expand(spec)] == first


def test_studies_naming_one_cells_folder_share_their_cells_under_a_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shared = tmp_path / "shared_cells"
    first = expand(load_spec(tiny_spec(tmp_path, tmp_path, "a", out=str(tmp_path / "a"), cells=str(shared))))
    second = expand(load_spec(tiny_spec(tmp_path, tmp_path, "b", out=str(tmp_path / "b"), cells=str(shared))))
    assert [c.directory for c in first] == [c.directory for c in second]
    assert all(c.directory.parent == shared for c in first)
    # while another study holds a cell, run_cell waits for it, then takes its result without running it
    cell = first[0]
    cell.directory.mkdir(parents=True)
    with open(cell.directory / "cell.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        outcome = {}
        waiting = threading.Thread(target=lambda: outcome.update(run_cell(cell)))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # blocked on the lock
        cell.result_file.write_text(json.dumps({"cell": cell.name, "finished": "elsewhere"}))
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    waiting.join(30)
    assert outcome == {"cell": cell.name, "finished": "elsewhere"}
    assert not (cell.directory / "cell.log").exists()  # nothing ran here


def fake_result(variant: str, point: dict, value: float) -> dict:
    return {
        "cell": f"{variant}__{json.dumps(point, sort_keys=True)}",
        "variant": variant,
        "point": point,
        "metrics": {"sal": {"maxF": value}},
        "primary": {"sal": ["maxF", True]},
        "evaluation": {},
        "parameters": {"sal": {"trainable": 10, "total": 20}},
        "seconds_per_iteration": 1.0,
        "resumed": False,
    }


def test_records_finish_cells_on_a_fresh_clone_and_a_bad_record_is_named(tmp_path, monkeypatch, capsys):
    """A spec's records folder: finished cells' results are copied there (also those finished before the
    folder was named); with the cells folder gone (another clone), the records finish the cells, the
    report is the same and nothing runs."""
    monkeypatch.chdir(REPO)
    spec_path = tiny_spec(tmp_path, tmp_path)
    cells = expand(load_spec(spec_path))
    maxf = {}
    for i, cell in enumerate(cells):
        result = fake_result(cell.variant, cell.point, 50.0 + 7 * i) | {
            "cell": cell.name,
            "task": "sal",
            "seconds": 1.0,
        }
        result["validation"] = {"val/sal/maxF": [[1, 40.0 + i], [2, 50.0 + 7 * i]]}
        maxf[cell.name] = result["metrics"]["sal"]["maxF"]
        cell.directory.mkdir(parents=True)
        cell.result_file.write_text(json.dumps(result))
    assert cli.main(["study", "--spec", str(spec_path), "--report-only", "--quiet"]) == 0
    first = json.loads((tmp_path / "out" / "study.json").read_text())["rows"]
    records = tmp_path / "records"
    spec_path = tiny_spec(tmp_path, tmp_path, records=str(records))
    assert cli.main(["study", "--spec", str(spec_path), "--report-only", "--quiet"]) == 0  # copies the results
    assert sorted(p.name for p in records.iterdir()) == sorted(f"{c.name}.json" for c in cells)
    for cell in expand(load_spec(spec_path)):
        assert (records / f"{cell.name}.json").read_text() == cell.result_file.read_text()
    shutil.rmtree(tmp_path / "out")  # a fresh clone: the records only
    capsys.readouterr()
    assert cli.main(["study", "--spec", str(spec_path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done (record)  ") == 4
    assert cli.main(["study", "--spec", str(spec_path), "--workers", "2", "--quiet"]) == 0
    assert not (tmp_path / "out" / "cells").exists()  # nothing ran
    rows = json.loads((tmp_path / "out" / "study.json").read_text())["rows"]
    assert rows == first
    curves = {r["variant"]: r["curves"]["sal"] for r in rows}
    seeds = {c.variant: [maxf[x.name] for x in cells if x.variant == c.variant] for c in cells}
    for variant, curve in curves.items():  # the curves come from the records, not from the runs' events
        assert [p[0] for p in curve] == [1, 2] and curve[1][1] == pytest.approx(statistics.fmean(seeds[variant]))
    # a record that is not JSON, or of another cell, is named
    victim = records / f"{cells[0].name}.json"
    victim.write_text("{")
    capsys.readouterr()
    assert cli.main(["study", "--spec", str(spec_path), "--report-only", "--quiet"]) != 0
    assert f"{victim} is not readable JSON" in capsys.readouterr().err
    victim.write_text(json.dumps({"cell": cells[1].name}))
    assert cli.main(["study", "--spec", str(spec_path), "--report-only", "--quiet"]) != 0
    assert f"{victim}: not the result of cell {cells[0].name}" in capsys.readouterr().err
    with pytest.raises(StudyError, match="key 'records': expected a folder path"):
        load_spec(tiny_spec(tmp_path, tmp_path, records=["x"]))


def test_a_row_per_variant_and_setting_pools_only_the_replicates():
    values = {  # (variant, lr, seed) -> maxF
        ("base", 0.1, 0): 50.0,
        ("base", 0.1, 1): 60.0,
        ("base", 0.2, 0): 40.0,
        ("base", 0.2, 1): 80.0,
        ("rc", 0.1, 0): 55.0,
        ("rc", 0.1, 1): 57.0,
        ("rc", 0.2, 0): 44.0,
        ("rc", 0.2, 1): 60.0,
    }
    results = [fake_result(v, {"lr": lr, "train.seed": s}, x) for (v, lr, s), x in values.items()]
    rows = {(r["variant"], r["setting"]["lr"]): r for r in summarize(results, "base", ["train.seed"])}
    assert len(rows) == 4
    for (variant, lr), row in rows.items():
        runs = [values[(variant, lr, s)] for s in (0, 1)]
        m = row["tasks"]["sal"]["metrics"]["maxF"]
        assert (m["mean"], m["n"]) == (pytest.approx(statistics.fmean(runs)), 2)
        assert m["std"] == pytest.approx(statistics.stdev(runs))
        # Delta_MTL against the baseline of the same lr and seed
        expected = [
            100 * (values[(variant, lr, s)] - values[("base", lr, s)]) / values[("base", lr, s)] for s in (0, 1)
        ]
        assert row["delta_mtl"]["values"] == pytest.approx(expected)
        assert row["label"] == f"{variant} (lr={lr})"
    # with no replicate key every grid point is its own row
    assert len(summarize(results, "base", [])) == 8


def test_each_task_is_compared_with_the_baseline_of_the_same_seed():
    """Per task, the relative difference from the baseline's cell of the same seed, signed so that better is
    positive (depth's RMSE: lower is better); their mean over the tasks is that seed's Delta_MTL."""
    values = {  # (variant, seed) -> (sal maxF, depth rmse)
        ("base", 0): (80.0, 0.50),
        ("base", 1): (90.0, 0.40),
        ("rc", 0): (84.0, 0.55),
        ("rc", 1): (81.0, 0.30),
    }
    results = []
    for (variant, seed), (maxf, rmse) in values.items():
        r = fake_result(variant, {"train.seed": seed}, maxf)
        r["metrics"]["depth"] = {"rmse": rmse}
        r["primary"]["depth"] = ["rmse", False]
        r["parameters"]["depth"] = {"trainable": 10, "total": 20}
        results.append(r)
    rows = {r["variant"]: r for r in summarize(results, "base", ["train.seed"])}
    sal = [100 * (values[("rc", s)][0] - values[("base", s)][0]) / values[("base", s)][0] for s in (0, 1)]
    depth = [-100 * (values[("rc", s)][1] - values[("base", s)][1]) / values[("base", s)][1] for s in (0, 1)]
    per_task = rows["rc"]["task_deltas"]
    assert per_task["sal"]["values"] == pytest.approx(sal)  # +5, -10
    assert per_task["depth"]["values"] == pytest.approx(depth)  # -10, +25
    assert per_task["depth"]["mean"] == pytest.approx(7.5) and per_task["depth"]["std"] == pytest.approx(
        statistics.stdev(depth)
    )
    assert rows["rc"]["delta_mtl"]["values"] == pytest.approx([(a + b) / 2 for a, b in zip(sal, depth, strict=True)])
    table = study_report.task_delta_table(list(rows.values()), "base")
    assert "| variant | sal maxF | depth rmse |" in table
    assert f"| rc | {per_task['sal']['mean']:+.2f} +- {per_task['sal']['std']:.2f} (2) | +7.50 +- " in table
    assert "| base |" not in table  # the baseline against itself is not shown


def test_a_study_part_way_pools_delta_mtl_over_the_tasks_every_seed_has():
    """Before every cell has finished, a task may be there at one seed and not at another: the row's
    Delta_MTL is over the tasks that every paired seed has, and the table says which, and the n of a task
    with fewer cells."""
    results = []
    for variant, seed, maxf, rmse in [("base", 0, 80.0, 0.5), ("base", 1, 90.0, None), ("rc", 0, 84.0, 0.4)]:
        r = fake_result(variant, {"train.seed": seed}, maxf)
        if rmse is not None:
            r["metrics"]["depth"], r["primary"]["depth"] = {"rmse": rmse}, ["rmse", False]
            r["parameters"]["depth"] = {"trainable": 10, "total": 20}
        results.append(r)
    results.append(fake_result("rc", {"train.seed": 1}, 81.0))
    rows = {r["variant"]: r for r in summarize(results, "base", ["train.seed"])}
    assert rows["rc"]["delta_mtl_tasks"] == ["sal"]
    assert rows["rc"]["delta_mtl"]["values"] == pytest.approx([5.0, -10.0])  # sal alone, not seed 0's mean with depth
    assert rows["rc"]["task_deltas"]["depth"]["values"] == pytest.approx([20.0])  # still shown on its own
    table = study_report.markdown(list(rows.values()), "base")
    assert "| rc | 2 | 82.5 +- 2.1 | 0.4 +- 0 (n=1) | -2.50 +- 10.61 (n=2; over sal) |" in table
    complete = [r for r in results if r["point"]["train.seed"] == 0]  # one seed, every task: no note
    row = {r["variant"]: r for r in summarize(complete, "base", ["train.seed"])}["rc"]
    assert row["delta_mtl_tasks"] == ["sal", "depth"] and "(n=1) |" in study_report.markdown([row], "base")


def test_the_convergence_table_reads_the_curves_at_half_three_quarters_and_the_end():
    sal = {"primary": "maxF", "higher_is_better": True}
    curve = [[i, float(i), 0.0, 2] for i in (50, 100, 150, 200, 250, 300, 350, 400)]
    rows = [{"label": "a", "tasks": {"sal": sal}, "curves": {"sal": curve}}]
    table = convergence_table(rows)
    # half of 400 is 200, three quarters 300: the change over the last quarter is 400 - 300
    assert "| a | sal maxF | 200 (it 200) | 300 (it 300) | 400 (it 400) | +100 |" in table
    rows[0]["curves"]["sal"] = [[i, 7.0, 0.0, 2] for i in (30, 70, 100)]  # validated off the fractions: the next
    assert "| a | sal maxF | 7 (it 70) | 7 (it 100) | 7 (it 100) | +0 |" in convergence_table(rows)
    rows[0]["curves"]["sal"] = curve[:2]  # two points say nothing of flattening
    assert convergence_table(rows) == ""


def test_the_sources_table_lists_what_auto_measured_and_chose_per_cell():
    measured = {"measure": "mean_ablation_loss_increase", "affinity": {"semseg": 0.0123, "edge": -0.002}}
    results = [
        {"variant": "seq", "point": {"train.seed": 1}, "sources": {"depth": {"read": ["semseg"], "auto": measured}}},
        {
            "variant": "seq",
            "point": {"train.seed": 0},
            "sources": {
                "semseg": {"read": [], "auto": None},  # trained first (or told its sources): not a row
                "sal": {"read": [], "auto": {"affinity": {"semseg": 0.001}}},
                "edge": {"read": [], "auto": {"affinity": {}}},  # a store with nothing to read
            },
        },
        {"variant": "alone", "point": {"train.seed": 0}},  # a record from before the cells kept their sources
    ]
    table = study_report.sources_table(results).splitlines()
    assert table[0] == "Sources chosen by `fusion.sources: auto`:"
    assert table[4:] == [
        "| seq (train.seed=0) | sal | semseg +0.0010 | (none) |",
        "| seq (train.seed=0) | edge | (no stored task) | (none) |",
        "| seq (train.seed=1) | depth | semseg +0.0123, edge -0.0020 | semseg |",
    ]
    assert study_report.sources_table(results[2:]) == ""


def test_a_row_of_single_task_cells_has_a_curve_per_task(tmp_path, monkeypatch):
    """A variant with one cell per task (and seed): each task's curve comes from the cells that ran it."""
    scalars = {
        "semseg_0": {"val/semseg/mIoU": {50: 10.0, 100: 20.0}},
        "semseg_1": {"val/semseg/mIoU": {50: 12.0, 100: 22.0}},
        "sal_0": {"val/sal/maxF": {50: 60.0, 100: 70.0}, "val/sal/mae": {50: 0.2, 100: 0.1}},
        "sal_1": {"val/sal/maxF": {100: 72.0}},  # validated at the end only
    }
    monkeypatch.setattr(study_report, "validation_scalars", lambda cell: scalars[cell.name])
    tasks = {"semseg": {"primary": "mIoU"}, "sal": {"primary": "maxF"}}
    rows = [{"label": "single_task", "tasks": tasks, "cell_names": list(scalars)}]
    study_report.add_curves(rows, tmp_path)
    assert rows[0]["curves"]["semseg"] == [[50, 11.0, pytest.approx(2**0.5), 2], [100, 21.0, pytest.approx(2**0.5), 2]]
    assert rows[0]["curves"]["sal"] == [[100, 71.0, pytest.approx(2**0.5), 2]]  # where both validated


def test_validation_curves_are_plotted_per_task(tmp_path):
    rows = [
        {"label": "a", "tasks": {"sal": {"primary": "maxF", "higher_is_better": True}}, "curves": {"sal": []}},
        {
            "label": "b",
            "tasks": {"sal": {"primary": "maxF", "higher_is_better": True}},
            "curves": {"sal": [[10, 50.0, 1.0, 2], [20, 60.0, 0.5, 2]]},
        },
    ]
    assert plot_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows[1]["curves"]["sal"] = rows[1]["curves"]["sal"][:1]  # one point is no curve
    assert not plot_curves(rows, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_the_aggregate_is_the_mean_and_spread_of_the_cells(study):
    spec = load_spec(study)
    results = [json.loads(c.result_file.read_text()) for c in expand(spec)]
    assert len(results) == 4 and all(r["metrics"]["sal"]["maxF"] >= 0 for r in results)
    rows = {r["variant"]: r for r in json.loads((spec.out / "study.json").read_text())["rows"]}
    maxf = {v: [r["metrics"]["sal"]["maxF"] for r in results if r["variant"] == v] for v in rows}
    for variant, row in rows.items():
        m = row["tasks"]["sal"]["metrics"]["maxF"]
        assert m["n"] == 2 and m["mean"] == pytest.approx(sum(maxf[variant]) / 2)
        assert m["std"] == pytest.approx(statistics.stdev(maxf[variant]))
    # Delta_MTL per seed against the single-task cell of the same seed: 100 (M - B) / B for a higher-is-better metric
    by_seed = {(r["variant"], r["point"]["train.seed"]): r["metrics"]["sal"]["maxF"] for r in results}
    base = {s: by_seed[("single_task", s)] for s in (0, 1)}
    expected = [100 * (by_seed[("RC_RI_NFF", s)] - base[s]) / base[s] for s in (0, 1)]
    assert rows["RC_RI_NFF"]["delta_mtl"]["values"] == pytest.approx(expected)
    assert rows["single_task"]["delta_mtl"]["values"] == [0.0, 0.0]
    # parameters: the RC task trains a fraction of the single-task network
    assert rows["RC_RI_NFF"]["trainable_parameters_per_task"] < rows["single_task"]["trainable_parameters_per_task"] / 4
    assert all(r["seconds_per_iteration"] > 0 for r in results)
    assert all(r["sources"] == {"sal": {"read": [], "auto": None}} for r in results)  # alone: reads nothing
    # inference FLOPs: the RC task's deploy form costs exactly the plain network of the same shape
    flops = {(r["variant"], r["point"]["train.seed"]): r["inference_flops"]["sal"] for r in results}
    assert flops[("single_task", 0)] > 10**8 and len(set(flops.values())) == 1
    assert rows["RC_RI_NFF"]["inference_gflops_per_task"] == pytest.approx(flops[("single_task", 0)] / 1e9)
    # the validation curve (TensorBoard events of each cell's run): one validation, at the last iteration,
    # of the model test.py scored
    for variant, row in rows.items():
        ((step, mean, std, n),) = row["curves"]["sal"]
        assert (step, n) == (2, 2) and mean == pytest.approx(statistics.fmean(maxf[variant]), abs=1e-3)
    table = (spec.out / "study.md").read_text()
    # the bank the cells read, by content: this one has no pretraining recipe
    (bank, sha), *others = {(k, v) for r in results for k, v in r["weights"].items()}
    assert not others and sha == file_sha256(bank)
    assert f"backbone.weights: {bank} (sha256 {sha[:12]}; no recipe of this file here)" in table
    assert "Sources chosen" not in table  # no cell chose its sources
    assert "| RC_RI_NFF | 2 |" in table and f"{rows['RC_RI_NFF']['delta_mtl']['mean']:+.2f}" in table
    rows_csv = list(csv.DictReader((spec.out / "cells.csv").open()))
    assert sorted(float(r["value"]) for r in rows_csv) == sorted(v for vs in maxf.values() for v in vs)
    assert (spec.out / "delta_vs_parameters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((spec.out / "hparams").glob("*/events.out.tfevents.*"))) == 4
    # the cells' stores keep one bank, decomposition and calibration set on disk between them
    stores = {(c.variant, c.point["train.seed"]): c.directory / "store" for c in expand(spec)}
    for name in ("filter_bank.safetensors", "ri.safetensors", "calibration.safetensors"):
        files = [s / name for s in stores.values() if (s / name).is_file()]
        assert len(files) == (2 if name != "calibration.safetensors" else 4)
        assert len({f.stat().st_ino for f in files}) == 1 and files[0].stat().st_nlink == len(files)
    # each cell's record is its result, with its validation scalars (the curves without the store)
    for cell in expand(spec):
        assert cell.record.read_text() == cell.result_file.read_text()
        assert json.loads(cell.record.read_text())["validation"]["val/sal/maxF"][-1][0] == 2
    # running it again runs nothing and rewrites the same aggregate
    before = {c.name: c.result_file.stat().st_mtime_ns for c in expand(spec)}
    assert cli.main(["study", "--spec", str(study), "--quiet"]) == 0
    assert {c.name: c.result_file.stat().st_mtime_ns for c in expand(spec)} == before


@pytest.mark.slow
def test_a_killed_study_restarted_runs_only_the_unfinished_cells(tmp_path, synth, bank):
    spec_path = tiny_spec(tmp_path, synth, bank=bank)
    spec = load_spec(spec_path)
    command = [sys.executable, "-m", "rcm_nddr", "study", "--spec", str(spec_path), "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    cells = expand(spec)
    deadline = time.monotonic() + 300
    while not any(c.finished() for c in cells) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the study and the cell in flight
    process.wait()
    finished = {c.name: c.result_file.stat().st_mtime_ns for c in cells if c.finished()}
    assert 1 <= len(finished) < 4
    assert subprocess.run(command, cwd=REPO).returncode == 0
    assert all(c.finished() for c in cells)
    assert {n: m for n, m in ((c.name, c.result_file.stat().st_mtime_ns) for c in cells) if n in finished} == finished
    for cell in cells:  # a finished cell trained once; the others as often as they were started
        trains = (cell.directory / "cell.log").read_text().count(" train --auto-resume ")
        assert trains == 1 if cell.name in finished else trains >= 1


@pytest.mark.slow
def test_a_failing_cell_is_reported_and_the_others_finish_under_submitit(tmp_path, synth, bank, capsys):
    pytest.importorskip("submitit")
    spec_path = tiny_spec(
        tmp_path,
        synth,
        bank=bank,
        variants={
            "single_task": {"config": "configs/synthetic/{task}_single_task.yaml"},
            "broken": {
                "config": "configs/synthetic/{task}_RC_RI_NFF.yaml",
                "set": [f"dataset.root={tmp_path / 'none'}"],
            },
        },
        grid={"train.seed": [0]},
    )
    code = cli.main(["study", "--spec", str(spec_path), "--executor", "submitit-local", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    cells = {c.variant: c for c in expand(load_spec(spec_path))}
    assert cells["single_task"].finished() and not cells["broken"].finished()
    assert "1 of 2 cells failed" in captured.err and "broken__sal__" in captured.err
    assert str(cells["broken"].directory / "cell.log") in captured.err
    assert "does not exist" in (cells["broken"].directory / "cell.log").read_text()
    assert "| single_task | 1 |" in captured.out  # the finished cell is aggregated all the same


def test_the_shipped_study_specs_expand(monkeypatch):
    monkeypatch.chdir(REPO)
    specs = sorted((REPO / "studies").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        cells = expand(spec)
        assert cells and spec.out == Path("results") / "studies" / path.stem
        assert spec.baseline is None or any(c.variant == spec.baseline for c in cells)

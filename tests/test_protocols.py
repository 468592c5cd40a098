"""Evaluation protocols end to end: the config key and ``--protocol``, what metrics JSON, CSV rows and store
records say about how they were scored, and Delta_MTL refused against baselines scored another way."""

import csv
import json
from pathlib import Path

import pytest
from helpers import tiny_run

from rcm_nddr.commands import cli
from rcm_nddr.commands.evaluate import evaluate_folder
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.builders import build_tasks
from rcm_nddr.engine.tester import CSV_FIELDS, run_test
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.protocols import PROTOCOLS
from rcm_nddr.registry import TASKS
from rcm_nddr.store import ModelStore
from rcm_nddr.task import DatasetInfo


def sal_switches(protocol: str) -> dict:
    return TASKS.get("sal").protocol_switches(protocol)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth) -> list[str]:
    """A sal task trained 2 iterations and registered, scored under the default protocol (project)."""
    store = tmp_path_factory.mktemp("protocols") / "store"
    overrides = tiny_run(store, synth, "[sal]", "train.max_iters=2", "train.val_every=2", "test.checkpoint=last")
    Trainer(load_config(None, overrides), progress=False).run()
    return overrides


def test_the_protocol_is_a_config_key_checked_with_its_switches(synth):
    cfg = load_config(None, ["tasks=[sal, edge]", "evaluation.protocol=survey", "evaluation.sal.beta2=0.5"])
    assert cfg.protocol == "survey" and load_config(None, ["tasks=[sal]"]).protocol == "project"
    tasks = build_tasks(cfg, DatasetInfo("x"))
    assert tasks["sal"].evaluation == {**sal_switches("survey"), "beta2": 0.5}
    assert tasks["edge"].evaluation == TASKS.get("edge").protocol_switches("survey")
    with pytest.raises(ConfigError, match=r"key 'evaluation.protocol': expected one of survey, astmt, rcm, project"):
        load_config(None, ["tasks=[sal]", "evaluation.protocol=paper"])
    with pytest.raises(ConfigError, match=r"key 'evaluation.depth': not a task of this run"):
        load_config(None, ["tasks=[sal]", "evaluation.depth.log_clamp=0"])
    bad = load_config(None, ["tasks=[sal]", "evaluation.sal.beta=1"])
    with pytest.raises(ConfigError, match=r"key 'evaluation.sal': task 'sal' has no evaluation switch 'beta'"):
        build_tasks(bad, DatasetInfo("x"))
    bad = load_config(None, ["tasks=[sal]", "evaluation.sal.empty_image=one"])
    with pytest.raises(ConfigError, match=r"key 'evaluation.sal': .*'empty_image': expected one of"):
        build_tasks(bad, DatasetInfo("x"))
    # the shipped configs: the survey's conventions on NYUD and PASCAL, the project's elsewhere
    repo = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(repo / "NYUD" / "edge_RC_RI_NFF.yaml").protocol == "survey"
    assert load_config(repo / "PascalContext" / "sal_single_task.yaml").protocol == "survey"
    assert load_config(repo / "synthetic" / "sal_RC_RI_NFF.yaml").protocol == "project"


def test_every_output_records_the_protocol_and_its_switches(tmp_path, trained):
    store = ModelStore(Path(load_config(None, trained).store))
    (record,) = store.tasks
    assert record.metrics["protocol"] == "project" and record.metrics["evaluation"] == sal_switches("project")
    run = store.path / "runs" / "sal"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["evaluation"] == {"protocol": "project", "switches": {"sal": sal_switches("project")}}

    csv_path = tmp_path / "perf.csv"
    for protocol in ("survey", "project"):
        cfg = load_config(None, [*trained, f"evaluation.protocol={protocol}"])
        run_test(cfg, log_performance=csv_path, progress=False)
        saved = json.loads((run / "test_metrics.json").read_text())
        assert saved["evaluation"] == {"protocol": protocol, "switches": {"sal": sal_switches(protocol)}}
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["protocol"] for r in rows] == ["survey", "project"]
    assert [json.loads(r["evaluation"]) for r in rows] == [sal_switches("survey"), sal_switches("project")]
    # F1 (survey) and F0.3 (project) of the same predictions differ
    assert json.loads(rows[0]["metrics"])["maxF"] != json.loads(rows[1]["metrics"])["maxF"]

    # a log written with other columns cannot take these rows: refused before evaluating
    old = tmp_path / "old.csv"
    old.write_text(",".join(f for f in CSV_FIELDS if f not in ("protocol", "evaluation")) + "\n")
    with pytest.raises(ConfigError, match=r"old.csv: its columns .* log to a new file"):
        run_test(load_config(None, trained), log_performance=old, progress=False)


def test_delta_mtl_is_refused_against_baselines_scored_another_way(tmp_path, trained):
    store = load_config(None, trained).store
    under = {p: load_config(None, [*trained, f"evaluation.protocol={p}"]) for p in PROTOCOLS}
    # the store's record was scored under project: comparable under project, refused under survey
    run_test(under["project"], progress=False, baselines=store)
    with pytest.raises(ConfigError, match=r"task 'sal' was scored under protocol 'project'.*follows 'survey'.*beta2"):
        run_test(under["survey"], progress=False, baselines=store)
    # one switch set back to the baseline's is not enough; both are
    partly = load_config(None, [*trained, "evaluation.protocol=survey", "evaluation.sal.beta2=0.3"])
    with pytest.raises(ConfigError, match=r"\(empty_image: 'recall_one' there, 'zero' here\)"):
        run_test(partly, progress=False, baselines=store)
    alike = load_config(None, [*trained, *_survey_as_project()])
    run_test(alike, progress=False, baselines=store)

    # a test_metrics.json records its protocol; a bare {task: {metric: value}} file counts as project
    run_test(under["astmt"], progress=False)
    scored = tmp_path / "astmt.json"
    scored.write_bytes((Path(store) / "runs" / "sal" / "test_metrics.json").read_bytes())
    run_test(under["rcm"], progress=False, baselines=scored)  # astmt and rcm score saliency alike
    with pytest.raises(ConfigError, match=r"scored under protocol 'astmt' and this evaluation follows 'project'"):
        run_test(under["project"], progress=False, baselines=scored)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(json.loads(scored.read_text())["metrics"]))
    run_test(under["project"], progress=False, baselines=bare)
    with pytest.raises(ConfigError, match=r"scored under protocol 'project'"):
        run_test(under["survey"], progress=False, baselines=bare)


def _survey_as_project() -> list[str]:
    """The survey protocol with every sal switch set back to the project's values."""
    return ["evaluation.protocol=survey", *(f"evaluation.sal.{k}={v}" for k, v in sal_switches("project").items())]


def test_protocol_flags_of_test_py_and_rcm_nddr_evaluate(tmp_path, trained, synth, capsys):
    args = cli.parser().parse_args(["test", "--config", "c.yaml", "--protocol", "astmt", "--gpu_id", "1"])
    assert args.overrides == ["evaluation.protocol=astmt", "train.device=cuda:1"]
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["test", "--config", "c.yaml", "--protocol", "paper"])
    capsys.readouterr()

    pred = tmp_path / "pred"
    run_test(load_config(None, trained), progress=False, save_predictions=pred)
    result = evaluate_folder("synthetic", str(synth), "val", "sal", str(pred), protocol="survey", switches={"beta2": 2})
    assert result["evaluation"] == {"protocol": "survey", "switches": {"sal": {**sal_switches("survey"), "beta2": 2.0}}}
    code = cli.main(["evaluate", "--dataset", "synthetic", "--root", str(synth), "--task", "sal", "--pred", str(pred)])
    assert code == 0 and "protocol project: beta2=0.3, empty_image=recall_one" in capsys.readouterr().out
    code = cli.main(
        ["evaluate", "--dataset", "synthetic", "--root", str(synth), "--task", "sal", "--pred", str(pred)]
        + ["--protocol", "rcm", "--switch", "beta2=-1"]
    )
    assert code == 2
    assert "--switch: task 'sal': evaluation switch 'beta2': expected a number >= 0" in capsys.readouterr().err

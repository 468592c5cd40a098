"""What test.py evaluates: by default the group as the store registers it, in the deploy form that
``rcm-nddr predict`` runs (checked on the recorded probes); ``--form training`` the network as trained;
``--checkpoint`` the run's checkpoint (its deploy form checked against its training form). A deploy form that
does not reproduce the network is refused, naming the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import rc_run

from rcm_nddr import ModelStore
from rcm_nddr.commands import cli
from rcm_nddr.config import load_config
from rcm_nddr.engine import evaluated as evaluated_module
from rcm_nddr.engine.evaluated import DeployCheckError
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.store import StoreError


def overrides(store: Path, synth: Path, bank: Path, tasks: str, *extra: str) -> list[str]:
    return rc_run(store, synth, bank, tasks, "fusion.type=nddr", "train.keep_checkpoints=true", *extra)


@pytest.fixture(scope="module")
def trained(module_tmp, synth, bank) -> tuple[Path, dict]:
    """A store with an NDDR group of two tasks, then a task reading both; the second run's trainer's
    final validation metrics (best = last: one validation)."""
    store = module_tmp / "store"
    Trainer(load_config(None, overrides(store, synth, bank, "[semseg, depth]")), progress=False).run()
    trainer = Trainer(load_config(None, overrides(store, synth, bank, "[normals]")), progress=False)
    trainer.run()
    return store, trainer.last_metrics


def metrics_file(store: Path, group: str) -> dict:
    return json.loads((store / "runs" / group / "test_metrics.json").read_text())


def test_by_default_the_store_registration_is_evaluated_in_the_deploy_form(trained, synth, bank):
    store, validated = trained
    cfg = load_config(None, overrides(store, synth, bank, "[normals]"))
    deployed = run_test(cfg, progress=False)
    saved = metrics_file(store, "normals")
    assert saved["form"] == "deploy" and saved["source"] == str(store) and saved["iteration"] == 3
    assert deployed["normals"] == pytest.approx(validated["normals"], rel=1e-4, abs=1e-6)
    assert run_test(cfg, progress=False, form="training") == validated  # the network as trained, exactly
    assert metrics_file(store, "normals")["form"] == "training"
    # an explicit checkpoint is evaluated from the run's checkpoint file
    from_checkpoint = run_test(cfg, checkpoint="last", progress=False, form="training")
    assert from_checkpoint == validated
    assert metrics_file(store, "normals")["source"].endswith("checkpoints/normals/last.pt")
    # a checkpoint's deploy form in reduced precision (int8 on the store's calibration set), checked likewise
    for precision in ("bf16", "int8"):
        reduced = run_test(cfg, checkpoint="last", progress=False, precision=precision)
        assert reduced["normals"]["mean"] == pytest.approx(validated["normals"]["mean"], rel=0.05)
        assert metrics_file(store, "normals")["precision"] == precision


def test_the_deploy_form_is_checked_on_the_probes(trained, synth, bank, monkeypatch):
    store, _ = trained
    cfg = load_config(None, overrides(store, synth, bank, "[semseg, depth]"))
    deploy = evaluated_module.deploy

    def broken(model, *args, **kwargs):  # a folding that gets depth's head wrong
        folded = deploy(model, *args, **kwargs)
        with torch.no_grad():
            next(folded.heads["depth"].parameters()).mul_(1.5)
        return folded

    from rcm_nddr.store import loading

    monkeypatch.setattr(loading, "deploy_form", broken)
    with pytest.raises(StoreError, match=r"deploy form does not reproduce.*task 'depth'"):
        run_test(cfg, progress=False)
    assert run_test(cfg, progress=False, form="training")  # the training form does not fold
    monkeypatch.setattr(evaluated_module, "deploy", broken)
    with pytest.raises(DeployCheckError, match=r"last.pt does not reproduce its training form: task 'depth'"):
        run_test(cfg, checkpoint="last", progress=False)


def test_test_py_form_argument(trained, synth, bank, tmp_path):
    store, validated = trained
    config = tmp_path / "normals.yaml"
    config.write_text("{}\n")
    args = ["--config", str(config), "--quiet"]
    for item in overrides(store, synth, bank, "[normals]"):
        args += ["--set", item]
    assert cli.test_main([*args, "--form", "training"]) == 0
    assert metrics_file(store, "normals")["metrics"] == json.loads(json.dumps(validated))
    assert cli.test_main(args) == 0
    assert metrics_file(store, "normals")["form"] == "deploy"
    with pytest.raises(SystemExit):
        cli.test_parser().parse_args([*args, "--form", "folded"])


def test_a_group_neither_registered_nor_checkpointed_is_refused(tmp_path, synth, bank):
    cfg = load_config(None, overrides(tmp_path / "empty", synth, bank, "[sal]"))
    with pytest.raises(FileNotFoundError, match=r"no best checkpoint .* does not register group 'sal'"):
        run_test(cfg, progress=False)
    assert not ModelStore(tmp_path / "empty").exists

"""What a run leaves on disk: RC checkpoints without the frozen filter bank or the stored tasks the group
reads (their sha256 recorded, the tensors rebuilt on resume, a mismatch refused), older checkpoints that
hold them still resume; stores of plain networks write no filter bank; a finished run keeps its store,
metrics and logs, and its checkpoints only with ``train.keep_checkpoints``; ``--auto-resume`` and test.py
work on a finished run without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import rc_run, tiny_run

from rcm_nddr import ModelStore
from rcm_nddr.commands import cli
from rcm_nddr.config import load_config
from rcm_nddr.engine.checkpoint import BANK_BUFFERS, CheckpointError, load_checkpoint, save_checkpoint
from rcm_nddr.engine.run import RunPaths
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn.accounting import owned_by
from rcm_nddr.store import StoreError


def rc(store: Path, synth: Path, bank: Path, tasks: str, *extra: str) -> list[str]:
    return rc_run(store, synth, bank, tasks, "fusion.type=nddr", "train.max_iters=4", "train.val_every=2", *extra)


@pytest.fixture(scope="module")
def first_group(module_tmp, synth, bank) -> Path:
    """A store registering semseg (an RC task): what the NDDR groups below read frozen."""
    store = module_tmp / "store"
    Trainer(load_config(None, rc(store, synth, bank, "[semseg]")), progress=False).run()
    return store


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_rc_checkpoints_leave_out_the_bank_and_stored_tasks_and_resume_exactly(first_group, tmp_path, synth, bank):
    straight_store = copy_store(first_group, tmp_path / "a")
    straight = Trainer(load_config(None, rc(straight_store, synth, bank, "[depth]")), progress=False)
    straight.fit()
    cfg = load_config(None, rc(copy_store(first_group, tmp_path / "b"), synth, bank, "[depth]"))
    Trainer(cfg, progress=False).fit(stop_after=3)
    last = load_checkpoint(RunPaths.of(cfg).last)
    keys = set(last["model"])
    assert not [k for k in keys if k.rpartition(".")[2] in BANK_BUFFERS]  # no bank tensor
    assert not [k for k in keys if owned_by(k, "semseg")]  # nor the stored task depth reads
    assert any(owned_by(k, "depth") for k in keys)
    rebuilt = last["rebuilt"]
    assert rebuilt["frozen_tasks"] == ["semseg"] and len(rebuilt["filter_bank_sha256"]) == 64
    assert ModelStore(cfg.store).backbone["filter_bank_sha256"] == rebuilt["filter_bank_sha256"]
    best = load_checkpoint(RunPaths.of(cfg).best)
    assert not [k for k in best["model"] if k.rpartition(".")[2] in BANK_BUFFERS]
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)
    assert resumed.last_metrics == straight.last_metrics


def test_an_old_checkpoint_holding_the_bank_still_resumes(first_group, tmp_path, synth, bank):
    cfg = load_config(None, rc(copy_store(first_group, tmp_path / "a"), synth, bank, "[depth]"))
    straight = Trainer(cfg, progress=False)
    straight.fit()
    cfg = load_config(None, rc(copy_store(first_group, tmp_path / "b"), synth, bank, "[depth]"))
    stopped = Trainer(cfg, progress=False)
    stopped.fit(stop_after=3)
    # the format of earlier versions: the whole state dict, bank and stored tasks included, no "rebuilt"
    state = load_checkpoint(RunPaths.of(cfg).last)
    del state["rebuilt"]
    state["model"] = stopped.model.state_dict()
    save_checkpoint(RunPaths.of(cfg).last, state)
    assert any(k.rpartition(".")[2] in BANK_BUFFERS for k in load_checkpoint(RunPaths.of(cfg).last)["model"])
    resumed = Trainer(cfg, resume=True, progress=False)
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)


def test_a_checkpoint_of_another_bank_is_refused_naming_both_sha256(first_group, tmp_path, synth, bank):
    cfg = load_config(None, rc(copy_store(first_group, tmp_path / "s"), synth, bank, "[depth]"))
    Trainer(cfg, progress=False).fit(stop_after=2)
    state = load_checkpoint(RunPaths.of(cfg).last)
    recorded = state["rebuilt"]["sha256"]
    state["rebuilt"]["sha256"] = "0" * 64
    save_checkpoint(RunPaths.of(cfg).last, state)
    with pytest.raises(
        CheckpointError,
        match=rf"last.pt was trained on the filter bank and the stored tasks \['semseg'\] "
        rf"with sha256 0{{64}}.*builds them with sha256 {recorded}",
    ):
        Trainer(cfg, resume=True, progress=False)


def test_a_plain_store_writes_no_filter_bank(tmp_path, synth, bank):
    store = tmp_path / "plain"
    cfg = load_config(None, tiny_run(store, synth, "[sal]", f"backbone.weights={bank}", "train.max_iters=2"))
    Trainer(cfg, progress=False).run()
    s = ModelStore(store)
    assert not (store / "filter_bank.safetensors").exists() and len(s.backbone["filter_bank_sha256"]) == 64
    assert s.filter_bank() is None and s.verify() == []
    with torch.no_grad():
        assert s.load_model(deploy=True)(torch.randn(1, 3, 32, 32))["sal"].shape == (1, 1, 32, 32)
    # a second run with the same weights is accepted, another bank refused by its sha256
    Trainer(
        load_config(None, tiny_run(store, synth, "[edge]", f"backbone.weights={bank}", "train.max_iters=2")),
        progress=False,
    ).run()
    with pytest.raises(StoreError, match="a store holds one filter bank"):
        Trainer(load_config(None, tiny_run(store, synth, "[depth]", "train.seed=1")), progress=False)  # random weights


def test_a_finished_run_keeps_store_metrics_and_logs_and_its_checkpoints_only_when_asked(
    first_group, tmp_path, synth, bank, caplog
):
    store = copy_store(first_group, tmp_path / "s")
    config = tmp_path / "depth.yaml"
    config.write_text("{}\n")
    args = ["--config", str(config), "--quiet"]
    for item in rc(store, synth, bank, "[depth]"):
        args += ["--set", item]
    assert cli.train_main(args) == 0
    paths = RunPaths.of(load_config(None, rc(store, synth, bank, "[depth]")))
    assert not paths.checkpoints.exists()  # removed once registered
    assert {"config.yaml", "metrics.json", "env.json", "parameters.json", "registered.json"} <= {
        p.name for p in paths.run.iterdir()
    }
    assert list(paths.run.glob("events.out.tfevents.*"))
    registered = json.loads(paths.registered.read_text())
    record = ModelStore(store).task("depth")
    assert registered == {"depth": record.files[record.tensors_file]}
    before = (store / "store.yaml").read_bytes()
    # a requeued --auto-resume job of the finished run: nothing to do; test.py evaluates the store's tasks
    with caplog.at_level("INFO"):
        assert cli.train_main([*args, "--auto-resume"]) == 0
    assert "already registered" in caplog.text and (store / "store.yaml").read_bytes() == before
    assert cli.test_main(args) == 0
    tested = json.loads((paths.run / "test_metrics.json").read_text())
    assert tested["source"] == str(store) and tested["iteration"] in (2, 4)
    # kept when asked
    kept = copy_store(first_group, tmp_path / "k")
    Trainer(load_config(None, rc(kept, synth, bank, "[depth]", "train.keep_checkpoints=true")), progress=False).run()
    assert (kept / "checkpoints" / "depth" / "last.pt").is_file() and (
        kept / "checkpoints" / "depth" / "best.pt"
    ).is_file()


def test_test_py_names_the_registered_checkpoint_when_another_was_removed(first_group, tmp_path, synth, bank):
    store = copy_store(first_group, tmp_path / "s")
    cfg = load_config(None, rc(store, synth, bank, "[depth]", "train.val_every=1"))
    Trainer(cfg, progress=False).run()
    assert ModelStore(store).task("depth").metrics["checkpoint"].startswith("best (iteration ")
    with pytest.raises(
        FileNotFoundError,
        match=r"registers group 'depth' from its best checkpoint, and the run kept "
        r"no last checkpoint .*test.checkpoint: best",
    ):
        run_test(load_config(None, rc(store, synth, bank, "[depth]", "test.checkpoint=last")), progress=False)

"""The add-task workflow end to end: groups trained into one model store, older tasks frozen and
bit-identical, one-way NDDR sources, --replace, load_model, verify's probes, predict, the shortcut."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import rc_run
from PIL import Image

from rcm_nddr import ModelStore, StoreError
from rcm_nddr.commands import cli
from rcm_nddr.config import load_config
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.store.sealing import seal


def overrides(store: Path, synth: Path, bank: Path, tasks: str, *extra: str) -> list[str]:
    return rc_run(store, synth, bank, tasks, *extra)


def train(store: Path, synth: Path, bank: Path, tasks: str, *extra: str, replace: bool = False) -> Trainer:
    trainer = Trainer(load_config(None, overrides(store, synth, bank, tasks, *extra)), progress=False, replace=replace)
    trainer.run()
    return trainer


def fixed_batch() -> torch.Tensor:
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(7))


def predictions(store: Path, *names: str) -> dict[str, torch.Tensor]:
    model = ModelStore(store).load_model(list(names))
    with torch.no_grad():
        return model(fixed_batch(), raw=True)


def file_hashes(store: Path) -> dict[str, str]:
    """sha256 of every file of the store but its runs, checkpoints and store.yaml (which grows)."""
    skip = ("runs", "checkpoints")
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.relative_to(store).parts[0] not in skip and p.name not in ("store.yaml", "store.yaml.lock")
    }


def test_older_tasks_stay_bit_identical_as_groups_that_read_them_are_added(tmp_path, synth, bank):
    store = tmp_path / "store"
    nddr = ("fusion.type=nddr", "fusion.sources=all")
    train(store, synth, bank, "[semseg]")  # A, RCM alone
    a_before = predictions(store, "semseg")["semseg"]
    files_a = file_hashes(store)
    assert {"filter_bank.safetensors", "ri.safetensors", "tasks/semseg.safetensors"} <= set(files_a)
    assert "tasks/semseg.probe.safetensors" in files_a
    assert ModelStore(store).verify() == []

    # B reads A, and learns from A's predictions through two consistency terms: a transfer net from B's
    # depth to A's semseg prediction, and one from A's semseg output to B's depth (its label and prediction)
    consistency = (
        "loss.consistency=[{source: depth, target: semseg, loss: cross, weight: 0.1},"
        " {source: semseg, target: depth, loss: l1, weight: 0.1, supervise: both, detach_target: false}]"
    )
    b = train(store, synth, bank, "[depth]", *nddr, consistency)
    assert b.plan.frozen == ["semseg"] and b.plan.sources == {"depth": ["semseg"]}
    terms = b.objective.objective.terms
    assert [(t.name, t.attach) for t in terms] == [("depth_to_semseg", "depth"), ("semseg_to_depth", "depth")]
    assert torch.equal(predictions(store, "semseg")["semseg"], a_before)
    files_b = file_hashes(store)
    assert {k: files_b[k] for k in files_a} == files_a
    b_before = predictions(store, "depth")["depth"]
    assert ModelStore(store).verify() == []

    train(store, synth, bank, "[normals]", *nddr)  # C reads A and B
    tasks = {t.name: t for t in ModelStore(store).tasks}
    assert [t.group for t in tasks.values()] == [1, 2, 3]
    assert tasks["normals"].sources == ["semseg", "depth"] and tasks["depth"].sources == ["semseg"]
    assert torch.equal(predictions(store, "semseg")["semseg"], a_before)
    assert torch.equal(predictions(store, "depth")["depth"], b_before)
    assert {k: v for k, v in file_hashes(store).items() if k in files_b} == files_b
    # all three together compute what each computes alone
    together = predictions(store, "semseg", "depth", "normals")
    assert torch.equal(together["semseg"], a_before) and torch.equal(together["depth"], b_before)
    assert ModelStore(store).verify() == []
    assert cli.main(["store", "verify", str(store)]) == 0


def test_a_new_group_trains_without_touching_the_stored_tasks_it_reads(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    trainer = Trainer(load_config(None, overrides(store, synth, bank, "[edge]", "fusion.type=nddr")), progress=False)
    model = trainer.model
    frozen = {n: p for n, p in model.named_parameters() if ".semseg." in f".{n}."}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen.values()}
    assert "semseg" not in model.heads  # a source needs no head
    stats = {n: b.clone() for n, b in model.named_buffers() if ".per_task.semseg." in n}
    model.train()
    assert not model.backbone.bn1.per_task["semseg"].training and model.backbone.bn1.per_task["edge"].training
    trainer.fit()
    after = dict(model.named_buffers())
    assert all(torch.equal(after[n], v) for n, v in stats.items())  # no BatchNorm statistic moved
    state = model.state_dict()
    stored = {k: v for k, v in ModelStore(store).load_task_tensors("semseg").items() if k in state}
    assert len(stored) > len(frozen)  # parameters and BatchNorm buffers
    assert all(torch.equal(state[k], v) for k, v in stored.items())


def test_a_stored_task_is_refused_unless_replace_and_replace_is_refused_while_it_is_read(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    with pytest.raises(StoreError, match=r"already registers 'semseg' \(group 1\).*--replace"):
        Trainer(load_config(None, overrides(store, synth, bank, "[semseg]")), overwrite=True, progress=False)
    old = ModelStore(store).task("semseg").files
    train(store, synth, bank, "[semseg]", "train.seed=1", replace=True)
    new = ModelStore(store).task("semseg")
    assert new.group == 2 and new.files != old
    train(store, synth, bank, "[sal]", "fusion.type=nddr")
    with pytest.raises(StoreError, match=r"cannot replace \['semseg'\].*\['sal'\] read them"):
        Trainer(load_config(None, overrides(store, synth, bank, "[semseg]")), overwrite=True, replace=True)
    assert ModelStore(store).verify() == []


def test_sources_list_reads_only_the_named_stored_tasks(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    train(store, synth, bank, "[depth]")  # fusion.type none: independent
    assert ModelStore(store).task("depth").sources == []
    t = train(store, synth, bank, "[edge, sal]", "fusion.type=nddr", "fusion.sources=[depth]")
    assert t.plan.sources == {"edge": ["depth", "sal"], "sal": ["depth", "edge"]}
    assert t.plan.frozen == ["depth"]
    assert [r.group for r in ModelStore(store).tasks if r.name in ("edge", "sal")] == [3, 3]
    with pytest.raises(Exception, match=r"fusion\.sources.*\['parts'\]"):
        Trainer(
            load_config(None, overrides(store, synth, bank, "[normals]", "fusion.type=nddr", "fusion.sources=[parts]"))
        )


def test_a_store_refuses_another_backbone_naming_both_values(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    with pytest.raises(StoreError, match="ri=True, this run asks for False"):
        Trainer(load_config(None, overrides(store, synth, bank, "[depth]", "backbone.ri=false")), progress=False)
    with pytest.raises(StoreError, match="reparam='rc', this run asks for 'none'"):
        Trainer(load_config(None, overrides(store, synth, bank, "[depth]", "backbone.reparam=none")), progress=False)


def test_load_model_returns_post_processed_outputs_at_input_size_with_sources_added(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    train(store, synth, bank, "[normals]", "fusion.type=nddr")
    model = ModelStore(store).load_model(["normals"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert set(model.heads) == {"normals"} and model.frozen == {"semseg"}
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"normals"} and out["normals"].shape == (1, 3, 40, 56)
    torch.testing.assert_close(out["normals"].norm(dim=1), torch.ones(1, 40, 56))
    with torch.no_grad():
        all_tasks = ModelStore(store).load_model()(images)
    assert list(all_tasks) == ["semseg", "normals"] and all_tasks["semseg"].dtype == torch.int64
    assert torch.equal(all_tasks["normals"], out["normals"])
    with pytest.raises(StoreError, match=r"no task\(s\) \['parts'\]"):
        ModelStore(store).load_model(["parts"])


def test_verify_reruns_the_probes(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[sal]")
    s = ModelStore(store)
    # The probe file re-written with other outputs and its sha256 updated: only the re-run sees it.
    from safetensors.torch import load_file, save_file

    probe_path = store / "tasks" / "sal.probe.safetensors"
    probe = load_file(str(probe_path))
    probe["output"] = probe["output"] + 0.5
    save_file(probe, str(probe_path))
    doc = yaml.safe_load((store / "store.yaml").read_text())
    doc["tasks"][0]["files"]["tasks/sal.probe.safetensors"] = hashlib.sha256(probe_path.read_bytes()).hexdigest()
    (store / "store.yaml").write_text(yaml.safe_dump(seal(doc), sort_keys=False))  # digests recomputed too
    assert s.verify(probes=False) == []
    (problem,) = s.verify()
    assert "task 'sal'" in problem and "sal.probe.safetensors" in problem and "differ" in problem
    assert cli.main(["store", "verify", str(store)]) == 1


@pytest.mark.parametrize(
    "relative", ["tasks/sal.safetensors", "filter_bank.safetensors", "tasks/sal.probe.safetensors"]
)
def test_verify_names_any_changed_byte_of_a_real_store(tmp_path, synth, bank, relative, capsys):
    store = tmp_path / "store"
    train(store, synth, bank, "[sal]")
    path = store / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert cli.main(["store", "verify", str(store)]) == 1
    assert relative in capsys.readouterr().out


def test_train_cli_registers_and_predict_writes_every_task(tmp_path, synth, bank, capsys):
    store = tmp_path / "store"
    args = ["--config", "configs/synthetic/semseg_RC_RI_NFF.yaml", "--quiet"]
    ri = f"backbone.decomposition={tmp_path / 'ri.safetensors'}"  # not the config's, under the working directory
    keep = "train.keep_checkpoints=true"
    for item in overrides(store, synth, bank, "[semseg, depth]", "fusion.type=nddr", "optimizer.name=sgd", ri, keep):
        args += ["--set", item]
    repo = Path(__file__).resolve().parents[1]
    args[1] = str(repo / args[1])
    assert cli.train_main(args) == 0
    assert [t.name for t in ModelStore(store).tasks] == ["semseg", "depth"]
    assert cli.train_main(args) == 2  # checkpoints exist: --overwrite needed
    assert "already holds checkpoints" in capsys.readouterr().err
    assert cli.train_main([*args, "--overwrite"]) == 2  # registered: --replace needed
    assert "--replace" in capsys.readouterr().err

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(40, 56), (48, 48)]):
        Image.fromarray(np.full((*size, 3), 60 * i, dtype=np.uint8)).save(images / f"img{i}.png")
    out = tmp_path / "pred"
    assert cli.main(["predict", "--store", str(store), "--images", str(images), "--out", str(out), "--quiet"]) == 0
    for task in ("semseg", "depth"):
        for i, size in enumerate([(40, 56), (48, 48)]):
            array = np.load(out / task / f"img{i}.npy")
            assert array.shape[-2:] == size
            assert Image.open(out / task / f"img{i}.png").size == size[::-1]
    assert cli.main(["predict", "--store", str(store), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_nddr_shortcut_trains_registers_and_reloads_identically(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    trainer = train(
        store, synth, bank, "[depth]", "fusion.type=nddr", "fusion.shortcut=true", "fusion.stages=[layer2, layer4]"
    )
    assert "shortcut" in trainer.model.fusion["depth"]
    assert trainer.parameter_counts["depth"]["fusion"] > 0
    with torch.no_grad():
        trained = trainer.model.eval().to(memory_format=torch.contiguous_format)(fixed_batch(), raw=True)["depth"]
    assert torch.equal(predictions(store, "depth")["depth"], trained)  # best = last checkpoint here
    assert ModelStore(store).verify() == []


def test_own_sources_give_each_task_nddr_layers_on_its_own_features_only(tmp_path, synth, bank):
    """``fusion.sources: own`` (the control of what NDDR's other sources bring): the group reads no stored
    task and no group mate, each task gets one 1x1 conv (C x C) + BatchNorm per stage, and the record
    reloads to the trained outputs."""
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    trainer = train(
        store, synth, bank, "[depth, sal]", "fusion.type=nddr", "fusion.sources=own", "fusion.stages=[layer2, layer4]"
    )
    assert trainer.plan.sources == {} and trainer.plan.frozen == []
    assert trainer.model.fusion.sources == {"depth": ["depth"], "sal": ["sal"]}
    channels = trainer.model.backbone.stage_channels
    expected = sum(channels[s] ** 2 + 2 * channels[s] for s in ("layer2", "layer4"))
    assert trainer.parameter_counts["depth"]["fusion"] == expected
    record = ModelStore(store).task("depth")
    assert record.sources == [] and record.model["fusion"]["stages"] == ["layer2", "layer4"]
    with torch.no_grad():
        trained = trainer.model.eval().to(memory_format=torch.contiguous_format)(fixed_batch(), raw=True)["depth"]
    assert torch.equal(predictions(store, "depth")["depth"], trained)
    assert ModelStore(store).verify() == []
    with pytest.raises(Exception, match=r"fusion\.sources.*own.*cross_stitch"):
        load_config(None, overrides(store, synth, bank, "[edge]", "fusion.type=cross_stitch", "fusion.sources=own"))
    shared = ("fusion.type=nddr", "fusion.sources=own", "backbone.shared_modulators=true")
    with pytest.raises(Exception, match=r"fusion\.sources.*own.*shared_modulators"):
        load_config(None, overrides(store, synth, bank, "[edge, parts]", *shared))


def test_plain_baselines_register_in_a_store_of_their_own(tmp_path, synth, bank):
    store = tmp_path / "baselines"
    trainer = train(store, synth, bank, "[edge]", "backbone.reparam=none")
    with torch.no_grad():
        trained = trainer.model.eval().to(memory_format=torch.contiguous_format)(fixed_batch(), raw=True)["edge"]
    assert torch.equal(predictions(store, "edge")["edge"], trained)
    assert ModelStore(store).backbone["reparam"] == "none"
    assert ModelStore(store).verify() == []


def test_test_py_evaluates_a_group_that_reads_stored_tasks(tmp_path, synth, bank):
    from rcm_nddr.engine.tester import run_test

    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    trainer = train(store, synth, bank, "[depth]", "fusion.type=nddr")
    train(store, synth, bank, "[edge]", "fusion.type=nddr")  # added later: the depth run's network is unchanged
    cfg = load_config(None, overrides(store, synth, bank, "[depth]", "fusion.type=nddr"))
    metrics = run_test(cfg, progress=False)
    assert metrics["depth"]["rmse"] == pytest.approx(trainer.last_metrics["depth"]["rmse"], rel=1e-5)
    assert ModelStore(store).task("depth").metrics["rmse"] == pytest.approx(metrics["depth"]["rmse"], rel=1e-5)


def test_a_refused_config_leaves_no_store_behind(tmp_path, synth, bank):
    store = tmp_path / "store"
    cfg = load_config(None, overrides(store, synth, bank, "[depth]", "fusion.type=nddr", "fusion.sources=[semseg]"))
    with pytest.raises(Exception, match=r"fusion\.sources.*\['semseg'\]"):
        Trainer(cfg, progress=False)
    assert not (store / "store.yaml").exists() and not (store / "filter_bank.safetensors").exists()

"""The model store as a trustworthy artifact, on real (tiny) trained stores and in separate processes:
concurrent first runs create one valid store, a source replaced while a task trains is refused at
registration, a single-byte flip of any file is caught or provably changes nothing, and a read-only
store serves its readers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import rc_run
from PIL import Image

from rcm_nddr import ModelStore, StoreError
from rcm_nddr.commands import cli
from rcm_nddr.config import load_config, save_config
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn.assembly import probe_input

REPO = Path(__file__).resolve().parents[1]


def train(store: Path, synth: Path, bank: Path, tasks: str, *extra: str, replace: bool = False) -> Trainer:
    trainer = Trainer(load_config(None, rc_run(store, synth, bank, tasks, *extra)), progress=False, replace=replace)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def real_store(module_tmp, synth, bank) -> Path:
    """RC + RI + NFF: semseg and depth together, then sal reading both through NDDR."""
    store = module_tmp / "store"
    train(store, synth, bank, "[semseg, depth]")
    train(store, synth, bank, "[sal]", "fusion.type=nddr")
    return store


def outputs(store: Path) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return ModelStore(store).load_model()(probe_input(), raw=True)


@pytest.mark.slow
def test_four_concurrent_first_runs_create_one_valid_store(tmp_path, synth, bank):
    store = tmp_path / "store"
    tasks = ["semseg", "depth", "normals", "edge"]
    procs = []
    for task in tasks:
        config = tmp_path / f"{task}.yaml"
        save_config(load_config(None, rc_run(store, synth, bank, f"[{task}]", "train.max_iters=1")), config)
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for task, proc in zip(tasks, procs, strict=True):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{task}: {err.decode()[-2000:]}"
    s = ModelStore(store)
    assert sorted(t.name for t in s.tasks) == sorted(tasks)
    assert sorted(t.group for t in s.tasks) == list(range(1, 5))
    assert s.verify() == []  # every file's sha256 and every probe, with the one decomposition it records


def test_a_source_replaced_while_a_task_trains_fails_its_registration(tmp_path, synth, bank):
    store = tmp_path / "store"
    train(store, synth, bank, "[semseg]")
    reader = Trainer(load_config(None, rc_run(store, synth, bank, "[sal]", "fusion.type=nddr")), progress=False)
    reader.fit()
    train(store, synth, bank, "[semseg]", "train.seed=1", replace=True)  # nothing reads it in the store yet
    with pytest.raises(StoreError, match="'sal' was trained against 'semseg' with sha256 .*it was replaced"):
        reader.register()
    s = ModelStore(store)
    assert [t.name for t in s.tasks] == ["semseg"] and s.verify() == []


def test_a_task_records_the_sha256_of_the_sources_it_was_trained_against(real_store):
    s = ModelStore(real_store)
    files = {t.name: t.files[t.tensors_file] for t in s.tasks}
    assert s.task("sal").source_pins == {"semseg": files["semseg"], "depth": files["depth"]}
    assert s.task("semseg").source_pins == {} and s.task("depth").source_pins == {}


@pytest.mark.slow
def test_single_byte_flips_of_every_file_are_caught_or_change_nothing(real_store, tmp_path):
    """Seeded flips over every file of a three-task store. Each one is either caught (verify reports it
    or refuses the store, and load_model refuses it) or harmless (verify passes and the predictions are
    bit-identical). A flip of ri.safetensors is named by verify and refused by a run that would add a
    task (``decomposition_path``), and one of calibration.safetensors by int8 (``calibration_images``),
    while predictions, which never read them, are unchanged."""
    store = tmp_path / "store"
    shutil.copytree(real_store, store)
    baseline = outputs(store)
    files = ["store.yaml", *sorted(p.relative_to(store).as_posix() for p in store.glob("*.safetensors"))]
    files += sorted(p.relative_to(store).as_posix() for p in store.glob("tasks/*.safetensors"))
    assert len(files) == 10, files  # store.yaml, bank, decomposition, calibration set, 3 tasks and their probes
    g = np.random.default_rng(7)
    caught, harmless = {}, {}
    for relative in files:
        path = store / relative
        intact = path.read_bytes()
        flips = 24 if relative == "store.yaml" else 6
        for offset in g.choice(len(intact), size=flips, replace=False):
            damaged = bytearray(intact)
            damaged[offset] ^= int(g.integers(1, 256))
            path.write_bytes(bytes(damaged))
            try:
                try:
                    problems = ModelStore(store).verify()
                except StoreError as exc:
                    problems = [str(exc)]
                try:
                    loaded = outputs(store)
                except StoreError:
                    loaded = None
                if relative == "ri.safetensors":
                    assert problems and any("ri.safetensors" in p for p in problems)
                    with pytest.raises(StoreError, match="ri.safetensors"):
                        _ = ModelStore(store).decomposition_path
                    assert loaded is not None and all(torch.equal(loaded[k], baseline[k]) for k in baseline)
                elif relative == "calibration.safetensors":  # read by int8 alone, which refuses it
                    assert problems and any("calibration.safetensors" in p for p in problems)
                    with pytest.raises(StoreError, match="calibration.safetensors"):
                        ModelStore(store).calibration_images()
                    assert loaded is not None and all(torch.equal(loaded[k], baseline[k]) for k in baseline)
                elif problems:
                    assert loaded is None, f"{relative} byte {offset}: verify found {problems}, load_model did not"
                else:
                    assert loaded is not None, f"{relative} byte {offset}: verify passed, load_model refused"
                    assert all(torch.equal(loaded[k], baseline[k]) for k in baseline), f"{relative} byte {offset}"
                    harmless[relative] = harmless.get(relative, 0) + 1
                    continue
                caught[relative] = caught.get(relative, 0) + 1
            finally:
                path.write_bytes(intact)
    assert ModelStore(store).verify() == []
    # a flip inside a tensor file or store.yaml is always caught: sha256 and digests cover every byte;
    # only the bank's is checked on its tensors (the sha256 recorded at creation), so a flip in its
    # header's padding may read the same tensors
    assert set(harmless) <= {"filter_bank.safetensors"} and sum(caught.values()) >= 40


@pytest.fixture
def read_only(real_store, tmp_path):
    """A read-only bind mount of a copy of the store (skipped where mounting is not permitted)."""
    copy, mount = tmp_path / "copy", tmp_path / "ro"
    shutil.copytree(real_store, copy)
    mount.mkdir()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True)

    bound = run("mount", "--bind", str(copy), str(mount)) if shutil.which("mount") else None
    if bound is None or bound.returncode != 0:
        pytest.skip(f"a read-only bind mount needs mount privileges: {bound.stderr.strip() if bound else 'no mount'}")
    try:
        if run("mount", "-o", "remount,bind,ro", str(mount)).returncode != 0:
            pytest.skip("the bind mount could not be made read-only")
        yield copy, mount
    finally:
        run("umount", str(mount))


@pytest.mark.parametrize("lock_file", [True, False])
def test_readers_work_on_a_read_only_store(read_only, tmp_path, lock_file, capsys):
    copy, mount = read_only
    if not lock_file:
        (copy / "store.yaml.lock").unlink()
    with pytest.raises(OSError):
        (mount / "probe-write").write_text("x")  # really read-only
    s = ModelStore(mount)
    assert s.verify() == [] and [t.name for t in s.tasks] == ["semseg", "depth", "sal"]
    with torch.no_grad():
        out = s.load_model(["sal"])(probe_input(), raw=True)
    assert torch.equal(out["sal"], outputs(copy)["sal"])
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.full((40, 48, 3), 100, np.uint8)).save(image)
    for argv in (
        ["store", "verify", str(mount)],
        ["store", "list", str(mount)],
        ["predict", "--store", str(mount), "--images", str(image), "--out", str(tmp_path / "out"), "--quiet"],
    ):
        assert cli.main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "out").is_dir() and (copy / "store.yaml.lock").exists() == lock_file


def as_schema_1(store: Path, without_probe: str) -> None:
    """Rewrite store.yaml as an earlier version wrote it: no digests, no source pins, and (as registrations
    without probes could be) no probe for ``without_probe``."""
    doc = yaml.safe_load((store / "store.yaml").read_text())
    doc.pop("digest")
    doc["schema_version"] = 1
    for task in doc["tasks"]:
        task.pop("digest"), task.pop("source_pins")
        if task["name"] == without_probe:
            task["files"].pop(f"tasks/{without_probe}.probe.safetensors")
            (store / "tasks" / f"{without_probe}.probe.safetensors").unlink()
    (store / "store.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def test_migrate_checks_a_schema_1_store_and_seals_it_without_touching_a_tensor(real_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(real_store, store)
    baseline = outputs(store)
    as_schema_1(store, "depth")
    tensors = {p.name: p.read_bytes() for p in (store / "tasks").glob("*.safetensors")}
    with pytest.raises(StoreError, match="schema_version 1 .*rcm-nddr store migrate"):
        ModelStore(store).load_model()
    done = ModelStore(store).migrate()
    assert done == [
        "recorded the probe of task 'depth'",
        "pinned the sources of task 'sal': ['semseg', 'depth']",
        f"sealed {store / 'store.yaml'} as schema_version 2",
    ]
    s = ModelStore(store)
    assert s.verify() == [] and s.migrate() == []  # current now
    assert all((store / "tasks" / name).read_bytes() == data for name, data in tensors.items())
    assert all(torch.equal(outputs(store)[k], baseline[k]) for k in baseline)
    assert s.task("sal").source_pins == ModelStore(real_store).task("sal").source_pins


def test_migrate_refuses_a_damaged_schema_1_store_and_changes_nothing(real_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(real_store, store)
    as_schema_1(store, "depth")
    data = bytearray((store / "tasks" / "semseg.safetensors").read_bytes())
    data[-3] ^= 0x10
    (store / "tasks" / "semseg.safetensors").write_bytes(bytes(data))
    before = (store / "store.yaml").read_bytes()
    with pytest.raises(StoreError, match=r"was not migrated: sha256 mismatch for .*tasks/semseg\.safetensors"):
        ModelStore(store).migrate()
    assert (store / "store.yaml").read_bytes() == before
    assert not (store / "tasks" / "depth.probe.safetensors").exists()


def test_the_migrate_command(real_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(real_store, store)
    as_schema_1(store, "sal")
    assert cli.main(["store", "verify", str(store)]) == 2
    assert "rcm-nddr store migrate" in capsys.readouterr().err
    assert cli.main(["store", "migrate", str(store)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "recorded the probe of task 'sal'"
    assert cli.main(["store", "migrate", str(store)]) == 0
    assert "is current (schema_version 2); nothing to do" in capsys.readouterr().out
    assert cli.main(["store", "verify", str(store)]) == 0

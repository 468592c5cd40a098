"""The model store: store.yaml, sha256 checks, registration rules, concurrent writers and `rcm-nddr store`."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rcm_nddr.commands import cli
from rcm_nddr.nn.filter_bank import filter_bank_sha256
from rcm_nddr.store import ModelStore, StoreError, TaskRecord

REPO = Path(__file__).resolve().parents[1]


def bank() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
        "layer1.0.conv1.weight": torch.randn(4, 4, 3, 3, generator=g),
    }


def task_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"modulators.conv1": torch.randn(4, 4, generator=g), "head.weight": torch.randn(2, 4, generator=g)}


def record(name: str, sources: tuple[str, ...] = (), **extra) -> dict:
    return {
        "name": name,
        "type": "semseg",
        "sources": list(sources),
        "config": {"train": {"max_iters": 10, "lr": 0.01}, "tasks": [name]},
        "parameters": {"modulators": 16, "head": 8, "total": 24, "filter_bank": 252},
        "metrics": {"primary": "mIoU", "mIoU": 33.25, "pixel_acc": 71.0},
        **extra,
    }


def register(store: ModelStore, *names: str, sources: tuple[str, ...] = (), probe: bool = True, **kwargs):
    tensors = {n: task_state(i) for i, n in enumerate(names)}
    probes = {n: {"prediction": torch.full((1, 2, 3, 3), float(i))} for i, n in enumerate(names)} if probe else None
    return store.register_group([record(n, sources) for n in names], tensors, probes, **kwargs)


@pytest.fixture
def decomposition(tmp_path) -> Path:
    path = tmp_path / "decomposition.safetensors"
    save_file({"conv1.U": torch.eye(4)}, str(path))
    return path


@pytest.fixture
def store(tmp_path, decomposition) -> ModelStore:
    return ModelStore.create(tmp_path / "store", "resnet18", "tiny bank", bank(), decomposition_file=decomposition)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_create_register_and_reload(tmp_path, decomposition):
    path = tmp_path / "store"
    assert not ModelStore(path).exists and not path.exists()  # nothing is created until written
    created = ModelStore.create(path, "resnet18", "tiny bank", bank(), decomposition_file=decomposition)
    assert created.exists and created.tasks == []
    register(created, "semseg", "depth")
    register(created, "edge", sources=("semseg",), probe=False)

    store = ModelStore(path)
    assert [(t.name, t.group, t.sources) for t in store.tasks] == [
        ("semseg", 1, []),
        ("depth", 1, []),
        ("edge", 2, ["semseg"]),
    ]
    semseg = store.task("semseg")
    assert isinstance(semseg, TaskRecord)
    assert set(semseg.files) == {"tasks/semseg.safetensors", "tasks/semseg.probe.safetensors"}
    assert set(store.task("edge").files) == {"tasks/edge.safetensors"}
    assert semseg.config["train"]["lr"] == 0.01 and semseg.trainable_parameters == 24
    assert semseg.primary_metric == ("mIoU", 33.25)
    assert all(torch.equal(v, task_state(1)[k]) for k, v in store.load_task_tensors("depth").items())
    assert torch.equal(store.load_probe("depth")["prediction"], torch.ones(1, 2, 3, 3))
    loaded_bank = store.filter_bank()
    assert filter_bank_sha256(loaded_bank) == filter_bank_sha256(bank())
    assert store.decomposition_path == path / "ri.safetensors"

    doc = yaml.safe_load((path / "store.yaml").read_text())
    assert doc["schema_version"] == 1
    assert doc["backbone"] == {
        "arch": "resnet18",
        "reparam": "rc",
        "ri": False,
        "output_stride": 16,
        "weights": "tiny bank",
        "weights_sha256": None,
        "source_bank_sha256": None,
        "filter_bank_sha256": filter_bank_sha256(bank()),
    }
    assert doc["decomposition_sha256"] is not None
    assert [t["name"] for t in doc["tasks"]] == ["semseg", "depth", "edge"]
    with pytest.raises(StoreError, match="no task 'parts'.*semseg"):
        store.task("parts")


def test_create_refuses_an_existing_store(store):
    with pytest.raises(StoreError, match="already exists"):
        ModelStore.create(store.path, "resnet18", "other", bank())


def test_reading_a_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no model store at .*store.yaml is missing"):
        _ = ModelStore(tmp_path / "nowhere").tasks


def test_verify_is_empty_for_an_intact_store(store):
    register(store, "semseg")
    assert store.verify(probes=False) == []  # records of no real network: sha256 only


@pytest.mark.parametrize(
    "relative",
    ["tasks/semseg.safetensors", "tasks/semseg.probe.safetensors", "filter_bank.safetensors", "ri.safetensors"],
)
def test_verify_names_a_corrupted_file(store, relative):
    register(store, "semseg", "depth")
    flip_last_byte(store.path / relative)
    problems = store.verify()
    assert len(problems) == 1
    assert relative in problems[0] and "sha256 mismatch" in problems[0]


def test_loading_a_corrupted_or_missing_file_raises(store):
    register(store, "semseg")
    flip_last_byte(store.path / "tasks/semseg.safetensors")
    with pytest.raises(StoreError, match=r"sha256 mismatch for .*tasks/semseg\.safetensors"):
        store.load_task_tensors("semseg")
    flip_last_byte(store.path / "filter_bank.safetensors")
    with pytest.raises(StoreError, match=r"sha256 mismatch for .*filter_bank\.safetensors"):
        store.filter_bank()
    (store.path / "tasks/semseg.safetensors").unlink()
    with pytest.raises(StoreError, match=r"tasks/semseg\.safetensors is missing"):
        store.load_task_tensors("semseg")
    assert any("tasks/semseg.safetensors is missing" in p for p in store.verify())


def edit_store_yaml(store: ModelStore, edit) -> None:
    doc = yaml.safe_load(store.store_file.read_text())
    edit(doc)
    store.store_file.write_text(yaml.safe_dump(doc))


def test_unknown_schema_version_is_refused(store):
    edit_store_yaml(store, lambda doc: doc.update(schema_version=2))
    with pytest.raises(StoreError, match=r"store\.yaml: unknown schema_version 2"):
        _ = store.tasks


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc.pop("backbone"), "missing key 'backbone'"),
        (lambda doc: doc["backbone"].pop("filter_bank_sha256"), "backbone: missing key 'filter_bank_sha256'"),
        (lambda doc: doc["tasks"][0].update(group="one"), r"tasks\[0\]: key 'group' must be int"),
        (lambda doc: doc["tasks"][0].update(sources=["ghost"]), "reads unregistered task.*ghost"),
    ],
)
def test_malformed_store_yaml_names_the_key(store, edit, message):
    register(store, "semseg")
    edit_store_yaml(store, edit)
    with pytest.raises(StoreError, match=message):
        _ = store.tasks


def test_invalid_yaml_is_a_clear_error(store):
    store.store_file.write_text("tasks: [unclosed\n")
    with pytest.raises(StoreError, match="could not be read as YAML"):
        store.verify()


def test_duplicate_name_is_refused(store):
    register(store, "semseg")
    before = store.store_file.read_text()
    with pytest.raises(StoreError, match="already registers 'semseg' \\(group 1\\).*replace=True"):
        register(store, "semseg")
    assert store.store_file.read_text() == before


def test_sources_must_be_registered(store):
    with pytest.raises(StoreError, match="'edge' reads unregistered task.*semseg"):
        register(store, "edge", sources=("semseg",))
    assert store.tasks == []


def test_replace_refused_while_another_task_reads_it(store):
    register(store, "semseg")
    register(store, "edge", sources=("semseg",))
    with pytest.raises(StoreError, match=r"cannot replace \['semseg'\].*\['edge'\] read them"):
        register(store, "semseg", replace=True)


def test_replace_rewrites_an_unread_task(store):
    register(store, "semseg")
    register(store, "depth")
    (new,) = store.register_group([record("semseg")], {"semseg": {"w": torch.zeros(3)}}, replace=True)
    assert [(t.name, t.group) for t in store.tasks] == [("depth", 2), ("semseg", 3)]
    assert new.group == 3 and set(new.files) == {"tasks/semseg.safetensors"}
    assert not (store.path / "tasks/semseg.probe.safetensors").exists()  # the old version's probe
    assert torch.equal(store.load_task_tensors("semseg")["w"], torch.zeros(3))
    assert store.verify(probes=False) == []  # records of no real network: sha256 only


class Crash(Exception):
    pass


def test_a_replace_that_dies_before_its_journal_leaves_the_old_store(store, monkeypatch):
    register(store, "semseg")
    old = store.load_task_tensors("semseg")
    import rcm_nddr.store.index as store_module

    def die(path, text):
        raise Crash(path)

    monkeypatch.setattr(store_module, "atomic_write_text", die)  # the journal is never written
    with pytest.raises(Crash):
        store.register_group([record("semseg")], {"semseg": {"w": torch.zeros(3)}}, replace=True)
    monkeypatch.undo()
    assert (store.path / "tasks/semseg.safetensors.staged").exists()  # the new version, staged
    fresh = ModelStore(store.path)
    assert fresh.verify(probes=False) == [] and [t.group for t in fresh.tasks] == [1]
    assert torch.equal(fresh.load_task_tensors("semseg")["modulators.conv1"], old["modulators.conv1"])
    register(fresh, "depth")  # the next writer deletes the stray staged file
    assert not list(store.path.glob("tasks/*.staged"))
    assert fresh.verify(probes=False) == []


def test_a_replace_that_dies_after_its_journal_is_completed_by_the_next_access(store, monkeypatch):
    register(store, "semseg")
    register(store, "depth")

    def die(self):
        raise Crash("after the journal")

    monkeypatch.setattr(ModelStore, "_finish_pending", die)
    with pytest.raises(Crash):
        store.register_group([record("semseg")], {"semseg": {"w": torch.zeros(3)}}, replace=True)
    monkeypatch.undo()
    assert (store.path / "store.yaml.pending").exists()
    # store.yaml is still the old one, whose semseg file has not been touched
    assert [t["group"] for t in yaml.safe_load((store.path / "store.yaml").read_text())["tasks"]] == [1, 2]
    fresh = ModelStore(store.path)
    assert [(t.name, t.group) for t in fresh.tasks] == [("depth", 2), ("semseg", 3)]  # completed on read
    assert not (store.path / "store.yaml.pending").exists()
    assert torch.equal(fresh.load_task_tensors("semseg")["w"], torch.zeros(3))
    assert fresh.verify(probes=False) == []


def test_remove_refused_while_read_then_allowed(store):
    register(store, "semseg")
    register(store, "edge", sources=("semseg",))
    with pytest.raises(StoreError, match=r"cannot remove 'semseg'.*\['edge'\] read it"):
        store.remove("semseg")
    store.remove("edge")
    assert not (store.path / "tasks/edge.safetensors").exists()
    store.remove("semseg")
    assert store.tasks == [] and list((store.path / "tasks").iterdir()) == []
    assert store.verify(probes=False) == []  # records of no real network: sha256 only
    with pytest.raises(StoreError, match="no task 'semseg'"):
        store.remove("semseg")


# Each writer signals it is ready and waits for "go", so that both registration loops really overlap.
WRITER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    import torch
    from rcm_nddr.store import ModelStore

    store, prefix, n = ModelStore(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (store.path.parent / f"ready-{prefix}").touch()
    while not (store.path.parent / "go").exists():
        time.sleep(0.005)
    for i in range(n):
        name = f"{prefix}{i}"
        store.register_group(
            [{"name": name, "type": "depth", "parameters": {"total": i}}],
            {name: {"w": torch.full((8, 8), float(i))}},
            {name: {"p": torch.zeros(2)}},
        )
    """
)


def test_two_processes_register_into_one_store(store):
    n = 25
    script = store.path.parent / "writer.py"
    script.write_text(WRITER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store.path), prefix, str(n)], cwd=REPO, stderr=subprocess.PIPE
        )
        for prefix in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not all((store.path.parent / f"ready-{p}").exists() for p in "ab"):
        assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), "a writer did not start"
        time.sleep(0.01)
    (store.path.parent / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    doc = yaml.safe_load(store.store_file.read_text())  # still valid YAML
    names = [t["name"] for t in doc["tasks"]]
    assert sorted(names) == sorted(f"{p}{i}" for p in "ab" for i in range(n))
    assert sorted(t["group"] for t in doc["tasks"]) == list(range(1, 2 * n + 1))
    assert store.verify(probes=False) == []  # records of no real network: sha256 only


def test_cli_store_commands(store, capsys):
    register(store, "semseg")
    register(store, "edge", sources=("semseg",))
    capsys.readouterr()

    assert cli.main(["store", "list", str(store.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "type", "group", "sources"]
    assert lines[2].split() == ["edge", "semseg", "2", "semseg", "24", "mIoU=33.25"]

    assert cli.main(["store", "show", str(store.path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["schema_version"] == 1 and shown["backbone"]["arch"] == "resnet18"
    assert shown["tasks"][0]["parameters"] == {"modulators": 16, "head": 8, "total": 24, "filter_bank": 252}
    assert cli.main(["store", "show", str(store.path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tasks"][1]["sources"] == ["semseg"]

    assert cli.main(["store", "verify", "--sha-only", str(store.path)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    flip_last_byte(store.path / "tasks/edge.probe.safetensors")
    (store.path / "tasks/semseg.safetensors").unlink()
    assert cli.main(["store", "verify", "--sha-only", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "tasks/edge.probe.safetensors" in out and "tasks/semseg.safetensors is missing" in out

    assert cli.main(["store", "remove", str(store.path), "semseg"]) == 2
    assert "error: cannot remove 'semseg'" in capsys.readouterr().err
    assert cli.main(["store", "remove", str(store.path), "edge"]) == 0
    assert [t.name for t in store.tasks] == ["semseg"]
    assert cli.main(["store", "list", str(store.path.parent / "missing")]) == 2
    assert "error: no model store" in capsys.readouterr().err

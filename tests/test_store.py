"""The model store: store.yaml, sha256 checks, registration rules, concurrent writers and `rcm-nddr store`."""

import json
import os
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
from rcm_nddr.store.sealing import seal

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


def probe(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"prediction": torch.full((1, 2, 3, 3), value)}


def register(store: ModelStore, *names: str, sources: tuple[str, ...] = (), **kwargs):
    tensors = {n: task_state(i) for i, n in enumerate(names)}
    probes = {n: probe(float(i)) for i, n in enumerate(names)}
    return store.register_group([record(n, sources) for n in names], tensors, probes, **kwargs)


def register_zeros(store: ModelStore, name: str = "semseg", **kwargs):
    """Register ``name`` with the tensor ``w`` = zeros(3) (and a probe of zeros)."""
    return store.register_group([record(name)], {name: {"w": torch.zeros(3)}}, {name: probe()}, **kwargs)


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
    register(created, "edge", sources=("semseg",))

    store = ModelStore(path)
    assert [(t.name, t.group, t.sources) for t in store.tasks] == [
        ("semseg", 1, []),
        ("depth", 1, []),
        ("edge", 2, ["semseg"]),
    ]
    semseg = store.task("semseg")
    assert isinstance(semseg, TaskRecord)
    assert set(semseg.files) == {"tasks/semseg.safetensors", "tasks/semseg.probe.safetensors"}
    assert set(store.task("edge").files) == {"tasks/edge.safetensors", "tasks/edge.probe.safetensors"}
    assert store.task("edge").source_pins == {"semseg": semseg.files["tasks/semseg.safetensors"]}
    assert semseg.config["train"]["lr"] == 0.01 and semseg.trainable_parameters == 24
    assert semseg.primary_metric == ("mIoU", 33.25)
    assert all(torch.equal(v, task_state(1)[k]) for k, v in store.load_task_tensors("depth").items())
    assert torch.equal(store.load_probe("depth")["prediction"], torch.ones(1, 2, 3, 3))
    loaded_bank = store.filter_bank()
    assert filter_bank_sha256(loaded_bank) == filter_bank_sha256(bank())
    assert store.decomposition_path == path / "ri.safetensors"

    doc = yaml.safe_load((path / "store.yaml").read_text())
    assert doc["schema_version"] == 2
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


def edit_store_yaml(store: ModelStore, edit, reseal: bool = True) -> None:
    """Edit store.yaml as a document; ``reseal``: recompute its digests, as a careful forger would, so the
    checks behind the digests are tested too."""
    doc = yaml.safe_load(store.store_file.read_text())
    edit(doc)
    store.store_file.write_text(yaml.safe_dump(seal(doc) if reseal else doc, sort_keys=False))


def test_unknown_schema_version_is_refused(store):
    edit_store_yaml(store, lambda doc: doc.update(schema_version=3))
    with pytest.raises(StoreError, match=r"store\.yaml: unknown schema_version 3"):
        _ = store.tasks


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc.pop("backbone"), "missing key 'backbone'"),
        (lambda doc: doc["backbone"].pop("filter_bank_sha256"), "backbone: missing key 'filter_bank_sha256'"),
        (lambda doc: doc["tasks"][0].update(group="one"), r"tasks\[0\]: key 'group' must be int"),
        (
            lambda doc: doc["tasks"][0].update(sources=["ghost"], source_pins={"ghost": "0" * 64}),
            "reads unregistered task.*ghost",
        ),
        (lambda doc: doc["tasks"][0].update(name="../semseg"), r"task name '\.\./semseg' must be letters"),
        (
            lambda doc: doc["tasks"][0]["files"].update({"/etc/passwd": "0" * 64}),
            r"key 'files' must list exactly \['tasks/semseg.probe.safetensors', 'tasks/semseg.safetensors'\]",
        ),
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
    (new,) = register_zeros(store, replace=True)
    assert [(t.name, t.group) for t in store.tasks] == [("depth", 2), ("semseg", 3)]
    assert new.group == 3 and set(new.files) == {"tasks/semseg.safetensors", "tasks/semseg.probe.safetensors"}
    assert torch.equal(store.load_probe("semseg")["prediction"], probe()["prediction"])
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
        register_zeros(store, replace=True)
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
        register_zeros(store, replace=True)
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
    assert shown["schema_version"] == 2 and shown["backbone"]["arch"] == "resnet18"
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


# ----------------------------------------------------------------------------- store.yaml sealed by digests


def three_tasks(store: ModelStore) -> bytes:
    register(store, "semseg", "depth")
    register(store, "edge", sources=("semseg",))
    return store.store_file.read_bytes()


def readers(store: ModelStore) -> dict:
    return {
        "tasks": lambda: store.tasks,
        "load_model": store.load_model,
        "metadata": store.metadata,
        "filter_bank": store.filter_bank,
        "decomposition_path": lambda: store.decomposition_path,
        "load_task_tensors": lambda: store.load_task_tensors("semseg"),
        "load_probe": lambda: store.load_probe("edge"),
        "verify": lambda: store.verify(probes=False),
        "remove": lambda: store.remove("edge"),
        "register": lambda: register(store, "parts"),
    }


def test_every_truncation_of_store_yaml_is_refused_by_every_reader(store):
    text = three_tasks(store)
    lines = [i + 1 for i, byte in enumerate(text) if byte == ord("\n")]
    offsets = sorted(
        {0, *lines, *torch.randint(0, len(text), (60,), generator=torch.Generator().manual_seed(5)).tolist()}
    )
    offsets = [o for o in offsets if o < len(text.rstrip())]  # without its last newline the file is the same
    assert len(offsets) > 100
    for offset in offsets:
        store.store_file.write_bytes(text[:offset])
        for name, read in readers(store).items():
            with pytest.raises(StoreError, match=r"store\.yaml"):
                read()
            assert store.store_file.read_bytes() == text[:offset], f"{name} changed a damaged store.yaml"
    store.store_file.write_bytes(text)
    assert [t.name for t in store.tasks] == ["semseg", "depth", "edge"] and store.verify(probes=False) == []


def test_every_single_byte_change_of_store_yaml_is_refused_or_changes_nothing(store):
    text = three_tasks(store)
    intact = store.metadata()
    g = torch.Generator().manual_seed(6)
    harmless = 0
    for offset in range(len(text)):
        damaged = bytearray(text)
        damaged[offset] ^= int(torch.randint(1, 256, (1,), generator=g))
        store.store_file.write_bytes(bytes(damaged))
        try:
            read = store.metadata()
        except StoreError:
            continue
        assert read == intact, f"a change at byte {offset} went unnoticed and changed store.yaml's content"
        harmless += 1  # e.g. a quote or a space that YAML reads the same
    assert harmless < len(text) / 100


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc["tasks"][1].update(type="normals"), r"tasks\[1\] \(task 'depth'\): the record does not match"),
        (lambda doc: doc["tasks"][2]["files"].pop("tasks/edge.probe.safetensors"), r"task 'edge'\): the record"),
        (lambda doc: doc["tasks"].pop(1), r"tasks \(\['semseg', 'edge'\]\) does not match the file's digest"),
        (lambda doc: doc["tasks"].reverse(), "does not match the file's digest"),
        (lambda doc: doc["backbone"].update(output_stride=8), "the header or the list of tasks"),
        (lambda doc: doc.update(decomposition_sha256="0" * 64), "the header or the list of tasks"),
        (lambda doc: doc.pop("digest"), "missing key 'digest'"),
        (lambda doc: doc["tasks"][0].pop("digest"), r"tasks\[0\] \(task 'semseg'\): the record has no 'digest'"),
    ],
)
def test_an_edited_store_yaml_is_refused_naming_the_record(store, edit, message):
    three_tasks(store)
    edit_store_yaml(store, edit, reseal=False)
    for read in readers(store).values():
        with pytest.raises(StoreError, match=message):
            read()


def test_a_resealed_record_must_still_pin_its_sources(store):
    three_tasks(store)
    edit_store_yaml(store, lambda doc: doc["tasks"][2]["source_pins"].update(semseg="1" * 64))
    with pytest.raises(StoreError, match="task 'edge' was trained against 'semseg' with sha256 1111"):
        _ = store.tasks


def test_a_non_utf8_store_yaml_is_one_clear_error(store):
    text = three_tasks(store)
    store.store_file.write_bytes(text[:40] + b"\xff\xfe" + text[42:])
    with pytest.raises(StoreError, match=r"store\.yaml is not UTF-8 text \(byte 40\)"):
        store.verify()


def test_a_schema_1_store_is_refused_naming_the_migration(store):
    three_tasks(store)
    edit_store_yaml(store, lambda doc: doc.update(schema_version=1))
    with pytest.raises(StoreError, match=r"schema_version 1 .*rcm-nddr store migrate"):
        _ = store.tasks


# ----------------------------------------------------------------------------- what a registration refuses


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_registration_refuses_non_finite_tensors_naming_them(store, bad):
    state = task_state(0)
    state["head.weight"][1, 2] = bad
    before = store.store_file.read_bytes()
    with pytest.raises(StoreError, match=r"task 'semseg': tensor 'head.weight' has 1 of 8 values that are NaN"):
        store.register_group([record("semseg")], {"semseg": state}, {"semseg": probe()})
    assert store.store_file.read_bytes() == before and not (store.path / "tasks" / "semseg.safetensors").exists()


def test_registration_needs_a_probe_for_every_task(store):
    with pytest.raises(StoreError, match=r"probes are given for \[\], expected \['semseg'\]"):
        store.register_group([record("semseg")], {"semseg": task_state(0)}, {})


def test_registration_refuses_a_source_replaced_since_the_pin(store):
    (semseg,) = register(store, "semseg")
    pin = semseg.files[semseg.tensors_file]
    register_zeros(store, replace=True)  # semseg replaced while "edge" trained against the old one
    with pytest.raises(StoreError, match="'edge' was trained against 'semseg' with sha256 .*it was replaced"):
        store.register_group(
            [record("edge", ("semseg",), source_pins={"semseg": pin})], {"edge": task_state(1)}, {"edge": probe()}
        )
    assert [t.name for t in store.tasks] == ["semseg"]


def test_the_next_writer_deletes_temporaries_of_a_killed_one(store):
    register(store, "semseg")
    stale = [store.path / "tasks" / ".depth.safetensors.x1y2.tmp", store.path / ".store.yaml.a1b2.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    _ = store.tasks  # readers leave them
    assert all(path.exists() for path in stale)
    register(store, "depth")
    assert not any(path.exists() for path in stale) and store.verify(probes=False) == []


# ----------------------------------------------------------------------------- confinement and readers


def test_remove_and_replace_never_touch_a_file_outside_the_store(store, tmp_path):
    register(store, "semseg")
    outside = tmp_path / "precious.bin"
    inner = store.path / "tasks" / "semseg.safetensors"
    outside.write_bytes(inner.read_bytes())
    inner.unlink()
    inner.symlink_to(outside)  # same bytes, so the sha256 matches: only the path gives it away
    for action in (lambda: store.remove("semseg"), lambda: register_zeros(store, replace=True)):
        with pytest.raises(StoreError, match="which is not inside the store"):
            action()
        assert outside.is_file() and inner.is_symlink()
    assert [t.name for t in store.tasks] == ["semseg"]


def test_a_reader_creates_no_lock_file_and_writes_nothing(store):
    register(store, "semseg")
    (store.path / "store.yaml.lock").unlink()
    before = sorted(p.name for p in store.path.rglob("*"))
    assert store.verify(probes=False) == [] and [t.name for t in store.tasks] == ["semseg"]
    store.load_task_tensors("semseg")
    assert sorted(p.name for p in store.path.rglob("*")) == before


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_store_files_follow_the_umask(tmp_path, decomposition, umask, mode):
    old = os.umask(umask)
    try:
        store = ModelStore.create(tmp_path / "store", "resnet18", "tiny bank", bank(), decomposition_file=decomposition)
        register(store, "semseg")
    finally:
        os.umask(old)
    files = [p for p in store.path.rglob("*") if p.is_file() and p.name != "store.yaml.lock"]
    assert len(files) >= 5 and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_a_plugin_named_by_a_store_is_imported_only_when_allowed(store, tmp_path):
    marker = tmp_path / "it-ran"
    plugin = tmp_path / "planted.py"
    plugin.write_text(f"from pathlib import Path\n\nPath({str(marker)!r}).touch()\n")
    register(store, "semseg")
    edit_store_yaml(store, lambda doc: doc["tasks"][0].update(type="planted", model={"plugins": [str(plugin)]}))
    refused = rf"task 'semseg' has type 'planted', registered by plug-in\(s\) \['{plugin}'\].*--allow-plugins {plugin}"
    for read in (store.verify, store.load_model, lambda: store.load_model(allow_plugins=["some_other_module"])):
        with pytest.raises(StoreError, match=refused):
            read()
    assert not marker.exists()
    # allowed, it is imported (the record, made by hand, describes no network: the load stops there)
    with pytest.raises(StoreError, match=r"store\.yaml: task 'semseg'"):
        store.load_model(allow_plugins=[str(plugin)])
    assert marker.exists()

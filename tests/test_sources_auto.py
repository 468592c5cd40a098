"""``fusion.sources: auto``: a probe measures each stored task's affinity to the new one (the loss increase when
its features are mean-ablated) and the new task reads only the informative ones; the choice is recorded, it
survives --resume without a second probe, and a run told the same sources trains bit-identically."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import rc_run
from safetensors.torch import load_file, save_file

from rcm_nddr import ModelStore
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine import run as run_module
from rcm_nddr.engine.affinity import MEASURE, select
from rcm_nddr.engine.checkpoint import load_checkpoint
from rcm_nddr.engine.plan import GroupPlan, choose_sources, plan_group
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.store.sealing import seal

AUTO = ("fusion.type=nddr", "fusion.sources=auto", "fusion.auto.probe_iters=4", "fusion.auto.batches=2")


def trainer(store: Path, synth: Path, bank: Path, tasks: str, *extra: str, resume: bool = False) -> Trainer:
    return Trainer(load_config(None, rc_run(store, synth, bank, tasks, *extra)), progress=False, resume=resume)


def silence(store: Path, name: str) -> None:
    """Make stored task ``name`` carry nothing about the image: its stem BatchNorm's scale becomes 0 (and its
    shift random), so its features are the same for every image. store.yaml gets the file's new sha256."""
    path = store / "tasks" / f"{name}.safetensors"
    tensors = load_file(str(path))
    prefix = f"backbone.bn1.per_task.{name}"
    tensors[f"{prefix}.weight"] = torch.zeros_like(tensors[f"{prefix}.weight"])
    tensors[f"{prefix}.bias"] = torch.randn(tensors[f"{prefix}.bias"].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, str(path))
    doc = yaml.safe_load((store / "store.yaml").read_text())
    (record,) = [t for t in doc["tasks"] if t["name"] == name]
    record["files"][f"tasks/{name}.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (store / "store.yaml").write_text(yaml.safe_dump(seal(doc), sort_keys=False))


@pytest.fixture(scope="module")
def stored(module_tmp, synth, bank) -> Path:
    """A store of two tasks trained briefly: semseg, and edge made silent (``silence``)."""
    store = module_tmp / "store"
    trainer(store, synth, bank, "[semseg]").run()
    trainer(store, synth, bank, "[edge]").run()
    silence(store, "edge")
    return store


@pytest.fixture
def probes(monkeypatch) -> list[int]:
    """Counts the probes (calls of ``measure_sources`` by ``build_run``)."""
    calls: list[int] = []
    measure = run_module.measure_sources

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(run_module, "measure_sources", counted)
    return calls


def test_auto_reads_the_informative_source_records_why_and_trains_as_if_told(stored, tmp_path, synth, bank, probes):
    told = tmp_path / "told"
    shutil.copytree(stored, told)
    auto = tmp_path / "auto"
    shutil.copytree(stored, auto)
    run = trainer(auto, synth, bank, "[depth]", *AUTO, "fusion.auto.probe_iters=10", "fusion.auto.threshold=0.001")
    assert len(probes) == 1
    measured = run.plan.auto["depth"]
    affinity = measured["affinity"]
    assert list(affinity) == ["semseg", "edge"]  # the candidates, in store order
    assert abs(affinity["edge"]) < 1e-6  # the same for every image: removing it changes nothing
    assert affinity["semseg"] > measured["threshold"] == 0.001
    assert measured["chosen"] == ["semseg"] and measured["measure"] == MEASURE
    assert run.plan.sources == {"depth": ["semseg"]} and run.plan.frozen == ["semseg"]
    assert run.plan.candidates == ["semseg", "edge"]
    run.run()

    (record,) = [t for t in ModelStore(auto).tasks if t.name == "depth"]
    assert record.sources == ["semseg"] and list(record.source_pins) == ["semseg"]
    assert record.model["sources_auto"]["chosen"] == ["semseg"]
    assert record.model["sources_auto"]["affinity"] == pytest.approx(affinity)
    assert record.config["fusion"]["sources"] == "auto"
    assert ModelStore(auto).load_model(["depth"]).fusion.sources["depth"] == ["depth", "semseg"]

    # a run told the chosen sources: the same network, the same draws, the same tensors
    explicit = trainer(told, synth, bank, "[depth]", "fusion.type=nddr", "fusion.sources=[semseg]")
    assert len(probes) == 1 and explicit.plan.sources == run.plan.sources
    explicit.run()
    a, b = ModelStore(auto).load_task_tensors("depth"), ModelStore(told).load_task_tensors("depth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "sources_auto" not in ModelStore(told).task("depth").model


def test_resume_reads_the_checkpointed_choice_without_probing_again(stored, tmp_path, synth, bank, probes):
    store = tmp_path / "store"
    shutil.copytree(stored, store)
    first = trainer(store, synth, bank, "[depth]", *AUTO, "fusion.auto.max_sources=2", "fusion.auto.threshold=-1")
    first.fit(stop_after=1)
    assert first.plan.sources == {"depth": ["semseg", "edge"]}  # every affinity exceeds -1
    saved = load_checkpoint(first.paths.last)["plan"]
    assert saved["auto"]["depth"]["chosen"] == ["semseg", "edge"] and saved["candidates"] == ["semseg", "edge"]
    again = trainer(store, synth, bank, "[depth]", *AUTO, "fusion.auto.max_sources=2", resume=True)
    assert len(probes) == 1
    assert again.plan == first.plan and again.iteration == 1
    again.run()
    assert ModelStore(store).task("depth").model["sources_auto"] == first.plan.auto["depth"]


def test_no_stored_task_means_nothing_to_measure(tmp_path, synth, bank, probes):
    run = trainer(tmp_path / "store", synth, bank, "[depth]", *AUTO)
    assert probes == [] and run.plan.sources == {} and run.plan.frozen == []
    assert run.plan.auto == {"depth": {"measure": MEASURE, "affinity": {}, "chosen": []}}
    run.run()
    assert ModelStore(tmp_path / "store").task("depth").model["sources_auto"]["chosen"] == []


def test_select_keeps_the_sources_above_the_threshold_at_most_k_in_store_order():
    affinity = {"a": 0.02, "b": 0.5, "c": -0.1, "d": 0.3, "e": float("nan")}
    assert select(affinity, 0.01, None) == ["a", "b", "d"]
    assert select(affinity, 0.01, 2) == ["b", "d"]
    assert select(affinity, 0.4, None) == ["b"]
    assert select(affinity, 1.0, None) == []
    assert select({"a": 0.1, "b": 0.1}, 0.0, 1) == ["a"]  # a tie goes to the earlier stored


class Record:
    def __init__(self, name: str, sources: list[str]) -> None:
        self.name, self.sources, self.model = name, sources, {}
        self.tensors_file = f"tasks/{name}.safetensors"
        self.files = {self.tensors_file: name * 4}


def test_the_plan_narrows_to_the_choice_with_the_sources_it_needs_and_round_trips():
    records = [Record("semseg", []), Record("edge", ["semseg"]), Record("depth", [])]
    cfg = load_config(None, ["tasks=[normals, sal]", "fusion.type=nddr", "fusion.sources=auto"])
    plan = plan_group(cfg, records)
    assert plan.candidates == ["semseg", "edge", "depth"] and plan.pending
    assert plan.sources["normals"] == ["semseg", "edge", "depth", "sal"]
    measured = {"normals": {"chosen": ["edge"]}, "sal": {"chosen": []}}
    narrowed = choose_sources(plan, {"normals": ["edge"], "sal": []}, measured, records)
    assert narrowed.sources == {"normals": ["edge", "sal"], "sal": ["normals"]}
    assert narrowed.frozen == ["semseg", "edge"]  # edge reads semseg
    assert narrowed.pins == {"semseg": "semseg" * 4, "edge": "edge" * 4}
    assert not narrowed.pending and narrowed.auto == measured
    assert GroupPlan.from_dict(narrowed.to_dict()) == narrowed
    assert "auto" not in plan_group(load_config(None, ["tasks=[normals]", "fusion.type=nddr"]), records).to_dict()
    with pytest.raises(ValueError, match="not among the candidates"):
        choose_sources(plan, {"normals": ["parts"]}, measured, records)


@pytest.mark.parametrize(
    "override, key",
    [
        ("fusion.auto.probe_iters=0", "fusion.auto.probe_iters"),
        ("fusion.auto.batches=-1", "fusion.auto.batches"),
        ("fusion.auto.max_sources=0", "fusion.auto.max_sources"),
        ("fusion.auto.threshold=.nan", "fusion.auto.threshold"),
        ("fusion.auto.probe_iters=many", "fusion.auto.probe_iters"),
        ("fusion.auto.iters=3", "fusion.auto.iters"),
        ("fusion.sources=some", "fusion.sources"),
    ],
)
def test_bad_auto_options_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ["tasks=[depth]", "fusion.type=nddr", "fusion.sources=auto", override])


def test_auto_needs_a_fusion_to_choose_for():
    with pytest.raises(ConfigError, match="'fusion.sources'.*fusion.type is none"):
        load_config(None, ["tasks=[depth]", "fusion.sources=auto"])
    cfg = load_config(None, ["tasks=[depth]", "fusion.type=cross_stitch", "fusion.sources=auto"])
    assert cfg.fusion.auto.probe_iters == 20 and cfg.fusion.auto.max_sources is None

"""The deploy form: modulators folded into the filter bank and BatchNorm into the convs, the stem's bank
response shared by the tasks; its outputs equal the training form's for every task of a store with
NDDR groups, for plain baselines, and with or without the shared stem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import rc_run

from rcm_nddr import ModelStore
from rcm_nddr.config import load_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.deploy import DeployBackbone, deploy
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn.rc import RCResNet


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "SYNTH_MT", 6, 2, size=(48, 48), seed=2, progress=False)


def train(store: Path, synth: Path, bank: Path, tasks: str, *extra: str) -> None:
    Trainer(load_config(None, rc_run(store, synth, bank, tasks, *extra)), progress=False).run()


@pytest.fixture(scope="module")
def nddr_store(tmp_path_factory, synth, bank) -> Path:
    """RC + RI + NFF: a group of two tasks, then a task reading both through NDDR, then one with the
    NDDR shortcut reading all three."""
    store = tmp_path_factory.mktemp("stores") / "nddr"
    train(store, synth, bank, "[semseg, depth]", "fusion.type=nddr")
    train(store, synth, bank, "[normals]", "fusion.type=nddr")
    train(store, synth, bank, "[edge]", "fusion.type=nddr", "fusion.shortcut=true", "fusion.stages=[layer2, layer4]")
    return store


def images(size=(2, 3, 56, 72)) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(11))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        scale = a[name].abs().max().item()
        err = (a[name] - b[name]).abs().max().item()
        assert err <= 1e-4 * max(scale, 1e-6), f"{name}: max difference {err:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("tasks", [["semseg"], ["depth"], ["normals"], ["edge"], None])
def test_deploy_form_equals_training_form_for_every_task_of_an_nddr_store(nddr_store, tasks):
    store = ModelStore(nddr_store)
    trained = store.load_model(tasks)
    folded = store.load_model(tasks, deploy=True)
    assert isinstance(folded.backbone, DeployBackbone)
    x = images()
    with torch.no_grad():
        assert_close(trained(x, raw=True), folded(x, raw=True))
        post = folded(x)  # post-processed predictions too (class maps compared as they are)
    if tasks == ["semseg"]:
        expected = trained(x)["semseg"]
        assert (post["semseg"] == expected).float().mean() > 0.999
    # every BatchNorm is folded away, and nothing requires a gradient
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())


def test_the_shared_stem_and_per_task_stems_give_the_same_outputs(nddr_store):
    model = ModelStore(nddr_store).load_model(["semseg", "depth"])
    shared, separate = deploy(model, shared_stem=True), deploy(model, shared_stem=False)
    assert shared.backbone.stem_bank is not None and separate.backbone.stem_bank is None
    # the shared stem applies a 1x1 folded modulator per task to one bank response
    assert shared.backbone.paths["semseg"].stem.kernel_size == (1, 1)
    assert separate.backbone.paths["semseg"].stem.kernel_size == (7, 7)
    x = images()
    with torch.no_grad():
        assert_close(separate(x, raw=True), shared(x, raw=True))
        assert_close(model(x, raw=True), shared(x, raw=True))


def test_the_training_form_computes_the_stem_bank_response_once_per_input(nddr_store, monkeypatch):
    model = ModelStore(nddr_store).load_model(["semseg", "depth"])
    backbone: RCResNet = model.backbone
    x = images()
    with torch.no_grad():
        alone = {t: backbone.forward_task_stage(x, "stem", t) for t in ("semseg", "depth")}
        calls = []
        response = backbone.conv1.response
        monkeypatch.setattr(backbone.conv1, "response", lambda inp: calls.append(1) or response(inp))
        together = backbone.forward_stage({"semseg": x, "depth": x}, "stem")
    for t in ("semseg", "depth"):
        assert torch.equal(together[t], alone[t])  # the same computation, bit for bit
    assert len(calls) == 1  # the two tasks shared one bank conv


def test_deploy_form_of_plain_baselines(tmp_path, synth, bank):
    store = tmp_path / "plain"
    train(store, synth, bank, "[sal, normals]", "backbone.reparam=none")
    trained = ModelStore(store).load_model()
    folded = ModelStore(store).load_model(deploy=True)
    x = images()
    with torch.no_grad():
        assert_close(trained(x, raw=True), folded(x, raw=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_deploy_leaves_the_training_form_unchanged(nddr_store):
    model = ModelStore(nddr_store).load_model(["depth"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    deploy(model)
    assert model.training  # its mode is restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

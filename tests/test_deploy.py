"""The deploy form: modulators folded into the filter bank and BatchNorm into the convs, the stem's bank
response shared by the tasks; its outputs equal the training form's for every task of a store with
NDDR groups, for plain baselines, and with or without the shared stem. The batched deploy form (all
tasks stacked, grouped convs, one NDDR conv per stage) gives the same outputs and really runs grouped.
``load_model(deploy=True)`` checks the form it built on the recorded probes, and ``rcm-nddr predict``
writes the same predictions in every form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close, rc_run
from PIL import Image

from rcm_nddr import ModelStore
from rcm_nddr.commands import cli
from rcm_nddr.config import load_config
from rcm_nddr.engine.fast import maybe_compile
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn import deploy as deploy_module
from rcm_nddr.nn.backbone import STAGES, SharedBackbone, resnet_backbone
from rcm_nddr.nn.deploy import BatchedBackbone, BatchedMultiTaskNet, DeployBackbone, deploy
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.rc import RCResNet
from rcm_nddr.store import StoreError


def train(store: Path, synth: Path, bank: Path, tasks: str, *extra: str) -> None:
    Trainer(load_config(None, rc_run(store, synth, bank, tasks, *extra)), progress=False).run()


@pytest.fixture(scope="module")
def nddr_store(module_tmp, synth, bank) -> Path:
    """RC + RI + NFF: a group of two tasks, then a task reading both through NDDR, then one with the
    NDDR shortcut reading all three."""
    store = module_tmp / "nddr"
    train(store, synth, bank, "[semseg, depth]", "fusion.type=nddr")
    train(store, synth, bank, "[normals]", "fusion.type=nddr")
    train(store, synth, bank, "[edge]", "fusion.type=nddr", "fusion.shortcut=true", "fusion.stages=[layer2, layer4]")
    return store


def images(size=(2, 3, 56, 72)) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(11))


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


@pytest.fixture(scope="module")
def plain_store(module_tmp, synth, bank) -> Path:
    """Plain baselines (``reparam: none``): one group of two tasks, each its own fully trained ResNet."""
    store = module_tmp / "plain"
    train(store, synth, bank, "[sal, normals]", "backbone.reparam=none")
    return store


def test_deploy_form_of_plain_baselines(plain_store):
    trained = ModelStore(plain_store).load_model()
    folded = ModelStore(plain_store).load_model(deploy=True)
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


# ----------------------------------------------------------------------------- batched execution


def conv_calls(module: torch.nn.Module, run) -> int:
    """How many Conv2d forward calls ``run()`` makes inside ``module``."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in module.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


@pytest.mark.parametrize("tasks", [["semseg"], ["depth"], ["normals"], ["edge"], ["normals", "edge"], None])
def test_batched_deploy_form_equals_the_per_task_deploy_and_training_forms(nddr_store, tasks):
    store = ModelStore(nddr_store)
    trained = store.load_model(tasks)
    folded = store.load_model(tasks, deploy=True)
    batched = store.load_model(tasks, deploy=True, batched=True)
    assert isinstance(batched, BatchedMultiTaskNet) and isinstance(batched.backbone, BatchedBackbone)
    assert batched.backbone.order == trained.fusion.required(trained.task_names)  # sources are stacked too
    assert batched.task_names == trained.task_names and set(batched.heads) == set(trained.heads)
    x = images()
    with torch.no_grad():
        expected = trained(x, raw=True)
        assert_close(expected, batched(x, raw=True))
        assert_close(folded(x, raw=True), batched(x, raw=True))
        post = batched(x)  # post-processed outputs have the training form's keys and shapes
    assert post.keys() == expected.keys()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in batched.modules())
    assert not any(p.requires_grad for p in batched.parameters())


@pytest.mark.parametrize("subset", [["edge"], ["semseg"], ["normals", "depth"], ["edge", "semseg"]])
def test_a_batched_model_of_every_task_answers_subsets_of_them(nddr_store, subset):
    store = ModelStore(nddr_store)
    trained, batched = store.load_model(), store.load_model(deploy=True, batched=True)
    x = images()
    with torch.no_grad():
        out = batched(x, tasks=subset, raw=True)
        assert list(out) == subset
        assert_close(trained(x, tasks=subset, raw=True), out)
    with pytest.raises(KeyError, match="unknown tasks"):
        batched(x, tasks=["nope"])


def test_the_batched_form_runs_the_one_multitask_forward_on_a_stack():
    # the batched form changes how features are held between stages, not the stage loop
    assert BatchedMultiTaskNet.forward is MultiTaskNet.forward
    for hook in ("stage_input", "run_stage", "task_features"):
        assert getattr(BatchedMultiTaskNet, hook) is not getattr(MultiTaskNet, hook)


def test_the_batched_form_with_and_without_the_shared_stem(nddr_store):
    model = ModelStore(nddr_store).load_model(["normals"])  # reads semseg and depth: a stack of three
    shared = deploy(model, shared_stem=True, batched=True)
    separate = deploy(model, shared_stem=False, batched=True)
    # the shared stem: one 7x7 bank conv, then every task's 1x1 folded modulator in one dense conv
    assert shared.backbone.stem_bank is not None and separate.backbone.stem_bank is None
    assert (shared.backbone.stem.kernel_size, shared.backbone.stem.in_channels) == ((1, 1), 64)
    assert (separate.backbone.stem.kernel_size, separate.backbone.stem.in_channels) == ((7, 7), 3)
    assert shared.backbone.stem.out_channels == separate.backbone.stem.out_channels == 3 * 64
    x = images()
    with torch.no_grad():
        expected = model(x, raw=True)
        assert_close(expected, shared(x, raw=True))
        assert_close(expected, separate(x, raw=True))


def test_the_batched_form_runs_grouped_convs_and_one_nddr_conv_per_stage(nddr_store):
    model = ModelStore(nddr_store).load_model()
    run = model.fusion.required(model.task_names)
    t = len(run)
    per_task, batched = deploy(model), deploy(model, batched=True)
    backbone = batched.backbone
    # every block conv and downsample of every task is in one grouped conv (resnet18: 16 + 3 per task)
    grouped = [m for m in backbone.stages.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(grouped) == 19 and all(m.groups == t for m in grouped)
    fusing = {s for task in model.fusion.stages for s in model.fusion.stages[task]}
    assert set(batched.fusion.convs) == fusing == set(STAGES)
    # at the stem the shortcut task (edge, fusing at layer2/layer4 only) passes through: 3 rows of 4
    assert len(batched.fusion.rows["stem"]) == t - 1 and len(batched.fusion.rows["layer2"]) == t
    x = images()
    with torch.no_grad():
        # backbone and fusion: bank conv + stem conv + 19 grouped convs + one NDDR conv per stage, for all tasks
        calls = conv_calls(backbone, lambda: batched(x, raw=True)) + conv_calls(
            batched.fusion.convs, lambda: batched(x, raw=True)
        )
        assert calls == 2 + 19 + len(STAGES)
        # the per-task deploy form makes about T times as many (the stem's bank conv is shared there too)
        looped = conv_calls(per_task.backbone, lambda: per_task(x, raw=True))
        assert looped == 1 + t * (1 + 19)


def test_batched_deploy_of_plain_baselines_and_a_single_task(plain_store):
    store = ModelStore(plain_store)
    x = images()
    for tasks in (None, ["sal"], ["normals"]):
        trained = store.load_model(tasks)
        folded = store.load_model(tasks, deploy=True)
        batched = store.load_model(tasks, deploy=True, batched=True)
        t = len(trained.task_names)
        assert isinstance(batched, BatchedMultiTaskNet) and batched.fusion is None
        # plain per-task networks: every task's folded 7x7 stem in one dense conv from the image
        assert batched.backbone.stem_bank is None and batched.backbone.stem.out_channels == t * 64
        assert batched.backbone.stem.kernel_size == (7, 7) and batched.backbone.stem.in_channels == 3
        convs = [m for m in batched.backbone.stages.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(m.groups == t for m in convs)
        with torch.no_grad():
            expected = trained(x, raw=True)
            assert_close(expected, batched(x, raw=True))
            assert_close(folded(x, raw=True), batched(x, raw=True))
            if t > 1:
                assert_close({"sal": expected["sal"]}, batched(x, tasks=["sal"], raw=True))


def test_batched_has_no_effect_on_a_shared_backbone(plain_store):
    trained = ModelStore(plain_store).load_model()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        net = resnet_backbone("resnet18", output_stride=trained.backbone.output_stride)
    shared = MultiTaskNet(trained.tasks, SharedBackbone(net), {k: v for k, v in trained.heads.items()}).eval()
    batched = deploy(shared, batched=True)
    assert type(batched) is MultiTaskNet and isinstance(batched.backbone, SharedBackbone)
    x = images()
    with torch.no_grad():
        assert_close(shared(x, raw=True), batched(x, raw=True))


def test_load_model_batched_needs_deploy(nddr_store):
    with pytest.raises(ValueError, match="deploy=True"):
        ModelStore(nddr_store).load_model(["depth"], batched=True)


# ----------------------------------------------------------------------------- rcm-nddr predict


def test_the_deploy_form_traced_by_dynamo_gives_the_eager_outputs(nddr_store, aot_eager_compile):
    """The deploy form as ``rcm-nddr predict --compile`` runs it (``maybe_compile``): TorchDynamo traces it
    (with the ``aot_eager`` backend, see the fixture) and the compiled network answers as the eager one."""
    model = ModelStore(nddr_store).load_model(["normals"], deploy=True)
    compiled = maybe_compile(model, True)
    assert aot_eager_compile == ["default"]
    x = images((1, 3, 32, 40))
    with torch.no_grad():
        assert_close(model(x, raw=True), compiled(x, raw=True))


def test_predict_command_runs_each_form_with_the_same_outputs(nddr_store, tmp_path, recorded_compile):
    """``rcm-nddr predict`` on a real store: the deploy form (the default), the batched form, the training
    form and the compiled deploy form (recorded without tracing, see the fixture: the test above traces
    it) write the same predictions."""
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 56), (40, 56), (33, 47)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    runs = {"deploy": [], "batched": ["--form", "batched"], "training": ["--form", "training"]}
    runs["compiled"] = ["--compile"]
    for name, extra in runs.items():
        argv = ["predict", "--store", str(nddr_store), "--images", str(tmp_path), "--out", str(tmp_path / name)]
        assert cli.main([*argv, "--device", "cpu", "--quiet", *extra]) == 0
    assert [c.mode for c in recorded_compile] == ["default"] and recorded_compile[0].calls >= 1
    for task in ("semseg", "depth", "normals", "edge"):
        for stem in ("im0", "im1", "im2"):
            reference = np.load(tmp_path / "training" / task / f"{stem}.npy")
            for name in ("deploy", "batched", "compiled"):
                value = np.load(tmp_path / name / task / f"{stem}.npy")
                assert value.dtype == reference.dtype and value.shape == reference.shape
                if task == "semseg":  # class maps: argmax of logits equal to 1e-4; ties are not expected
                    assert (value == reference).mean() >= 0.999, (name, stem)
                else:
                    np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-5, err_msg=f"{name} {task}")


def test_load_model_checks_the_deploy_form_against_the_recorded_probes(nddr_store, tmp_path, monkeypatch, capsys):
    """A fold that is not exact (as it could be for a plug-in head) is caught on the probes: StoreError
    naming the task, and ``rcm-nddr predict`` exits 2 with the message; ``check_deploy=False`` skips it."""
    fold = deploy_module.fold_sequences

    def inexact_fold(module):
        fold(module)
        last = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        if last.out_channels == 1:  # the depth and edge heads' prediction convs
            last.weight.mul_(1.01)

    monkeypatch.setattr(deploy_module, "fold_sequences", inexact_fold)
    store = ModelStore(nddr_store)
    with pytest.raises(StoreError, match="the deploy form does not reproduce") as error:
        store.load_model(["semseg", "depth", "edge"], deploy=True)
    assert "task 'depth'" in str(error.value) and "task 'edge'" in str(error.value)
    assert "task 'semseg'" not in str(error.value)
    store.load_model(["semseg"], deploy=True)  # its head has no such conv: unchanged, checked, loaded
    store.load_model(["depth"], deploy=True, check_deploy=False)
    with pytest.raises(StoreError, match="task 'depth'"):
        store.load_model(["depth"], deploy=True, batched=True)
    Image.new("RGB", (40, 48)).save(tmp_path / "x.png")
    argv = ["predict", "--store", str(nddr_store), "--images", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--device", "cpu", "--tasks", "edge"]) == 2
    assert "task 'edge'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert cli.main([*argv, "--device", "cpu", "--tasks", "edge", "--form", "training", "--quiet"]) == 0

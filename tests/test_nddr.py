"""NDDR fusion: the layer's initialization by hand, one-way and joint fusion, gradients across task
paths, the fusion learning-rate group through the schedule, and a fused group trained end to end."""

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_run

from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.plan import plan_group
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn.nddr import NDDRFusion, NDDRLayer

RESNET18_CHANNELS = {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def tiny(store: Path, data: Path, tasks: str, *extra: str) -> list[str]:
    return tiny_run(
        store, data, tasks, "train.max_iters=4", "train.val_every=4", "test.batch_size=2", "fusion.type=nddr", *extra
    )


def conv_output(layer: NDDRLayer, sources: list[torch.Tensor]) -> torch.Tensor:
    """What the layer's 1x1 conv computes inside ``layer(sources)``, before BatchNorm."""
    seen = []
    handle = layer.conv.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    layer(sources)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("n_sources", "beta", "expected_beta"),
    [(1, None, 0.0), (2, None, 0.1), (3, None, 0.05), (3, 0.2, 0.2)],
)
def test_initialized_layer_is_alpha_own_plus_beta_others_before_batchnorm(n_sources, beta, expected_beta):
    torch.manual_seed(0)
    sources = [torch.randn(2, 4, 3, 5) for _ in range(n_sources)]
    layer = NDDRLayer(4, n_sources, alpha=0.9, beta=beta)
    expected = 0.9 * sources[0] + sum((expected_beta * x for x in sources[1:]), torch.zeros_like(sources[0]))
    torch.testing.assert_close(conv_output(layer, sources), expected)
    assert layer.conv.bias is None and layer.conv.weight.shape == (4, 4 * n_sources, 1, 1)
    assert torch.equal(layer.bn.weight, torch.ones(4)) and torch.equal(layer.bn.bias, torch.zeros(4))


def test_layer_refuses_the_wrong_number_of_sources():
    with pytest.raises(ValueError, match="expects 2 source"):
        NDDRLayer(4, 2)([torch.randn(1, 4, 2, 2)])


def test_one_way_fusion_leaves_the_source_task_untouched():
    torch.manual_seed(0)
    fusion = NDDRFusion({"b": ["b", "a"]}, {"stem": 4, "layer1": 4}, ["layer1"], alpha=0.9).eval()
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert set(fusion) == {"b"} and set(fusion["b"]) == {"layer1"}
    for features in ({"a": a, "b": b}, {"b": b, "a": a}):
        out = fusion("layer1", features)
        assert out["a"] is a
        # eval-mode BatchNorm at its initial statistics (mean 0, var 1) only divides by sqrt(1 + eps)
        torch.testing.assert_close(out["b"], torch.relu((0.9 * b + 0.1 * a) / (1 + 1e-5) ** 0.5))
    assert fusion("stem", {"a": a, "b": b})["b"] is b  # not a fusion stage
    with pytest.raises(KeyError, match=r"\['a'\]"):
        fusion("layer1", {"b": b})
    assert fusion.required(["b"]) == ["b", "a"] and fusion.required(["a"]) == ["a"]


def test_joint_fusion_reads_pre_fusion_features_whatever_the_task_order():
    torch.manual_seed(0)
    fusion = NDDRFusion({"a": ["a", "b"], "b": ["b", "a"]}, {"layer2": 4}, ["layer2"]).eval()
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    forward, backward = fusion("layer2", {"a": a, "b": b}), fusion("layer2", {"b": b, "a": a})
    for task, own, other in (("a", a, b), ("b", b, a)):
        torch.testing.assert_close(forward[task], backward[task])
        torch.testing.assert_close(forward[task], torch.relu((0.9 * own + 0.1 * other) / (1 + 1e-5) ** 0.5))


def test_gradient_of_one_task_reaches_both_paths_of_a_joint_group(tmp_path, synth):
    cfg = load_config(None, tiny(tmp_path, synth, "[semseg, depth]"))
    model = Trainer(cfg, progress=False).model.train()
    model(torch.randn(2, 3, 48, 48), raw=True)["semseg"].square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}

    def reached(prefix: str) -> bool:
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))

    assert reached("backbone.paths.semseg.") and reached("fusion.semseg.layer4.")
    assert reached("backbone.paths.depth.") and reached("fusion.depth.layer3.")  # only through semseg's NDDR
    assert not reached("heads.depth.") and not reached("fusion.depth.layer4.")  # layer4 of depth feeds its head only


def test_fusion_parameters_train_in_their_own_group_with_their_decay(tmp_path, synth):
    """On the real network; the lr ratio through the schedule is checked on a toy module (test_engine)."""
    extra = ("optimizer.name=sgd", "optimizer.lr=0.01", "fusion.lr_mult=100", "fusion.weight_decay=0.001")
    cfg = load_config(None, tiny(tmp_path, synth, "[semseg, depth]", *extra))
    trainer = Trainer(cfg, progress=False)
    base, fused = trainer.optimizer.param_groups
    fusion_ids = {id(p) for n, p in trainer.model.named_parameters() if n.startswith("fusion.")}
    assert fusion_ids and {id(p) for p in fused["params"]} == fusion_ids
    assert not fusion_ids & {id(p) for p in base["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for p in base["params"]} | fusion_ids == trainable
    assert fused["weight_decay"] == 0.001 and base["weight_decay"] == 1e-4
    assert fused["lr"] == pytest.approx(100 * base["lr"]) and base["lr"] == pytest.approx(0.01)


def test_without_fusion_there_is_one_group_and_no_fusion_module(tmp_path, synth):
    trainer = Trainer(load_config(None, tiny(tmp_path, synth, "[depth]", "fusion.type=none")), progress=False)
    assert trainer.model.fusion is None and len(trainer.optimizer.param_groups) == 1


def test_fused_rc_group_trains_end_to_end_with_fusion_accounted(tmp_path, synth):
    extra = ("backbone.reparam=rc", "backbone.weights=none", f"backbone.decomposition={tmp_path / 'ri.safetensors'}")
    cfg = load_config(None, tiny(tmp_path / "store", synth, "[semseg, depth]", *extra))
    trainer = Trainer(cfg, progress=False)
    initial = trainer.model.fusion["depth"]["layer2"].conv.weight.detach().clone()
    metrics = trainer.fit()
    assert set(metrics) == {"semseg", "depth"}
    assert not torch.equal(trainer.model.fusion["depth"]["layer2"].conv.weight, initial)
    # per task and stage: a 2C -> C 1x1 conv and a BatchNorm (weight and bias)
    expected = sum(2 * c * c + 2 * c for c in RESNET18_CHANNELS.values())
    saved = json.loads((tmp_path / "store" / "runs" / "semseg+depth" / "parameters.json").read_text())
    for task in ("semseg", "depth"):
        assert trainer.parameter_counts[task]["fusion"] == expected == saved[task]["fusion"]
        assert trainer.parameter_counts[task]["modulators"] > 0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("fusion.sources=[semseg]", "fusion.sources"),  # a task of the group itself, not a stored one
        ("fusion.sources=[parts]", "fusion.sources"),  # not in the (empty) store
        ("fusion.stages=[layer1, layer9]", "fusion.stages"),
        ("fusion.stages=[]", "fusion.stages"),
    ],
)
def test_bad_fusion_settings_are_refused_naming_the_key(tmp_path, override, key):
    cfg = load_config(None, ["tasks=[semseg, depth]", "fusion.type=nddr", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_group(cfg, [])


def test_task_names_that_clash_with_fusion_attributes_are_refused():
    from rcm_nddr.nn.nddr import NDDRFusion

    with pytest.raises(ValueError, match="clash"):
        NDDRFusion({"stages": ["stages"]}, {"layer1": 4}, ["layer1"])
    with pytest.raises(ValueError, match="clash"):
        NDDRFusion({"forward": ["forward"]}, {"layer1": 4}, ["layer1"])


def test_a_group_reading_a_stored_task_also_loads_what_that_task_reads():
    from rcm_nddr.store import TaskRecord

    records = [
        TaskRecord("semseg", "semseg", group=1),
        TaskRecord("edge", "edge", group=2),
        TaskRecord("depth", "depth", group=3, sources=["edge"]),
        TaskRecord("normals", "normals", group=4, sources=["depth"]),
    ]
    cfg = load_config(None, ["tasks=[sal, parts]", "fusion.type=nddr", "fusion.sources=[normals]"])
    plan = plan_group(cfg, records)
    assert plan.sources == {"sal": ["normals", "parts"], "parts": ["normals", "sal"]}
    assert plan.frozen == ["edge", "depth", "normals"]  # store order; semseg is read by nobody here
    everything = plan_group(load_config(None, ["tasks=[sal]", "fusion.type=nddr"]), records)
    assert everything.sources == {"sal": ["semseg", "edge", "depth", "normals"]}
    assert plan_group(load_config(None, ["tasks=[sal]", "fusion.type=none"]), records).frozen == []


def test_own_sources_read_no_stored_task_nor_group_mate_and_still_check_the_stages():
    from rcm_nddr.store import TaskRecord

    records = [TaskRecord("semseg", "semseg", group=1)]
    own = ["tasks=[sal, parts]", "fusion.type=nddr", "fusion.sources=own"]
    plan = plan_group(load_config(None, own), records)
    assert plan.sources == {} and plan.frozen == [] and plan.candidates == []
    with pytest.raises(ConfigError, match=r"fusion\.stages"):
        plan_group(load_config(None, [*own, "fusion.stages=[layer9]"]), records)

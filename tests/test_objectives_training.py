"""The group objectives in training: every loss weighting and the consistency terms train a tiny group and
resume exactly, bad objective configs are one error naming the key (before anything is written), and a
new task learns from a stored task's predictions (the guarantee that stored tasks stay bit-identical is
extended in test_incremental)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_run

from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.objective import build_objective
from rcm_nddr.engine.trainer import Trainer

PLUGIN = Path(__file__).parent / "plugins" / "toy_tasks.py"
METHODS = ["fixed", "uncertainty", "gradnorm", "dwa", "pcgrad", "famo"]
#: task loss options trained along with the weightings (each weighting's run covers one)
TASK_OPTIONS = {
    "uncertainty": ["loss.depth.type=mse"],
    "gradnorm": ["loss.depth.type=smoothl1"],
    "famo": ["loss.depth.type=logl1"],
    "pcgrad": ["loss.semseg.label_smoothing=0.1"],
}
XTASK = (
    "loss.consistency=[{source: semseg, target: depth, loss: l1, weight: 0.1, mix: convex},"
    " {source: depth, target: semseg, loss: cross, weight: 0.1, mix: convex, supervise: both}]"
)


def group(store: Path, data: Path, *extra: str) -> list[str]:
    """A two-task group with NDDR fusion (its tasks share the NDDR layers), 3 iterations."""
    return tiny_run(
        store, data, "[semseg, depth]", "fusion.type=nddr", "train.max_iters=3", "train.val_every=3", *extra
    )


def train_and_resume(tmp_path: Path, synth: Path, *extra: str) -> Trainer:
    """Train the group straight through, and again interrupted after one iteration and resumed: the network
    and the objective's state must end the same. Returns the straight run's trainer."""
    straight = Trainer(load_config(None, group(tmp_path / "a", synth, *extra)), progress=False)
    straight.fit()
    cfg = load_config(None, group(tmp_path / "b", synth, *extra))
    Trainer(cfg, progress=False).fit(stop_after=1)
    resumed = Trainer(cfg, resume=True, progress=False)
    resumed.fit()
    for a, b in (
        (straight.model.state_dict(), resumed.model.state_dict()),
        (straight.objective.objective.state_dict(), resumed.objective.objective.state_dict()),
    ):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    return straight


# (uncertainty trains with the consistency terms: its run covers both)
@pytest.mark.parametrize("method", [m if m != "uncertainty" else "uncertainty+xtask" for m in METHODS])
def test_every_objective_trains_and_resumes_exactly(tmp_path, synth, method):
    kind, _, xtask = method.partition("+")
    extra = [f"loss.weighting={{type: {kind}, period: 1}}" if kind == "dwa" else f"loss.weighting={{type: {kind}}}"]
    extra += [XTASK] if xtask else []
    extra += TASK_OPTIONS.get(kind, [])
    straight = train_and_resume(tmp_path, synth, *extra)
    weights = straight.objective.objective.weighting.current()
    assert torch.isfinite(weights).all() and weights.shape == (2,)
    if kind not in ("fixed", "pcgrad"):  # PCGrad draws its orders from (seed, iteration): no state
        assert straight.objective.objective.state_dict(), "a learned weighting has state to save"
    if xtask:
        terms = [t.name for t in straight.objective.objective.terms]
        assert terms == ["semseg_to_depth", "depth_to_semseg"]
        nets = {id(p) for t in straight.objective.objective.terms for p in t.parameters()}
        optimized = {id(p) for g in straight.optimizer.param_groups for p in g["params"]}
        assert nets <= optimized


def test_objective_parameters_train_in_their_own_group_with_their_lr(tmp_path, synth):
    trainer = Trainer(
        load_config(None, group(tmp_path, synth, "loss.weighting={type: uncertainty, lr: 0.5, weight_decay: 0.25}")),
        progress=False,
    )
    log_vars = trainer.objective.objective.weighting.log_vars
    (own,) = [g for g in trainer.optimizer.param_groups if any(p is log_vars for p in g["params"])]
    assert own["lr"] == 0.5 and own["weight_decay"] == 0.25 and len(own["params"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.weighting={type: nope}"], "key 'loss.weighting.type': unknown loss weighting 'nope'"),
        (["loss.weighting={type: uncertainty, init: x}"], "key 'loss.weighting': uncertainty:"),
        (["loss.weighting={type: uncertainty, temperature: 2}"], "key 'loss.weighting': uncertainty:.*temperature"),
        (["loss.weighting={type: gradnorm}", "fusion.type=none"], "key 'loss.weighting.type': gradnorm needs"),
        (["loss.weighting={type: gradnorm, layer: heads.nope}"], "key 'loss.weighting.layer': 'heads.nope': no such"),
        (
            ["loss.consistency=[{source: semseg, target: inverse_depth, loss: l1}]", f"plugins=[{PLUGIN}]"],
            "key 'loss.consistency\\[0\\].target': .* has no transfer net",
        ),
        (["loss.consistency=[{source: semseg, target: depth, loss: cross}]"], "key 'loss.consistency\\[0\\].loss'"),
        (["loss.consistency=[{source: sal, target: depth, loss: l1}]"], "key 'loss.consistency\\[0\\].source'"),
    ],
)
def test_a_bad_objective_config_is_one_error_naming_the_key_and_writes_nothing(tmp_path, synth, overrides, message):
    store = tmp_path / "store"
    tasks = "[semseg, depth, inverse_depth]" if any("inverse_depth" in o for o in overrides) else "[semseg, depth]"
    cfg = load_config(None, [*group(store, synth, *overrides), f"tasks={tasks}"])
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, progress=False)
    assert not store.exists()


def test_a_plugin_weighting_is_built_by_name(tmp_path, synth):
    weighting = "loss.weighting={type: first_only, scale: 3}"
    cfg = load_config(None, group(tmp_path, synth, f"plugins=[{PLUGIN}]", weighting))
    trainer = Trainer(cfg, progress=False)
    assert trainer.objective.objective.weighting.current().tolist() == [3.0, 0.0]
    trainer.fit(stop_after=1)
    assert all(p.grad is None or not p.grad.any() for n, p in trainer.model.named_parameters() if "heads.depth." in n)


def test_gradient_surgery_is_refused_under_torchrun(tmp_path, synth):
    trainer = Trainer(load_config(None, group(tmp_path, synth)), progress=False)
    s = trainer.setup
    cfg = load_config(None, group(tmp_path, synth, "loss.weighting={type: pcgrad}"))
    with pytest.raises(ConfigError, match="key 'loss.weighting.type': pcgrad cannot train under torchrun"):
        build_objective(cfg, s.tasks, s.weights, s.model, None, s.device, 3, distributed=True)


def test_a_second_consistency_recipe_trains_and_resumes_exactly(tmp_path, synth):
    """SSIM and KL transfer losses, label supervision, an undetached target, the transfer net's options."""
    xtask = (
        "loss.consistency=[{source: semseg, target: depth, loss: ssim, weight: 0.5, supervise: label,"
        " batch_norm: true}, {source: depth, target: semseg, loss: kl, weight: 0.2, detach_target: false}]"
    )
    extra = ("loss.weighting={type: dwa, period: 1}", xtask, "loss.semseg.label_smoothing=0.1", "loss.depth.type=logl1")
    straight = train_and_resume(tmp_path, synth, *extra)
    # the transfer net's BatchNorm statistics are part of the objective's state
    assert any("running_mean" in k for k in straight.objective.objective.state_dict())


@pytest.mark.slow  # TorchDynamo traces a training step with GradNorm
def test_gradnorm_trains_with_train_compile(tmp_path, synth, aot_eager_compile):
    cfg = load_config(None, group(tmp_path, synth, "loss.weighting={type: gradnorm}", "train.compile=true"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit(stop_after=2)
    assert aot_eager_compile == ["default", "default"]  # the step's and the validation's module
    weights = trainer.objective.objective.weighting.current()
    assert weights.sum().item() == pytest.approx(2.0) and not torch.equal(weights, torch.ones(2))


SHIPPED = sorted(
    p
    for folder in ("synthetic/objectives", "Cityscapes", "NYUv2_MTAN")
    for p in (Path(__file__).resolve().parents[1] / "configs" / folder).glob("*.yaml")
)


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_objective_config_builds_its_objective(tmp_path, synth, config):
    """Each shipped objective config builds its run (weighting options, consistency losses, task options),
    on SYNTH_MT in place of its dataset."""
    shrink = [
        f"store={tmp_path / 'store'}",
        "dataset.name=synthetic",
        f"dataset.root={synth}",
        "dataset.options={}",
        "dataset.crop=[32, 32]",
        "backbone.weights=none",
        "backbone.arch=resnet18",
        f"backbone.decomposition={tmp_path / 'ri.safetensors'}",
        "head.channels=8",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.device=cpu",
    ]
    cfg = load_config(config, shrink)
    objective = Trainer(cfg, progress=False).objective.objective
    assert objective.weighting.names == cfg.tasks
    assert [t.name for t in objective.terms] == [f"{c.source}_to_{c.target}" for c in cfg.consistency]

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
XTASK = (
    "loss.consistency=[{source: semseg, target: depth, loss: l1, weight: 0.1, mix: convex},"
    " {source: depth, target: semseg, loss: cross, weight: 0.1, mix: convex, supervise: both}]"
)


def group(store: Path, data: Path, *extra: str) -> list[str]:
    """A two-task group with NDDR fusion (its tasks share the NDDR layers), 4 iterations."""
    return tiny_run(
        store, data, "[semseg, depth]", "fusion.type=nddr", "train.max_iters=4", "train.val_every=4", *extra
    )


@pytest.mark.parametrize("method", [*METHODS, "uncertainty+xtask"])
def test_every_objective_trains_and_resumes_exactly(tmp_path, synth, method):
    kind, _, xtask = method.partition("+")
    extra = [f"loss.weighting={{type: {kind}, period: 2}}" if kind == "dwa" else f"loss.weighting={{type: {kind}}}"]
    extra += [XTASK] if xtask else []
    straight = Trainer(load_config(None, group(tmp_path / "a", synth, *extra)), progress=False)
    straight.fit()
    cfg = load_config(None, group(tmp_path / "b", synth, *extra))
    Trainer(cfg, progress=False).fit(stop_after=2)
    resumed = Trainer(cfg, resume=True, progress=False)
    resumed.fit()
    for a, b in (
        (straight.model.state_dict(), resumed.model.state_dict()),
        (straight.objective.objective.state_dict(), resumed.objective.objective.state_dict()),
    ):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
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


def test_gradient_surgery_is_refused_under_torchrun(tmp_path, synth):
    trainer = Trainer(load_config(None, group(tmp_path, synth)), progress=False)
    s = trainer.setup
    cfg = load_config(None, group(tmp_path, synth, "loss.weighting={type: pcgrad}"))
    with pytest.raises(ConfigError, match="key 'loss.weighting.type': pcgrad cannot train under torchrun"):
        build_objective(cfg, s.tasks, s.weights, s.model, None, s.device, 3, distributed=True)

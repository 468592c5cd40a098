"""The group objective's parts on toy inputs: the uncertainty weighting against hand-computed values, how
consistency terms join the task losses, the transfer net's shapes, and which parameters count as shared."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from rcm_nddr.config import load_config
from rcm_nddr.engine.objective import BuiltObjective
from rcm_nddr.objectives import WEIGHTINGS, GroupObjective, StepContext, TaskTransferNet, shared_layers, task_reach
from rcm_nddr.objectives.shared import shared_parameters


class Stub:
    """A stand-in task: a loss that is the mean of the output, and a loss kind."""

    def __init__(self, kind: str = "regression") -> None:
        self.loss_kind = kind

    def loss(self, output, target):
        return output.mean()


def test_uncertainty_weighting_matches_kendall_et_al():
    tasks = {"depth": Stub("regression"), "semseg": Stub("classification")}
    weighting = WEIGHTINGS.get("uncertainty")(tasks, {"depth": 1.0, "semseg": 1.0})
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    losses = torch.tensor([2.0, 3.0])
    # regression: 0.5 * e^0 * 2 + 0.5 * 0 = 1; classification: e^-log2 * 3 + 0.5 * log 2 = 1.5 + 0.34657...
    total = weighting.loss(losses)
    assert total.item() == pytest.approx(1.0 + 1.5 + 0.5 * math.log(2.0))
    total.backward()
    # d/ds (c e^-s L + s / 2) = -c e^-s L + 1/2: -0.5 * 2 + 0.5 = -0.5 and -0.5 * 3 + 0.5 = -1.0
    assert weighting.log_vars.grad.tolist() == pytest.approx([-0.5, -1.0])
    assert weighting.current().tolist() == pytest.approx([0.5, 0.5])
    # the configured weights multiply the loss terms; a form can be forced per task
    forced = WEIGHTINGS.get("uncertainty")(tasks, {"depth": 2.0, "semseg": 1.0}, forms={"semseg": "regression"})
    assert forced.loss(losses).item() == pytest.approx(0.5 * 2 * 2 + 0.5 * 3)
    with pytest.raises(ValueError, match="forms"):
        WEIGHTINGS.get("uncertainty")(tasks, {"depth": 1.0, "semseg": 1.0}, forms={"semseg": "ranking"})


def test_fixed_weighting_is_the_weighted_sum():
    tasks = {"a": Stub(), "b": Stub()}
    weighting = WEIGHTINGS.get("fixed")(tasks, {"a": 2.0, "b": 0.5})
    x = torch.tensor([1.0, 4.0], requires_grad=True)
    weighting.backward(x * 1.0, StepContext())
    assert x.grad.tolist() == [2.0, 0.5]
    assert list(weighting.state_dict()) == []  # nothing to save


class ConstantTerm(nn.Module):
    """A consistency term stand-in with a fixed value."""

    def __init__(self, name, attach, weight, mix, value):
        super().__init__()
        self.name, self.attach, self.weight, self.mix = name, attach, weight, mix
        self.value = torch.tensor(value)

    def forward(self, outputs, labels):
        return self.value


def test_consistency_terms_join_the_loss_of_their_task():
    tasks = {"a": Stub(), "b": Stub()}
    weighting = WEIGHTINGS.get("fixed")(tasks, {"a": 1.0, "b": 1.0})
    terms = [
        ConstantTerm("x_to_a", "a", 0.1, "convex", 5.0),
        ConstantTerm("y_to_a", "a", 0.2, "add", 7.0),
        ConstantTerm("z_to_b", "b", 0.25, "convex", 3.0),
    ]
    objective = GroupObjective(tasks, weighting, terms)
    outputs = {"a": torch.full((1, 1, 2, 2), 2.0), "b": torch.full((1, 1, 2, 2), 4.0)}
    losses, parts = objective.losses(outputs, {"a": None, "b": None})
    # a: (1 - 0.1) * 2 + 0.1 * 5 + 0.2 * 7 = 3.7; b: (1 - 0.25) * 4 + 0.25 * 3 = 3.75
    assert losses.tolist() == pytest.approx([3.7, 3.75])
    assert parts.tolist() == [5.0, 7.0, 3.0]
    assert objective.log_names == [
        "a",
        "b",
        "consistency/x_to_a",
        "consistency/y_to_a",
        "consistency/z_to_b",
        "weights/a",
        "weights/b",
    ]
    with pytest.raises(ValueError, match="attached to no task"):
        GroupObjective(tasks, weighting, [ConstantTerm("q", "c", 1.0, "add", 1.0)])


@pytest.mark.parametrize(("size", "wider", "batch_norm"), [((16, 24), False, False), ((13, 10), True, True)])
def test_transfer_net_maps_channels_at_the_input_size(size, wider, batch_norm):
    net = TaskTransferNet(5, 1, batch_norm=batch_norm, wider=wider)
    out = net(torch.randn(2, 5, *size))
    assert out.shape == (2, 1, *size)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == batch_norm
    narrow = sum(p.numel() for p in TaskTransferNet(5, 1).parameters())
    if wider:  # every width doubled: roughly four times the 3x3 weights
        assert sum(p.numel() for p in net.parameters()) > 3.5 * narrow
    assert net.encoder[0][0].in_channels == 5 and net.out.out_channels == 1


class Trunk(nn.Module):
    """A shared trunk and a head per task: the trunk is what both tasks reach."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Conv2d(4, 1, 1), "b": nn.Conv2d(4, 2, 1)})
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)

    def forward(self, images, raw=True):
        x = self.frozen(self.trunk(images))
        return {t: head(x) for t, head in self.heads.items()}


def test_shared_parameters_are_those_several_tasks_reach():
    model = Trunk().train()
    before = model.trunk[1].running_mean.clone()
    reach = task_reach(model, ["a", "b"], torch.device("cpu"), size=(8, 8))
    assert reach["a"] == {
        "trunk.0.weight",
        "trunk.0.bias",
        "trunk.1.weight",
        "trunk.1.bias",
        "heads.a.weight",
        "heads.a.bias",
    }
    assert shared_parameters(model, reach) == ["trunk.0.weight", "trunk.0.bias", "trunk.1.weight", "trunk.1.bias"]
    assert shared_layers(model, reach) == ["trunk.0", "trunk.1"]
    assert model.training and torch.equal(model.trunk[1].running_mean, before)  # no statistics changed


def test_objective_config_keys_are_checked_when_loaded():
    base = ["tasks=[semseg, depth]"]
    cases = {
        "loss.consistency=[{source: semseg, target: depth, loss: l1, weight: 1.5, mix: convex}]": (
            "key 'loss.consistency[0].weight': expected a number in [0, 1) with mix: convex"
        ),
        "loss.consistency=[{source: semseg, target: depth, loss: l1, supervise: labels}]": (
            "key 'loss.consistency[0].supervise'"
        ),
        "loss.consistency={source: semseg}": "key 'loss.consistency'",
        "loss.weighting={type: uncertainty, lr: -1}": "key 'loss.weighting.lr': expected a number > 0 or null",
        "loss.weighting={type: dwa, weight_decay: x}": "key 'loss.weighting.weight_decay'",
        "loss.weighting=fixed": "key 'loss.weighting': expected a mapping",
    }
    for override, message in cases.items():
        with pytest.raises(Exception, match=re.escape(message)):
            load_config(None, [*base, override])
    both = [
        "loss.consistency=[{source: semseg, target: depth, loss: l1, weight: 0.6, mix: convex},"
        " {source: normals, target: depth, loss: l1, weight: 0.5, mix: convex}]"
    ]
    with pytest.raises(Exception, match="convex weights of the terms into 'depth' sum to 1.1"):
        load_config(None, ["tasks=[semseg, depth, normals]", *both])


def test_recomputed_losses_leave_the_batchnorm_statistics_as_they_were():
    model = Trunk().train()
    tasks = {"a": Stub(), "b": Stub()}
    famo = WEIGHTINGS.get("famo")(tasks, {"a": 1.0, "b": 1.0})
    built = BuiltObjective(GroupObjective(tasks, famo), [], [])
    images = torch.randn(2, 3, 8, 8)
    context = built.context(1, lambda: model(images), {"a": None, "b": None}, images, [model])
    before = [b.clone() for b in model.trunk[1].buffers()]
    losses = context.recompute()
    assert losses.shape == (2,) and not losses.requires_grad
    assert all(torch.equal(b, a) for b, a in zip(model.trunk[1].buffers(), before, strict=True))
    model(images)  # a plain training-mode pass does move them
    assert not torch.equal(model.trunk[1].running_mean, before[0])

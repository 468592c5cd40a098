"""The gradient-balancing loss weightings (GradNorm, DWA, PCGrad, FAMO) on toy problems whose gradients are
known in closed form, against values worked out by hand from the papers' formulas; their options checked;
their saved state resuming a run exactly."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# the modules register their weightings when imported
from rcm_nddr.objectives import dwa, famo, gradnorm, pcgrad  # noqa: F401
from rcm_nddr.objectives.weighting import WEIGHTINGS, StepContext

METHODS = ("gradnorm", "dwa", "pcgrad", "famo")


def stand_in_tasks(*names: str) -> dict[str, SimpleNamespace]:
    """Task stand-ins: the weightings only read the names (and uncertainty's loss_kind)."""
    return {n: SimpleNamespace(loss_kind="regression") for n in names}


def build(method: str, weights: dict[str, float], **options):
    return WEIGHTINGS.get(method)(stand_in_tasks(*weights), weights, **options)


# ---------------------------------------------------------------------------------------------- GradNorm


def test_gradnorm_weight_gradient_and_renormalization_by_hand():
    """Shared layer s = (1, 2); L_a = 3 s0 + 4 s1 + k_a (||grad_s L_a|| = 5), L_b = 6 s0 + k_b (norm 6)."""
    w = build("gradnorm", {"a": 1.0, "b": 3.0}, alpha=2.0)
    # initial weights: the configured 1 : 3 rescaled to sum to T = 2
    assert w.current().tolist() == pytest.approx([0.5, 1.5])
    s = nn.Parameter(torch.tensor([1.0, 2.0]))
    context = StepContext(layer=[s], iteration=1)

    def losses(k_a: float, k_b: float) -> torch.Tensor:
        return torch.stack([3 * s[0] + 4 * s[1] + k_a, 6 * s[0] + k_b])

    # step 1: L(0) = (11, 6), so r = (1, 1); G = (0.5 * 5, 1.5 * 6) = (2.5, 9), target = mean(G) = 5.75
    # -> dL_grad/dw = (sign(2.5 - 5.75) * 5, sign(9 - 5.75) * 6) = (-5, 6)
    w.backward(losses(0.0, 0.0), context)
    assert w.task_weights.grad.tolist() == pytest.approx([-5.0, 6.0])
    # the network: 0.5 * (3, 4) + 1.5 * (6, 0)
    assert s.grad.tolist() == pytest.approx([10.5, 2.0])
    assert w.initial.tolist() == pytest.approx([11.0, 6.0])

    # an SGD step of lr 0.1 on the weights: (1.0, 0.9); renormalized to sum to 2: (20/19, 18/19)
    with torch.no_grad():
        w.task_weights.sub_(0.1 * w.task_weights.grad)
    w.after_step(torch.tensor([11.0, 6.0]), context)
    assert w.current().tolist() == pytest.approx([20 / 19, 18 / 19])

    # step 2: L = (5.5, 9), ratios to L(0) (0.5, 1.5), r = (0.5, 1.5), r^2 = (0.25, 2.25);
    # G = (100/19, 108/19), mean 104/19, target = (26/19, 234/19): G_a above it, G_b below -> (+5, -6)
    w.task_weights.grad = None
    s.grad = None
    w.backward(losses(-5.5, 3.0), context)
    assert w.task_weights.grad.tolist() == pytest.approx([5.0, -6.0])
    assert s.grad.tolist() == pytest.approx([168 / 19, 80 / 19])
    assert w.initial.tolist() == pytest.approx([11.0, 6.0])  # L(0) stays the first step's


def test_gradnorm_alpha_sets_the_target():
    """With alpha = 0 the target is the mean norm whatever the training rates: a task whose loss went down
    faster keeps the sign it would have at the first step."""
    s = nn.Parameter(torch.tensor([1.0, 2.0]))
    context = StepContext(layer=[s], iteration=1)
    for alpha, expected in ((0.0, [-5.0, 6.0]), (2.0, [5.0, -6.0])):
        w = build("gradnorm", {"a": 1.0, "b": 1.0}, alpha=alpha)
        # equal weights 1: G = (5, 6)
        w.backward(torch.stack([3 * s[0] + 4 * s[1], 6 * s[0]]), context)
        w.task_weights.grad = None
        # r = (0.1, 1.9): with alpha 2 the target of a is 5.5 * 0.01, that of b 5.5 * 3.61
        w.backward(torch.stack([3 * s[0] + 4 * s[1] - 9.9, 6 * s[0] + 5.4]), context)
        assert w.task_weights.grad.tolist() == pytest.approx(expected), alpha


def test_gradnorm_needs_a_layer():
    w = build("gradnorm", {"a": 1.0, "b": 1.0})
    with pytest.raises(RuntimeError, match="StepContext.layer"):
        w.backward(torch.ones(2, requires_grad=True), StepContext())


# ---------------------------------------------------------------------------------------------------- DWA


def test_dwa_weights_after_three_periods_by_hand():
    """Periods of 2 iterations; the weights of period k follow the average losses of periods k-1 and k-2."""
    w = build("dwa", {"a": 1.0, "b": 2.0}, period=2)
    steps = [
        (2.0, 4.0),
        (4.0, 2.0),  # period 0: mean (3, 3)
        (1.0, 3.5),
        (2.0, 2.5),  # period 1: mean (1.5, 3)
        (0.5, 2.0),
        (0.7, 2.8),  # period 2: mean (0.6, 2.4)
    ]
    context = StepContext(iteration=1)
    seen = []
    for losses in steps:
        seen.append(w.current().tolist())
        w.after_step(torch.tensor(losses), context)
    # periods 0 and 1: lambda = 1, times the configured weights
    assert seen[:4] == [[1.0, 2.0]] * 4

    def expected(r_a: float, r_b: float) -> list[float]:
        e_a, e_b = math.exp(r_a / 2.0), math.exp(r_b / 2.0)  # Temp = 2
        return [1.0 * 2 * e_a / (e_a + e_b), 2.0 * 2 * e_b / (e_a + e_b)]

    # period 2: r = (1.5 / 3, 3 / 3) = (0.5, 1): lambda = (0.8756, 1.1244) -> times (1, 2)
    assert seen[4] == pytest.approx(expected(0.5, 1.0))
    assert seen[5] == pytest.approx(expected(0.5, 1.0))
    assert expected(0.5, 1.0) == pytest.approx([0.8756469, 2 * 1.1243531], rel=1e-6)
    # period 3: r = (0.6 / 1.5, 2.4 / 3) = (0.4, 0.8)
    assert w.current().tolist() == pytest.approx(expected(0.4, 0.8))
    assert int(w.periods) == 3 and int(w.count) == 0

    # the network's loss is the weighted sum with these multipliers
    losses = torch.tensor([1.0, 1.0], requires_grad=True)
    w.backward(losses * torch.tensor([3.0, 5.0]), context)
    multipliers = expected(0.4, 0.8)
    assert losses.grad.tolist() == pytest.approx([3 * multipliers[0], 5 * multipliers[1]])


def test_dwa_temperature():
    """A larger temperature pulls the weights towards 1."""
    tight, loose = (build("dwa", {"a": 1.0, "b": 1.0}, period=1, temperature=t) for t in (0.5, 20.0))
    for w in (tight, loose):
        for losses in ((1.0, 1.0), (0.5, 1.0)):
            w.after_step(torch.tensor(losses), StepContext())
    e = [math.exp(0.5 / 0.5), math.exp(1.0 / 0.5)]
    assert tight.current().tolist() == pytest.approx([2 * v / sum(e) for v in e])
    e = [math.exp(0.5 / 20.0), math.exp(1.0 / 20.0)]
    assert loose.current().tolist() == pytest.approx([2 * v / sum(e) for v in e])
    assert abs(loose.current()[0] - 1) < abs(tight.current()[0] - 1)


# ------------------------------------------------------------------------------------------------- PCGrad


def pcgrad_problem(g_a: tuple[float, float], g_b: tuple[float, float]):
    """Shared s (2 entries) and a head per task: L_a = g_a . s + 3 h_a, L_b = g_b . s + h_b^2 (h_b = 1.5)."""
    s = nn.Parameter(torch.tensor([0.3, -0.7]))
    h_a = nn.Parameter(torch.tensor(0.2))
    h_b = nn.Parameter(torch.tensor(1.5))
    losses = torch.stack([torch.tensor(g_a) @ s + 3 * h_a, torch.tensor(g_b) @ s + h_b**2])
    return s, h_a, h_b, losses


def test_pcgrad_projects_conflicting_gradients_by_hand():
    w = build("pcgrad", {"a": 1.0, "b": 1.0})
    s, h_a, h_b, losses = pcgrad_problem((2.0, 0.0), (-1.0, 1.0))
    w.backward(losses, StepContext(shared=[s], iteration=1))
    # g_a . g_b = -2: g_a' = (2, 0) - (-2 / 2) (-1, 1) = (1, 1); g_b' = (-1, 1) - (-2 / 4) (2, 0) = (0, 1)
    assert s.grad.tolist() == pytest.approx([1.0, 2.0])
    # the heads get their plain gradients
    assert h_a.grad.item() == pytest.approx(3.0)
    assert h_b.grad.item() == pytest.approx(3.0)
    assert w.current().tolist() == [1.0, 1.0]


def test_pcgrad_uses_the_weighted_task_gradients():
    w = build("pcgrad", {"a": 2.0, "b": 1.0})
    s, h_a, h_b, losses = pcgrad_problem((2.0, 0.0), (-1.0, 1.0))
    w.backward(losses, StepContext(shared=[s], iteration=1))
    # g_a = 2 (2, 0) = (4, 0), g_a . g_b = -4: g_a' = (4, 0) + 2 (-1, 1) = (2, 2); g_b' = (-1, 1) + (4, 0) / 4
    assert s.grad.tolist() == pytest.approx([2.0, 3.0])
    assert h_a.grad.item() == pytest.approx(6.0)
    assert h_b.grad.item() == pytest.approx(3.0)


def test_pcgrad_leaves_agreeing_gradients_alone():
    w = build("pcgrad", {"a": 1.0, "b": 1.0})
    s, _, _, losses = pcgrad_problem((1.0, 0.0), (1.0, 1.0))  # g_a . g_b = 1 > 0
    w.backward(losses, StepContext(shared=[s], iteration=1))
    assert s.grad.tolist() == pytest.approx([2.0, 1.0])


def test_pcgrad_keeps_gradients_accumulated_before():
    w = build("pcgrad", {"a": 1.0, "b": 1.0})
    s, h_a, _, losses = pcgrad_problem((2.0, 0.0), (-1.0, 1.0))
    s.grad = torch.tensor([10.0, 20.0])
    h_a.grad = torch.tensor(1.0)
    w.backward(losses, StepContext(shared=[s], iteration=1))
    assert s.grad.tolist() == pytest.approx([11.0, 22.0])
    assert h_a.grad.item() == pytest.approx(4.0)


def test_pcgrad_projection_order_matters_with_three_tasks():
    """g_1 = (1, 0) against g_2 = (-1, 2) then g_3 = (-1, -1), and in the other order."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [-1.0, -1.0]])
    # g_1 . g_2 = -1: (1, 0) + (1/5)(-1, 2) = (0.8, 0.4); . g_3 = -1.2: + 0.6 (-1, -1) = (0.2, -0.2)
    first = pcgrad.PCGradWeighting.project(grads, [[1, 2], [], []])
    assert first.tolist() == pytest.approx([0.2 - 1 - 1, -0.2 + 2 - 1])
    # g_1 . g_3 = -1: (1, 0) + 0.5 (-1, -1) = (0.5, -0.5); . g_2 = -1.5: + 0.3 (-1, 2) = (0.2, 0.1)
    second = pcgrad.PCGradWeighting.project(grads, [[2, 1], [], []])
    assert second.tolist() == pytest.approx([0.2 - 1 - 1, 0.1 + 2 - 1])


def test_pcgrad_orders_follow_seed_and_iteration():
    w = build("pcgrad", {"a": 1.0, "b": 1.0, "c": 1.0}, seed=7)
    again = build("pcgrad", {"a": 1.0, "b": 1.0, "c": 1.0}, seed=7)
    other = build("pcgrad", {"a": 1.0, "b": 1.0, "c": 1.0}, seed=8)
    for iteration in range(1, 20):
        orders = w.orders(iteration)
        assert orders == again.orders(iteration)
        assert [sorted(o) for o in orders] == [[1, 2], [0, 2], [0, 1]]
    draws = {str(w.orders(i)) for i in range(1, 20)}
    assert len(draws) > 1
    assert [w.orders(i) for i in range(1, 20)] != [other.orders(i) for i in range(1, 20)]


# --------------------------------------------------------------------------------------------------- FAMO


def test_famo_network_gradient_by_hand():
    """z = softmax(log 3, 0) = (3/4, 1/4); L = (2, 0.5) at s = (1, 1) with L_a = s0^2 + s1^2, L_b = s1 / 2:
    c = 0.75 / 2 + 0.25 / 0.5 = 7/8, multipliers z / (c L) = (3/7, 4/7), summing to 1."""
    w = build("famo", {"a": 1.0, "b": 1.0})
    assert w.current().tolist() == pytest.approx([0.5, 0.5])
    with torch.no_grad():
        w.logits.copy_(torch.tensor([math.log(3.0), 0.0]))
    s = nn.Parameter(torch.tensor([1.0, 1.0]))
    w.backward(torch.stack([s[0] ** 2 + s[1] ** 2, s[1] / 2]), StepContext(iteration=1))
    # 3/7 (2, 2) + 4/7 (0, 0.5)
    assert s.grad.tolist() == pytest.approx([6 / 7, 8 / 7])
    assert w.current().tolist() == pytest.approx([3 / 7, 4 / 7])
    assert w.logits.grad is None and not w.logits.requires_grad


def test_famo_min_losses_shift_the_losses():
    w = build("famo", {"a": 1.0, "b": 1.0}, min_losses={"a": 1.0})
    losses = torch.tensor([2.0, 0.5], requires_grad=True)
    w.backward(losses, StepContext(iteration=1))
    # D = (1, 0.5), z = (1/2, 1/2): c = 0.5 + 1 = 1.5, multipliers (1/3, 2/3); d(z log D / c)/dL = z / (c D)
    assert losses.grad.tolist() == pytest.approx([1 / 3, 2 / 3])
    assert w.current().tolist() == pytest.approx([1 / 3, 2 / 3])


def test_famo_logit_update_by_hand():
    """L = (2, 0.5) before the step, (1, 0.5) after: delta = (log 2, 0); with z = (3/4, 1/4) the logits'
    gradient is z * (delta - z . delta) = (3/16 log 2, -3/16 log 2), and Adam's first step moves each logit
    by lr against its gradient's sign."""
    w = build("famo", {"a": 1.0, "b": 1.0}, gamma=0.0, logit_lr=0.025)
    xi = torch.tensor([math.log(3.0), 0.0])
    with torch.no_grad():
        w.logits.copy_(xi)
    before, after = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.5])
    w.after_step(before, StepContext(recompute=lambda: after, iteration=1))
    assert w.logits.tolist() == pytest.approx([math.log(3.0) - 0.025, 0.025], abs=1e-6)
    assert int(w.adam_step) == 1

    # the closed form of the softmax's transposed Jacobian, against autograd
    leaf = xi.clone().requires_grad_(True)
    delta = torch.tensor([math.log(2.0), 0.0])
    (grad,) = torch.autograd.grad(torch.softmax(leaf, 0), leaf, grad_outputs=delta)
    assert grad.tolist() == pytest.approx([3 / 16 * math.log(2.0), -3 / 16 * math.log(2.0)])


def test_famo_logits_follow_torch_adam_with_weight_decay():
    """Several updates against torch.optim.Adam(weight_decay=gamma) fed the same softmax gradients."""
    w = build("famo", {"a": 1.0, "b": 1.0, "c": 1.0}, gamma=0.01, logit_lr=0.1)
    reference = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([reference], lr=0.1, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for iteration in range(1, 6):
        before = torch.rand(3, generator=generator) + 0.5
        after = before * (torch.rand(3, generator=generator) + 0.5)
        w.after_step(before, StepContext(recompute=lambda a=after: a, iteration=iteration))
        delta = before.log() - after.log()
        (reference.grad,) = torch.autograd.grad(torch.softmax(reference, 0), reference, grad_outputs=delta)
        optimizer.step()
        assert w.logits.tolist() == pytest.approx(reference.tolist(), abs=1e-7)


def test_famo_needs_the_recomputed_losses():
    w = build("famo", {"a": 1.0, "b": 1.0})
    with pytest.raises(RuntimeError, match="recompute"):
        w.after_step(torch.ones(2), StepContext())


# ------------------------------------------------------------------------------------- contract and options


def test_class_attributes_and_registration():
    classes = {m: WEIGHTINGS.get(m) for m in METHODS}
    assert classes["gradnorm"] is gradnorm.GradNormWeighting
    assert classes["gradnorm"].needs_layer and classes["gradnorm"].default_lr == 0.025
    assert classes["pcgrad"].needs_shared
    assert classes["famo"].needs_recompute
    assert classes["gradnorm"].not_distributed and classes["pcgrad"].not_distributed
    assert classes["dwa"].not_distributed is None and classes["famo"].not_distributed is None
    assert all(cls.not_compiled is None for cls in classes.values())
    for cls in classes.values():  # every option has a default and a docstring explains the method
        options = list(inspect.signature(cls).parameters.values())[2:]
        assert all(p.default is not inspect.Parameter.empty for p in options), cls
        assert len(inspect.getdoc(cls)) > 300
    assert "layer" in inspect.signature(gradnorm.GradNormWeighting).parameters
    # only GradNorm's weights train in the run's optimizer; FAMO steps its logits itself
    weights = {"a": 1.0, "b": 1.0}
    assert [n for n, _ in build("gradnorm", weights).named_parameters()] == ["task_weights"]
    assert not list(build("famo", weights).parameters())
    assert set(build("famo", weights).state_dict()) == {"logits", "exp_avg", "exp_avg_sq", "adam_step", "multipliers"}
    assert set(build("dwa", weights, period=3).state_dict()) == {"sums", "count", "means", "periods"}
    assert build("gradnorm", weights, layer="encoder.layer4").layer == "encoder.layer4"


@pytest.mark.parametrize(
    ("method", "options", "named"),
    [
        ("gradnorm", {"alpha": -1.0}, "alpha"),
        ("gradnorm", {"alpha": "fast"}, "alpha"),
        ("gradnorm", {"alpha": float("nan")}, "alpha"),
        ("gradnorm", {"layer": 3}, "layer"),
        ("dwa", {"period": 0}, "period"),
        ("dwa", {"period": 2.5}, "period"),
        ("dwa", {"period": True}, "period"),
        ("dwa", {"period": None}, "period"),
        ("dwa", {"period": 5, "temperature": 0.0}, "temperature"),
        ("dwa", {"period": 5, "temperature": "hot"}, "temperature"),
        ("pcgrad", {"seed": -1}, "seed"),
        ("pcgrad", {"seed": 1.5}, "seed"),
        ("famo", {"logit_lr": 0.0}, "logit_lr"),
        ("famo", {"gamma": -0.1}, "gamma"),
        ("famo", {"eps": "1e-8"}, "eps"),
        ("famo", {"eps": 0}, "eps"),
        ("famo", {"min_losses": {"z": 0.1}}, "min_losses"),
        ("famo", {"min_losses": "low"}, "min_losses"),
        ("famo", {"min_losses": {"a": None}}, "min_losses"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(method, options, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        build(method, {"a": 1.0, "b": 1.0}, **options)


def test_gradnorm_refuses_weights_it_cannot_start_from():
    with pytest.raises(ValueError, match="configured loss weights"):
        build("gradnorm", {"a": -1.0, "b": 1.0})


# ------------------------------------------------------------------------------------------------- resume


class Toy(nn.Module):
    """A shared layer and three scalar heads; task c's loss is an L1 loss so the tasks' scales differ."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.shared = nn.Linear(3, 4)
            self.heads = nn.ModuleDict({n: nn.Linear(4, 1) for n in "abc"})

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        out = {n: head(h).squeeze(1) for n, head in self.heads.items()}
        return torch.stack(
            [
                (out["a"] - y[:, 0]).pow(2).mean(),
                0.2 * (out["b"] - y[:, 1]).pow(2).mean(),
                (out["c"] - y[:, 2]).abs().mean(),
            ]
        )


def batch(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(iteration)
    return torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)


def optimizer_for(net: nn.Module, weighting: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": list(net.parameters())}]
    own = list(weighting.parameters())
    if own:
        groups.append({"params": own, "lr": weighting.default_lr or 0.05})
    return torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def train_step(net: Toy, optimizer: torch.optim.Optimizer, weighting, iteration: int) -> None:
    """One step the way the trainer runs it."""
    x, y = batch(iteration)

    def recompute() -> torch.Tensor:
        with torch.no_grad():
            return net.losses(x, y)

    shared = list(net.shared.parameters())
    context = StepContext(shared=shared, layer=shared, recompute=recompute, iteration=iteration)
    optimizer.zero_grad(set_to_none=True)
    losses = net.losses(x, y)
    weighting.backward(losses, context)
    optimizer.step()
    weighting.after_step(losses.detach(), context)


RESUME_OPTIONS = {"gradnorm": {"alpha": 1.5}, "dwa": {"period": 2}, "pcgrad": {"seed": 3}, "famo": {"gamma": 0.01}}


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_resumes_exactly(method):
    """Seven steps in one go == three steps, everything saved, fresh objects loaded, four more steps."""
    weights = {"a": 1.0, "b": 2.0, "c": 1.0}
    steps, cut = 7, 3

    net = Toy()
    weighting = build(method, weights, **RESUME_OPTIONS[method])
    optimizer = optimizer_for(net, weighting)
    initial = weighting.current()
    for iteration in range(1, steps + 1):
        train_step(net, optimizer, weighting, iteration)
    if method != "pcgrad":  # the weights moved (PCGrad keeps the configured ones)
        assert not torch.allclose(weighting.current(), initial)

    first = Toy()
    first_weighting = build(method, weights, **RESUME_OPTIONS[method])
    first_optimizer = optimizer_for(first, first_weighting)
    for iteration in range(1, cut + 1):
        train_step(first, first_optimizer, first_weighting, iteration)
    saved = {
        "net": first.state_dict(),
        "weighting": first_weighting.state_dict(),
        "optimizer": first_optimizer.state_dict(),
    }
    resumed = Toy()
    resumed_weighting = build(method, weights, **RESUME_OPTIONS[method])
    resumed_optimizer = optimizer_for(resumed, resumed_weighting)
    resumed.load_state_dict(saved["net"])
    resumed_weighting.load_state_dict(saved["weighting"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for iteration in range(cut + 1, steps + 1):
        train_step(resumed, resumed_optimizer, resumed_weighting, iteration)

    for name, value in net.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    for name, value in weighting.state_dict().items():
        assert torch.equal(value, resumed_weighting.state_dict()[name]), name
    assert torch.equal(weighting.current(), resumed_weighting.current())


def test_pcgrad_keeps_no_state():
    """PCGrad keeps no state: its orders come from (seed, iteration), so a fresh instance continues alike."""
    w = build("pcgrad", {"a": 1.0, "b": 1.0, "c": 1.0}, seed=3)
    assert w.state_dict() == {}
    assert build("pcgrad", {"a": 1.0, "b": 1.0, "c": 1.0}, seed=3).orders(4) == w.orders(4)


# ------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("method", ["gradnorm", "pcgrad"])
def test_per_task_gradients_through_a_compiled_module(method):
    """The per-task ``torch.autograd.grad`` calls work through a torch.compile'd network (traced with
    TorchDynamo and AOTAutograd, run with the aot_eager backend): the gradients are the eager ones."""
    weights = {"a": 1.0, "b": 2.0, "c": 1.0}
    grads = []
    for compiled in (False, True):
        net = Toy()
        weighting = build(method, weights)
        losses_of = torch.compile(net.losses, backend="aot_eager") if compiled else net.losses
        x, y = batch(1)
        shared = list(net.shared.parameters())
        weighting.backward(losses_of(x, y), StepContext(shared=shared, layer=shared, iteration=1))
        grads.append([p.grad.clone() for p in [*net.parameters(), *weighting.parameters()]])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager)

"""The built-in task plug-ins: registration, options, masked losses, post-processing, visualization
and trivial predictors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rcm_nddr.tasks.binary import IGNORE_RGB
from rcm_nddr.tasks.depth import DEPTH_LUT
from rcm_nddr.tasks.edge import EdgeTask

from rcm_nddr import tasks  # noqa: F401 - registers the built-in task types
from rcm_nddr.registry import TASKS, RegistryError
from rcm_nddr.task import DatasetInfo, Task

BUILTIN = ["depth", "edge", "normals", "parts", "sal", "semseg"]
INFO = DatasetInfo("toy", classes={"semseg": ["wall", "floor", "chair"], "parts": ["background", "leg"]})


def make_task(name: str, **options) -> Task:
    return TASKS.get(name)(name, INFO, **options)


def make_case(name: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random raw output, a target of the task's format and its B x H x W invalid-pixel mask."""
    task = make_task(name)
    shape = (2, 5, 6)
    invalid = torch.rand(shape, generator=generator) < 0.3
    output = torch.randn(shape[0], task.out_channels, *shape[1:], generator=generator)
    if name in ("semseg", "parts"):
        target = torch.randint(0, task.out_channels, shape, generator=generator)
        target[invalid] = 255
    elif name == "depth":
        target = (torch.rand(shape, generator=generator) * 5 + 0.5).masked_fill(invalid, 0)[:, None]
    elif name == "normals":
        target = F.normalize(torch.randn(shape[0], 3, *shape[1:], generator=generator), dim=1)
        target = target * ~invalid[:, None]
    else:
        target = (torch.rand(shape, generator=generator) < 0.4).float().masked_fill(invalid, 255)[:, None]
    return output, target, invalid


# ---------------------------------------------------------------- registration and construction


def test_registry_holds_the_six_builtin_types():
    assert set(BUILTIN) <= set(TASKS.names())
    for name in BUILTIN:
        task = make_task(name)
        assert task.target_key == name
        assert task.name == name
    weights = {name: TASKS.get(name).default_loss_weight for name in BUILTIN}
    assert weights == {"semseg": 1, "parts": 2, "depth": 1, "normals": 10, "edge": 50, "sal": 5}


def test_duplicate_registration_is_refused():
    with pytest.raises(RegistryError, match="already registered"):
        TASKS.register("semseg")(type("AnotherSemseg", (), {}))
    assert TASKS.get("semseg").__name__ == "SemsegTask"


def test_out_channels():
    channels = {name: make_task(name).out_channels for name in BUILTIN}
    assert channels == {"semseg": 3, "parts": 2, "depth": 1, "normals": 3, "edge": 1, "sal": 1}


def test_missing_class_names_name_the_dataset_and_key():
    with pytest.raises(ValueError, match="dataset 'toy'") as error:
        TASKS.get("parts")("parts", DatasetInfo("toy", classes={"semseg": ["a"]}))
    assert "'parts'" in str(error.value) and "semseg" in str(error.value)


@pytest.mark.parametrize("name", BUILTIN)
def test_unknown_option_is_a_type_error(name):
    with pytest.raises(TypeError):
        make_task(name, no_such_option=1)


def test_edge_options():
    task = make_task("edge", pos_weight=0.8, max_dist=0.02, matching="distance")
    assert (task.pos_weight, task.max_dist, task.metric().max_dist) == (0.8, 0.02, 0.02)
    assert task.metric().matching == "distance"
    default = make_task("edge")
    assert (default.max_dist, default.matching, default.metric().matching) == (0.011, "bipartite", "bipartite")
    with pytest.raises(ValueError, match="pos_weight"):
        make_task("edge", pos_weight=1.5)
    with pytest.raises(ValueError, match="max_dist"):
        make_task("edge", max_dist=-0.1)
    with pytest.raises(ValueError, match="task 'edge'.*matching.*'bipartite', 'distance'.*'nearest'"):
        make_task("edge", matching="nearest")


def test_edge_max_dist_comes_from_the_dataset_unless_given():
    pascal = DatasetInfo("pascal", extra={"edge_max_dist": 0.0075})
    assert TASKS.get("edge")("edge", pascal).metric().max_dist == 0.0075
    assert TASKS.get("edge")("edge", pascal, max_dist=0.02).metric().max_dist == 0.02
    assert TASKS.get("edge")("edge", pascal, max_dist=0).max_dist == 0.0  # 0 is given, not missing
    with pytest.raises(ValueError, match="task 'e'.*max_dist"):
        TASKS.get("edge")("e", DatasetInfo("bad", extra={"edge_max_dist": "far"}))


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("name", BUILTIN)
def test_loss_ignores_invalid_pixels_and_gradients_flow(name):
    generator = torch.Generator().manual_seed(0)
    task = make_task(name)
    output, target, invalid = make_case(name, generator)
    output.requires_grad_(True)
    loss = task.loss(output, target)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0

    changed = output.detach().clone()
    noise = torch.randn(changed.shape, generator=generator) * 100
    changed[invalid[:, None].expand_as(changed)] = noise[invalid[:, None].expand_as(changed)]
    assert task.loss(changed, target).item() == pytest.approx(loss.item(), rel=1e-6)

    loss.backward()
    grad_per_pixel = output.grad.abs().sum(1)
    assert torch.all(grad_per_pixel[invalid] == 0)
    assert torch.all(grad_per_pixel[~invalid] > 0)


@pytest.mark.parametrize("name", BUILTIN)
def test_all_invalid_target_gives_zero_loss_with_a_graph(name):
    generator = torch.Generator().manual_seed(1)
    task = make_task(name)
    output, target, _ = make_case(name, generator)
    output.requires_grad_(True)
    invalid_value = 0 if name in ("depth", "normals") else 255
    loss = task.loss(output, torch.full_like(target, invalid_value))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(output.grad, torch.zeros_like(output))


def test_loss_values_by_hand():
    zeros = torch.zeros(1, 3, 1, 2)
    # uniform logits over 3 classes: CE = log 3 on the one valid pixel
    assert make_task("semseg").loss(zeros, torch.tensor([[[1, 255]]])) == pytest.approx(math.log(3))
    depth = make_task("depth").loss(torch.tensor([[[[1.0, 4.0, 9.0]]]]), torch.tensor([[[[2.0, 2.0, 0.0]]]]))
    assert depth == pytest.approx((1 + 2) / 2)
    # (0, 0, 2) normalizes onto the target; (1, 0, 0) is off by |1| + |-1| over 3 components
    output = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]]).reshape(1, 3, 1, 2)
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).reshape(1, 3, 1, 2)
    assert make_task("normals").loss(output, target) == pytest.approx(2 / 6)
    logits = torch.zeros(1, 1, 1, 3)
    assert make_task("sal").loss(logits, torch.tensor([[[[1.0, 0.0, 255.0]]]])) == pytest.approx(math.log(2))


def test_normals_loss_gradient_is_finite_at_zero_outputs():
    output = torch.zeros(1, 3, 2, 2, requires_grad=True)
    target = F.normalize(torch.ones(1, 3, 2, 2), dim=1)
    make_task("normals").loss(output, target).backward()
    assert torch.isfinite(output.grad).all()


def test_edge_pos_weight_balances_positives_and_negatives():
    logits = torch.zeros(1, 1, 1, 2)
    positives, negatives = torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    default = make_task("edge")
    assert default.loss(logits, positives) == pytest.approx(0.95 * math.log(2))
    assert default.loss(logits, negatives) == pytest.approx(0.05 * math.log(2))
    mixed = torch.tensor([[[[1.0, 0.0]]]])
    assert default.loss(logits, mixed) == pytest.approx((0.95 + 0.05) * math.log(2) / 2)
    assert make_task("edge", pos_weight=0.5).loss(logits, positives) == pytest.approx(0.5 * math.log(2))


def test_loss_rejects_bad_targets():
    with pytest.raises(ValueError, match="label 3"):
        make_task("semseg").loss(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="not 0, 1 or 255"):
        make_task("edge").loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="spatial size"):
        make_task("depth").loss(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2, 2))


# ---------------------------------------------------------------- post-processing


def test_postprocess_formats():
    generator = torch.Generator().manual_seed(2)
    raw = {name: torch.randn(2, make_task(name).out_channels, 4, 5, generator=generator) for name in BUILTIN}
    semseg = make_task("semseg").postprocess(raw["semseg"])
    assert semseg.dtype == torch.int64 and semseg.shape == (2, 4, 5)
    assert torch.equal(semseg, raw["semseg"].argmax(1))
    depth = make_task("depth").postprocess(raw["depth"])
    assert depth.shape == (2, 1, 4, 5) and depth.min() >= 0
    assert torch.equal(depth, raw["depth"].clamp_min(0))
    normals = make_task("normals").postprocess(raw["normals"])
    assert normals.shape == (2, 3, 4, 5)
    assert torch.allclose(normals.norm(dim=1), torch.ones(2, 4, 5))
    for name in ("edge", "sal"):
        probability = make_task(name).postprocess(raw[name])
        assert probability.shape == (2, 1, 4, 5)
        assert torch.allclose(probability, torch.sigmoid(raw[name]))


@pytest.mark.parametrize("name", BUILTIN)
def test_postprocessed_output_feeds_the_metric(name):
    generator = torch.Generator().manual_seed(3)
    task = make_task(name)
    output, target, _ = make_case(name, generator)
    metric = task.metric()
    metric.update(task.postprocess(output), target)
    result = metric.compute()
    assert type(metric).primary in result
    assert all(isinstance(value, float) for value in result.values())


# ---------------------------------------------------------------- visualization


def check_image(image: torch.Tensor, height: int, width: int) -> None:
    assert image.dtype == torch.uint8 and image.shape == (3, height, width)


def test_visualize_class_maps():
    task = make_task("semseg")
    image = task.visualize(torch.tensor([[0, 1, 2, 255]]))
    check_image(image, 1, 4)
    assert image[:, 0, 3].tolist() == [0, 0, 0]  # ignore is black
    colours = {tuple(image[:, 0, i].tolist()) for i in range(3)}
    assert len(colours) == 3 and (0, 0, 0) not in colours
    assert torch.equal(task.visualize(torch.tensor([[0, 1, 2, 255]])), image)  # deterministic
    with pytest.raises(ValueError, match="H x W"):
        task.visualize(torch.zeros(1, 2, 2, dtype=torch.long))


def test_visualize_depth():
    image = make_task("depth").visualize(torch.tensor([[[2.0, 4.0, 3.0, 0.0]]]))
    check_image(image, 1, 4)
    assert torch.equal(image[:, 0, 0], DEPTH_LUT[0])  # nearest valid depth
    assert torch.equal(image[:, 0, 1], DEPTH_LUT[255])  # farthest
    assert image[:, 0, 3].tolist() == [0, 0, 0]  # invalid
    assert not torch.equal(DEPTH_LUT[0], DEPTH_LUT[128])


def test_visualize_normals():
    value = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]).reshape(3, 1, 2)
    image = make_task("normals").visualize(value)
    check_image(image, 1, 2)
    assert image[:, 0, 0].tolist() == [128, 128, 255]
    assert image[:, 0, 1].tolist() == [0, 0, 0]  # invalid (zero) normal


@pytest.mark.parametrize("name", ["edge", "sal"])
def test_visualize_binary_maps(name):
    image = make_task(name).visualize(torch.tensor([[[0.0, 1.0, 0.5, 255.0]]]))
    check_image(image, 1, 4)
    assert image[:, 0, 0].tolist() == [0, 0, 0]
    assert image[:, 0, 1].tolist() == [255, 255, 255]
    assert image[:, 0, 2].tolist() == [128, 128, 128]
    assert tuple(image[:, 0, 3].tolist()) == IGNORE_RGB


# ---------------------------------------------------------------- trivial predictors


def test_trivial_majority_class():
    predictor = make_task("semseg").trivial()
    with pytest.raises(RuntimeError, match="no valid pixel"):
        predictor.predict(torch.zeros(1, 2, 2, dtype=torch.long))
    # valid counts: class 1 three times, class 2 twice; the many 255s do not count
    predictor.fit(torch.tensor([[[1, 1, 2, 255]], [[2, 1, 255, 255]]]))
    prediction = predictor.predict(torch.zeros(3, 2, 4, dtype=torch.long))
    assert prediction.dtype == torch.int64
    assert torch.equal(prediction, torch.ones(3, 2, 4, dtype=torch.long))


def test_trivial_mean_depth_and_normal():
    depth = make_task("depth").trivial()
    depth.fit(torch.tensor([[[[1.0, 0.0]]]]))
    depth.fit(torch.tensor([[[[2.0, 6.0]]]]))
    assert torch.equal(depth.predict(torch.zeros(2, 1, 3, 3)), torch.full((2, 1, 3, 3), 3.0))

    normals = make_task("normals").trivial()
    normals.fit(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2))
    normals.fit(torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1))
    prediction = normals.predict(torch.zeros(2, 3, 2, 2))
    assert prediction.shape == (2, 3, 2, 2)
    expected = torch.tensor([1.0, 0.0, 1.0]) / math.sqrt(2)
    assert torch.allclose(prediction[1, :, 1, 0], expected)


@pytest.mark.parametrize("name", ["edge", "sal"])
def test_trivial_binary_maps_are_zero(name):
    predictor = make_task(name).trivial()
    predictor.fit(torch.ones(1, 1, 2, 2))
    prediction = predictor.predict(torch.ones(2, 1, 3, 4))
    assert torch.equal(prediction, torch.zeros(2, 1, 3, 4))


def test_edge_task_is_the_registered_class():
    assert TASKS.get("edge") is EdgeTask

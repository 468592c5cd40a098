"""The evaluation switches of the saliency, class-map and depth tasks: their presets per protocol, the
checks of ``configure_evaluation``, and hand-computed cases where this project's conventions and those of the
survey's, ASTMT's and RCM's evaluation code give different numbers."""

from __future__ import annotations

import math

import pytest
import torch
from rcm_nddr.tasks.depth import DepthMetric, DepthTask
from rcm_nddr.tasks.human_parts import HumanPartsTask
from rcm_nddr.tasks.parts import PartsTask
from rcm_nddr.tasks.sal import SalTask
from rcm_nddr.tasks.semseg import SemsegTask

from rcm_nddr import tasks  # noqa: F401 - registers the built-in task types
from rcm_nddr.registry import TASKS
from rcm_nddr.task import PROTOCOLS, DatasetInfo, Task

INFO = DatasetInfo(
    "x",
    classes={
        "semseg": ["a", "b", "c"],
        "parts": ["background", "leg"],
        "human_parts": ["background", "head", "torso"],
    },
)

HI, LO = 0.95, 0.05  # saliency scores above / below every threshold of [0.2, 0.9]

EXPECTED_SWITCHES = {
    "sal": {
        "survey": {"beta2": 1.0, "empty_image": "zero"},
        "astmt": {"beta2": 1.0, "empty_image": "zero"},
        "rcm": {"beta2": 1.0, "empty_image": "zero"},
        "project": {"beta2": 0.3, "empty_image": "recall_one"},
    },
    "semseg": {
        "survey": {"miou_classes": "all", "skip_single_value": False},
        "astmt": {"miou_classes": "all", "skip_single_value": False},
        "rcm": {"miou_classes": "all", "skip_single_value": False},
        "project": {"miou_classes": "present", "skip_single_value": False},
    },
    "parts": {
        "survey": {"miou_classes": "all", "skip_single_value": True},
        "astmt": {"miou_classes": "all", "skip_single_value": True},
        "rcm": {"miou_classes": "all", "skip_single_value": True},
        "project": {"miou_classes": "present", "skip_single_value": False},
    },
    "human_parts": {
        "survey": {"miou_classes": "all", "skip_single_value": True},
        "astmt": {"miou_classes": "all", "skip_single_value": True},
        "rcm": {"miou_classes": "all", "skip_single_value": True},
        "project": {"miou_classes": "present", "skip_single_value": False},
    },
    "depth": {
        "survey": {"depth_rmse": "pooled", "log_clamp": 1e-9},
        "astmt": {"depth_rmse": "per_image", "log_clamp": 1e-9},
        "rcm": {"depth_rmse": "per_image", "log_clamp": 1e-9},
        "project": {"depth_rmse": "pooled", "log_clamp": 1e-3},
    },
}


def make(name: str, protocol: str = "project", **overrides) -> Task:
    task = TASKS.get(name)(name, INFO)
    task.configure_evaluation(protocol, overrides)
    return task


def sal_map(*rows: list[float]) -> torch.Tensor:
    """Images of one row of 4 pixels each -> B x 1 x 1 x 4."""
    return torch.tensor([[[row]] for row in rows])


# ---------------------------------------------------------------- presets and configuration


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", sorted(EXPECTED_SWITCHES))
def test_protocol_switches_per_task_type(name, protocol):
    task_type = TASKS.get(name)
    assert task_type.protocol_switches(protocol) == EXPECTED_SWITCHES[name][protocol]
    task = make(name, protocol)
    assert task.evaluation == EXPECTED_SWITCHES[name][protocol]
    for switch_name, switch in task_type.evaluation_switches.items():
        assert switch.help
        assert switch.check(switch.presets[protocol]) == switch.presets[protocol]
        assert type(switch.check(switch.presets[protocol])) is type(switch.presets[protocol]), switch_name


@pytest.mark.parametrize("name", sorted(EXPECTED_SWITCHES))
def test_a_new_task_follows_the_project_protocol(name):
    assert TASKS.get(name)(name, INFO).evaluation == EXPECTED_SWITCHES[name]["project"]


def test_the_task_classes_are_the_registered_ones():
    for task_type in (SalTask, SemsegTask, PartsTask, HumanPartsTask, DepthTask):
        assert TASKS.get(task_type.target_key) is task_type


@pytest.mark.parametrize("name", sorted(EXPECTED_SWITCHES))
def test_configure_evaluation_rejects_an_unknown_switch(name):
    task = make(name)
    with pytest.raises(ValueError, match="'bogus'"):
        task.configure_evaluation("rcm", {"bogus": 1})
    assert task.evaluation == EXPECTED_SWITCHES[name]["project"]


@pytest.mark.parametrize(
    ("name", "switch", "value"),
    [
        ("sal", "beta2", -1),
        ("sal", "beta2", "1"),
        ("sal", "empty_image", "one"),
        ("semseg", "miou_classes", "some"),
        ("semseg", "skip_single_value", "yes"),
        ("human_parts", "skip_single_value", 1),
        ("parts", "miou_classes", None),
        ("depth", "depth_rmse", "mean"),
        ("depth", "log_clamp", -1e-3),
        ("depth", "log_clamp", float("nan")),
    ],
)
def test_configure_evaluation_rejects_a_bad_value_naming_the_switch(name, switch, value):
    task = make(name)
    with pytest.raises(ValueError, match=f"'{switch}'"):
        task.configure_evaluation("rcm", {switch: value})
    assert task.evaluation == EXPECTED_SWITCHES[name]["project"]


def test_overrides_reach_the_metric():
    sal = make("sal", "rcm", beta2=0.3).metric()
    assert (sal.beta2, sal.empty_image) == (0.3, "zero")
    parts = make("human_parts", "survey", skip_single_value=False).metric()
    assert (parts.miou_classes, parts.skip_single_value) == ("all", False)
    depth = make("depth", "astmt", log_clamp=1).metric()
    assert (depth.depth_rmse, depth.log_clamp) == ("per_image", 1.0)


# ---------------------------------------------------------------- saliency


def sal_set_with_an_empty_image() -> tuple[torch.Tensor, torch.Tensor]:
    # image 1: foreground on pixels 0, 1; predicted on pixels 0, 2 -> tp 1, fp 1, fn 1: P = R = 1/2, IoU = 1/3
    # image 2: no salient pixel, nothing predicted
    target = sal_map([1, 1, 0, 0], [0, 0, 0, 0])
    prediction = sal_map([HI, LO, HI, LO], [LO, LO, LO, LO])
    return prediction, target


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sal_image_without_salient_pixel_under_each_protocol(protocol):
    metric = make("sal", protocol).metric()
    metric.update(*sal_set_with_an_empty_image())
    result = metric.compute()
    if protocol == "project":
        # image 2 counts P = R = 1: mean P = mean R = (1/2 + 1) / 2 = 3/4, F = 1.3 * 9/16 / (0.3 * 3/4 + 3/4)
        assert result["maxF"] == pytest.approx(100 * 1.3 * (9 / 16) / (0.3 * 0.75 + 0.75))
        assert result["maxF"] == pytest.approx(75.0)
    else:
        # image 2 counts P = R = 0: mean P = mean R = 1/4, F1 = 2 * 1/16 / (1/4 + 1/4)
        assert result["maxF"] == pytest.approx(100 * 2 * (1 / 16) / 0.5)
        assert result["maxF"] == pytest.approx(25.0)
    # both: IoU of image 2 is 1 (ground truth and prediction empty): (1/3 + 1) / 2
    assert result["mIoU"] == pytest.approx(100 * (1 / 3 + 1) / 2)


def test_sal_empty_image_alone_changes_the_score():
    prediction, target = sal_set_with_an_empty_image()
    recall_one = make("sal", "rcm", empty_image="recall_one").metric()
    recall_one.update(prediction, target)
    # beta2 = 1 with P = R = 3/4 -> F1 = 3/4
    assert recall_one.compute()["maxF"] == pytest.approx(75.0)
    zero = make("sal", "project", empty_image="zero").metric()
    zero.update(prediction, target)
    # beta2 = 0.3 with P = R = 1/4 -> F = 1.3 * 1/16 / (0.3/4 + 1/4) = 1/4
    assert zero.compute()["maxF"] == pytest.approx(100 * 1.3 * (1 / 16) / (0.3 / 4 + 1 / 4))


def test_sal_empty_image_with_a_false_positive():
    # no salient pixel, one predicted: P = 0/1 = 0 and IoU = 0/1 = 0 under both; R = 0/0 is 1 or 0
    target, prediction = sal_map([0, 0, 0, 0]), sal_map([HI, LO, LO, LO])
    project, reference = make("sal", "project").metric(), make("sal", "survey").metric()
    for metric in (project, reference):
        metric.update(prediction, target)
    assert project.sums[:, 0].tolist() == [0.0, 1.0, 0.0]
    assert reference.sums[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert project.compute() == {"maxF": 0.0, "mIoU": 0.0}


@pytest.mark.parametrize(("beta2", "expected"), [(0.3, 1.3 * 0.5 / (0.3 + 0.5)), (1.0, 2 * 0.5 / 1.5), (0.0, 1.0)])
def test_sal_beta2(beta2, expected):
    # foreground on pixels 0, 1, predicted on pixel 0 only: P = 1, R = 1/2; F = (1 + b2) P R / (b2 P + R)
    metric = make("sal", "project", beta2=beta2).metric()
    metric.update(sal_map([HI, LO, LO, LO]), sal_map([1, 1, 0, 0]))
    assert metric.compute()["maxF"] == pytest.approx(100 * expected)


# ---------------------------------------------------------------- class maps


def test_semseg_absent_class_in_the_mean_iou():
    # classes a, b, c; c is neither in the ground truth nor predicted
    target = torch.tensor([[[0, 0], [1, 1]]])
    prediction = torch.tensor([[[0, 1], [1, 1]]])
    # a: hits 1, union 2 + 1 - 1 = 2 -> 1/2; b: hits 2, union 2 + 3 - 2 = 3 -> 2/3; c: empty union
    results = {}
    for protocol in ("project", "rcm"):
        metric = make("semseg", protocol).metric()
        metric.update(prediction, target)
        results[protocol] = metric.compute()
        assert results[protocol]["IoU/a"] == pytest.approx(50.0)
        assert results[protocol]["IoU/b"] == pytest.approx(200 / 3)
        assert math.isnan(results[protocol]["IoU/c"])
        assert results[protocol]["pixel_acc"] == pytest.approx(75.0)
    assert results["project"]["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert results["rcm"]["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3)


def human_parts_set() -> tuple[torch.Tensor, torch.Tensor]:
    # classes background (0), head (1), torso (2); one batch of three 2 x 2 images:
    # P, a person with parts: gt 0 1 / 2 255, predicted 0 1 / 1 0 -> pairs (0,0) (1,1) (2,1)
    # Q, a person without parts (all background): predicted 0 1 / 0 0 -> (0,0) x 3, (0,1)
    # R, no person (all ignore): no valid pixel
    target = torch.tensor([[[0, 1], [2, 255]], [[0, 0], [0, 0]], [[255, 255], [255, 255]]])
    prediction = torch.tensor([[[0, 1], [1, 0]], [[0, 1], [0, 0]], [[2, 2], [2, 2]]])
    return prediction, target


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_human_parts_person_without_parts_under_each_protocol(protocol):
    metric = make("human_parts", protocol).metric()
    metric.update(*human_parts_set())
    result = metric.compute()
    if protocol == "project":
        # Q counts: confusion rows gt 0: [4, 1, 0], gt 1: [0, 1, 0], gt 2: [0, 1, 0]
        # background 4 / (5 + 4 - 4) = 4/5, head 1 / (1 + 3 - 1) = 1/3, torso 0 / (1 + 0 - 0) = 0
        assert result["mIoU"] == pytest.approx(100 * (4 / 5 + 1 / 3 + 0) / 3)
        assert result["pixel_acc"] == pytest.approx(100 * 5 / 7)
        assert result["IoU/background"] == pytest.approx(80.0)
    else:
        # Q skipped: gt 0: [1, 0, 0], gt 1: [0, 1, 0], gt 2: [0, 1, 0]
        # background 1 / 1, head 1 / (1 + 2 - 1) = 1/2, torso 0 / 1; mean over all three classes
        assert result["mIoU"] == pytest.approx(100 * (1 + 1 / 2 + 0) / 3)
        assert result["pixel_acc"] == pytest.approx(100 * 2 / 3)
        assert result["IoU/background"] == pytest.approx(100.0)
    assert result["IoU/head"] == pytest.approx(100 * (1 / 3 if protocol == "project" else 1 / 2))
    assert result["IoU/torso"] == 0.0


def test_skip_single_value_keeps_images_with_two_values_or_a_part_only():
    metric = make("parts", "rcm").metric()
    # background and ignore (two values) and an all-"leg" image (one value, not background) both count
    target = torch.tensor([[[0, 0], [255, 255]], [[1, 1], [1, 1]], [[0, 0], [0, 0]]])
    prediction = torch.tensor([[[0, 1], [1, 1]], [[1, 1], [1, 0]], [[1, 1], [1, 1]]])
    metric.update(prediction, target)
    # image 1: (0,0) (0,1); image 2: (1,1) x 3, (1,0); image 3 skipped
    assert metric.confusion.tolist() == [[1.0, 1.0], [1.0, 3.0]]
    kept = make("parts", "rcm", skip_single_value=False).metric()
    kept.update(prediction, target)
    assert kept.confusion.tolist() == [[1.0, 5.0], [1.0, 3.0]]


def test_semseg_never_skips_an_all_background_image():
    for protocol in PROTOCOLS:
        metric = make("semseg", protocol).metric()
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
        assert metric.compute()["pixel_acc"] == pytest.approx(100.0)


# ---------------------------------------------------------------- depth


def depth_set() -> tuple[torch.Tensor, torch.Tensor]:
    # A: 1 valid pixel, prediction 2 for depth 1: RMSE 1, log RMSE ln 2
    # B: 4 valid pixels, exact: RMSE 0, log RMSE 0
    # C: 4 valid pixels, one predicts 6 for depth 2: RMSE sqrt(16 / 4) = 2, log RMSE sqrt(ln(3)^2 / 4) = ln(3) / 2
    # D: no valid pixel (skipped)
    target = torch.tensor([[[[1.0, 0], [0, 0]]], [[[1.0, 1], [1, 1]]], [[[2.0, 2], [2, 2]]], [[[0.0, 0], [0, 0]]]])
    prediction = torch.tensor([[[[2.0, 9], [9, 9]]], [[[1.0, 1], [1, 1]]], [[[2.0, 2], [2, 6]]], [[[3.0, 3], [3, 3]]]])
    return prediction, target


def test_depth_rmse_per_image_and_pooled():
    prediction, target = depth_set()
    pooled, per_image = make("depth", "survey").metric(), make("depth", "rcm").metric()
    for metric in (pooled, per_image):
        metric.update(prediction, target)
    pooled, per_image = pooled.compute(), per_image.compute()
    # pooled over the 9 valid pixels: squared errors 1 + 16, squared log errors ln(2)^2 + ln(3)^2
    assert pooled["rmse"] == pytest.approx(math.sqrt(17 / 9))
    assert pooled["log_rmse"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(3) ** 2) / 9))
    # per image: the mean of 1, 0, 2 and the median of ln 2 = 0.693, 0, ln(3) / 2 = 0.549
    assert per_image["rmse"] == pytest.approx((1 + 0 + 2) / 3)
    assert per_image["log_rmse"] == pytest.approx(math.log(3) / 2)
    assert per_image["log_rmse"] != pytest.approx((math.log(2) + math.log(3) / 2) / 3)  # not the mean
    # the other keys stay pooled: abs (1 + 4) / 9, abs_rel (1/1 + 4/2) / 9, ratios 2, 1 x 7, 3
    for result in (pooled, per_image):
        assert result["abs"] == pytest.approx(5 / 9)
        assert result["abs_rel"] == pytest.approx(3 / 9)
        assert result["delta1"] == pytest.approx(100 * 7 / 9)
        assert result["delta3"] == pytest.approx(100 * 7 / 9)  # 2 and 3 exceed 1.25^3 = 1.95
    assert {k: v for k, v in pooled.items() if "rmse" not in k} == pytest.approx(
        {k: v for k, v in per_image.items() if "rmse" not in k}
    )


def test_depth_median_log_rmse_of_an_even_count():
    # two images: log RMSE ln 2 (one pixel 2 for 1) and 0 -> median (ln 2 + 0) / 2
    prediction, target = depth_set()
    metric = make("depth", "astmt").metric()
    metric.update(prediction[:2], target[:2])
    assert metric.compute()["log_rmse"] == pytest.approx(math.log(2) / 2)
    assert metric.compute()["rmse"] == pytest.approx((1 + 0) / 2)


def test_depth_per_image_merge_equals_one_metric_over_both_halves():
    prediction, target = depth_set()
    whole, first, second = (make("depth", "rcm").metric() for _ in range(3))
    whole.update(prediction, target)
    first.update(prediction[:2], target[:2])
    second.update(prediction[2:], target[2:])
    first.merge(second)
    assert sorted(first.image_rmse) == pytest.approx(sorted(whole.image_rmse))
    assert len(first.image_log_rmse) == 3
    assert first.compute() == pytest.approx(whole.compute())
    with pytest.raises(RuntimeError, match="no valid pixels"):
        make("depth", "rcm").metric().compute()


def test_depth_pooled_metric_keeps_no_per_image_values():
    metric = make("depth").metric()
    metric.update(*depth_set())
    assert metric.image_rmse == [] and metric.image_log_rmse == []


def test_depth_log_clamp_with_a_zero_prediction():
    # depths 1 and 2, predictions 0 and 2: the zero is clamped to c before the log and the ratio
    target = torch.tensor([[[[1.0, 2.0]]]])
    prediction = torch.tensor([[[[0.0, 2.0]]]])
    results = {}
    for protocol, clamp in (("project", 1e-3), ("survey", 1e-9)):
        metric = make("depth", protocol).metric()
        metric.update(prediction, target)
        results[protocol] = result = metric.compute()
        # squared log errors (ln 1 - ln c)^2 and 0 over 2 pixels
        assert result["log_rmse"] == pytest.approx(math.sqrt(math.log(clamp) ** 2 / 2))
        # the RMSE is not clamped: sqrt((1 - 0)^2 / 2)
        assert result["rmse"] == pytest.approx(math.sqrt(1 / 2))
        assert result["delta1"] == pytest.approx(50.0)  # ratio 1 / c fails, 2 / 2 passes
    assert results["project"]["log_rmse"] == pytest.approx(math.log(1000) / math.sqrt(2))
    assert results["survey"]["log_rmse"] == pytest.approx(math.log(1e9) / math.sqrt(2))


def test_depth_metric_defaults_are_the_project_conventions():
    metric = DepthMetric()
    assert (metric.depth_rmse, metric.log_clamp) == ("pooled", 1e-3)
    with pytest.raises(ValueError, match="depth_rmse"):
        DepthMetric(depth_rmse="mean")

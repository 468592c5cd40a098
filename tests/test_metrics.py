"""Metrics of the built-in tasks against hand-computed cases, streaming equivalence and reset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from tasks.depth import DepthMetric
from tasks.edge import EdgeMetric, disk_max
from tasks.normals import NormalsMetric
from tasks.sal import SalMetric
from tasks.segmentation import ConfusionMatrixMetric

# ---------------------------------------------------------------- semseg / parts


def semseg_case() -> tuple[torch.Tensor, torch.Tensor]:
    # valid pixels (gt -> pred): 0->0, 0->1, 1->1, 1->1, 2->2; the last pixel is ignored
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    prediction = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    return prediction, target


def test_semseg_confusion_matrix_by_hand():
    metric = ConfusionMatrixMetric(["a", "b", "c", "d"])
    metric.update(*semseg_case())
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(metric.confusion, expected)
    result = metric.compute()
    # IoU a = 1 / (2 + 1 - 1), b = 2 / (2 + 3 - 2), c = 1 / 1; d never appears and is left out of the mean
    assert result["IoU/a"] == pytest.approx(50.0)
    assert result["IoU/b"] == pytest.approx(200 / 3)
    assert result["IoU/c"] == pytest.approx(100.0)
    assert math.isnan(result["IoU/d"])
    assert result["mIoU"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert result["pixel_acc"] == pytest.approx(80.0)  # 4 of 5 valid pixels
    assert ConfusionMatrixMetric.primary == "mIoU" and ConfusionMatrixMetric.higher_is_better


def test_segmentation_skips_images_without_valid_pixels():
    prediction, target = semseg_case()
    reference = ConfusionMatrixMetric(["a", "b", "c"])
    reference.update(prediction, target)
    metric = ConfusionMatrixMetric(["a", "b", "c"])
    metric.update(
        torch.cat([prediction, torch.zeros_like(prediction)]),
        torch.cat([target, torch.full_like(target, 255)]),
    )
    assert metric.compute() == reference.compute()


def test_segmentation_streaming_reset_and_errors():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (4, 5, 6), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    prediction = torch.randint(0, 4, (4, 5, 6), generator=generator)
    whole, parts = ConfusionMatrixMetric(list("abcd")), ConfusionMatrixMetric(list("abcd"))
    whole.update(prediction, target)
    parts.update(prediction[:1], target[:1])
    parts.update(prediction[1:], target[1:])
    assert parts.compute() == pytest.approx(whole.compute())
    parts.reset()
    with pytest.raises(RuntimeError, match="no valid pixels"):
        parts.compute()
    with pytest.raises(ValueError, match="label 7"):
        parts.update(prediction, torch.full_like(target, 7))
    with pytest.raises(ValueError, match="shape"):
        parts.update(prediction[:, :2], target)


# ---------------------------------------------------------------- depth


def depth_case() -> tuple[torch.Tensor, torch.Tensor]:
    # image A: 2 valid pixels (errors 0.5, 0); image B: 4 valid pixels (errors 0, 0, 0, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    prediction = torch.tensor([[[[1.5, 2.0], [5.0, 5.0]]], [[[1.0, 1.0], [1.0, 3.0]]]])
    return prediction, target


def test_depth_by_hand_pools_pixels_over_the_set():
    metric = DepthMetric()
    metric.update(*depth_case())
    result = metric.compute()
    # pooled: sqrt((0.25 + 4) / 6); a mean of per-image RMSEs would be (sqrt(0.125) + 1) / 2 = 0.677
    assert result["rmse"] == pytest.approx(math.sqrt(4.25 / 6))
    assert result["rmse"] != pytest.approx((math.sqrt(0.25 / 2) + 1) / 2)
    assert result["abs_rel"] == pytest.approx((0.5 + 2.0) / 6)
    assert result["log_rmse"] == pytest.approx(math.sqrt((math.log(1.5) ** 2 + math.log(3) ** 2) / 6))
    # ratios 1.5, 1, 1, 1, 1, 3: below 1.25 -> 4, below 1.5625 -> 5, below 1.953 -> 5
    assert result["delta1"] == pytest.approx(400 / 6)
    assert result["delta2"] == pytest.approx(500 / 6)
    assert result["delta3"] == pytest.approx(500 / 6)
    assert DepthMetric.primary == "rmse" and not DepthMetric.higher_is_better


def test_depth_streaming_reset_and_zero_prediction():
    prediction, target = depth_case()
    whole, parts = DepthMetric(), DepthMetric()
    whole.update(prediction, target)
    parts.update(prediction[:1], target[:1])
    parts.update(prediction[1:], target[1:])
    assert parts.compute() == pytest.approx(whole.compute())
    parts.reset()
    with pytest.raises(RuntimeError, match="no valid pixels"):
        parts.compute()
    parts.update(torch.zeros_like(target), target)
    assert all(math.isfinite(value) for value in parts.compute().values())


# ---------------------------------------------------------------- normals


def normals_case() -> tuple[torch.Tensor, torch.Tensor]:
    up = [0.0, 0.0, 1.0]
    # errors 0, 20, 45 (after renormalizing (1, 0, 1)) and 90 degrees; the last pixel is invalid
    s, c = math.sin(math.radians(20)), math.cos(math.radians(20))
    predictions = [up, [s, 0.0, c], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    targets = [up, up, up, up, [0.0, 0.0, 0.0]]
    as_map = lambda rows: torch.tensor(rows).T.reshape(1, 3, 1, 5)  # noqa: E731
    return as_map(predictions), as_map(targets)


def test_normals_by_hand():
    metric = NormalsMetric()
    metric.update(*normals_case())
    result = metric.compute()
    assert result["mean"] == pytest.approx((0 + 20 + 45 + 90) / 4)
    assert result["median"] == pytest.approx((20 + 45) / 2, abs=0.006)  # 0.01 degree bins
    assert result["rmse"] == pytest.approx(math.sqrt((400 + 2025 + 8100) / 4))
    assert result["11.25"] == pytest.approx(25.0)
    assert result["22.5"] == pytest.approx(50.0)
    assert result["30"] == pytest.approx(50.0)
    assert NormalsMetric.primary == "mean" and not NormalsMetric.higher_is_better


def test_normals_zero_prediction_counts_as_90_degrees():
    metric = NormalsMetric()
    metric.update(torch.zeros(1, 3, 1, 2), torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2))
    assert metric.compute()["mean"] == pytest.approx(90.0)


def test_normals_median_odd_count_and_streaming():
    prediction, target = normals_case()
    metric = NormalsMetric()
    metric.update(prediction[..., 1:], target[..., 1:])  # 20, 45, 90
    assert metric.compute()["median"] == pytest.approx(45.0, abs=0.006)
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(3, 3, 4, 5, generator=generator)
    target = torch.nn.functional.normalize(torch.randn(3, 3, 4, 5, generator=generator), dim=1)
    target[:, :, 0] = 0
    whole, parts = NormalsMetric(), NormalsMetric()
    whole.update(prediction, target)
    parts.update(prediction[:2], target[:2])
    parts.update(prediction[2:], target[2:])
    assert parts.compute() == pytest.approx(whole.compute())
    parts.reset()
    with pytest.raises(RuntimeError, match="no valid pixels"):
        parts.compute()


# ---------------------------------------------------------------- edge

# on a 9 x 9 map the diagonal is 9 sqrt(2) = 12.73 px; this max_dist gives a 1.5 px tolerance
TOLERANCE_1_5PX = 1.5 / math.hypot(9, 9)


def edge_map(columns: dict[int, float]) -> torch.Tensor:
    """A 1 x 1 x 9 x 9 map with vertical lines at the given columns and values."""
    value = torch.zeros(1, 1, 9, 9)
    for column, probability in columns.items():
        value[..., column] = probability
    return value


def test_edge_within_tolerance_counts_and_far_does_not():
    target = edge_map({4: 1.0})
    near, far = EdgeMetric(TOLERANCE_1_5PX), EdgeMetric(TOLERANCE_1_5PX)
    near.update(edge_map({5: 0.85}), target)  # shifted by 1 px
    far.update(edge_map({7: 0.85}), target)  # shifted by 3 px
    assert near.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    assert far.compute() == pytest.approx({"odsF": 0.0, "oisF": 0.0})
    assert EdgeMetric.primary == "odsF" and EdgeMetric.higher_is_better


def test_edge_ods_and_ois_by_hand():
    target = torch.cat([edge_map({4: 1.0}), edge_map({4: 1.0})])
    # image 1: true line 0.85, false line 0.45 -> F = 1 for thresholds in (0.45, 0.85]
    # image 2: true line 0.35, false line 0.65 -> best F = 2/3 (P = 1/2, R = 1) for thresholds <= 0.35
    prediction = torch.cat([edge_map({5: 0.85, 8: 0.45}), edge_map({3: 0.35, 0: 0.65})])
    metric = EdgeMetric(TOLERANCE_1_5PX)
    metric.update(prediction, target)
    result = metric.compute()
    # ODS: t <= 0.35 -> P = 18/36, R = 1, F = 2/3; (0.35, 0.45] -> P = 9/27, R = 1/2, F = 0.4;
    # (0.45, 0.65] -> P = 9/18, R = 1/2, F = 0.5; (0.65, 0.85] -> P = 1, R = 1/2, F = 2/3
    assert result["odsF"] == pytest.approx(200 / 3)
    # OIS: per image best counts summed: matched 9 + 9, predicted 9 + 18, recalled 18 of 18
    # -> P = 2/3, R = 1, F = 0.8
    assert result["oisF"] == pytest.approx(80.0)

    streamed = EdgeMetric(TOLERANCE_1_5PX)
    streamed.update(prediction[:1], target[:1])
    streamed.update(prediction[1:], target[1:])
    assert streamed.compute() == pytest.approx(result)
    streamed.reset()
    with pytest.raises(RuntimeError, match="no valid pixels"):
        streamed.compute()


def test_edge_ignores_pixels_marked_255():
    target = edge_map({4: 1.0, 0: 255.0, 1: 255.0})
    # a confident false line inside the ignored columns is neither a prediction nor a miss
    prediction = edge_map({4: 0.9, 0: 0.9})
    metric = EdgeMetric(TOLERANCE_1_5PX)
    metric.update(prediction, target)
    assert metric.compute()["odsF"] == pytest.approx(100.0)
    metric.update(torch.rand(1, 1, 9, 9), torch.full((1, 1, 9, 9), 255.0))  # skipped entirely
    assert metric.compute()["odsF"] == pytest.approx(100.0)


@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.9, 4.2])
def test_disk_max_matches_euclidean_distance_transform(radius):
    generator = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 13, 17, generator=generator) < 0.05
    mask[1] = False
    mask[1, 0, 0] = True
    near = disk_max(mask.float(), radius) > 0
    for image in range(2):
        distance = distance_transform_edt(~mask[image].numpy())
        assert np.array_equal(near[image].numpy(), distance <= radius)


# ---------------------------------------------------------------- saliency


def sal_case() -> tuple[torch.Tensor, torch.Tensor]:
    # image 1: foreground in the left half; image 2: no foreground, nothing predicted
    target = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]], [[[0.0] * 4] * 2]])
    prediction = torch.tensor([[[[0.95, 0.32, 0.1, 0.42], [0.95, 0.32, 0.1, 0.42]]], [[[0.1] * 4] * 2]])
    return prediction, target


def test_sal_max_f_at_known_threshold():
    prediction, target = sal_case()
    metric = SalMetric()
    metric.update(prediction[:1], target[:1])
    result = metric.compute()
    # t <= 0.3: P = 4/6, R = 1, F = 1.3 (2/3) / (0.2 + 1) = 0.7222, IoU = 4/6
    # t in {0.35, 0.4}: P = 2/4, R = 2/4, F = 0.5, IoU = 2/6
    # t >= 0.45: P = 1, R = 1/2, F = 0.65 / 0.8 = 0.8125, IoU = 1/2
    assert result["maxF"] == pytest.approx(81.25)
    assert result["mIoU"] == pytest.approx(200 / 3)
    assert SalMetric.primary == "maxF" and SalMetric.higher_is_better


def test_sal_averages_per_image_and_empty_ground_truth():
    prediction, target = sal_case()
    metric = SalMetric()
    metric.update(prediction, target)
    result = metric.compute()
    # image 2 has no foreground and predicts none: P = R = IoU = 1 at every threshold
    # t >= 0.45: P = 1, R = (1/2 + 1) / 2 = 3/4, F = 1.3 * 0.75 / (0.3 + 0.75)
    assert result["maxF"] == pytest.approx(100 * 1.3 * 0.75 / 1.05)
    assert result["mIoU"] == pytest.approx(100 * (2 / 3 + 1) / 2)

    streamed = SalMetric()
    streamed.update(prediction[:1], target[:1])
    streamed.update(prediction[1:], target[1:])
    assert streamed.compute() == pytest.approx(result)
    streamed.reset()
    with pytest.raises(RuntimeError, match="no valid pixels"):
        streamed.compute()


def test_sal_ignores_pixels_marked_255():
    prediction, target = sal_case()
    target, prediction = target[:1].clone(), prediction[:1].clone()
    target[..., 3] = 255  # the 0.42 false positives
    metric = SalMetric()
    metric.update(prediction, target)
    # t <= 0.3 now: P = 1, R = 1 -> F = 1
    assert metric.compute() == pytest.approx({"maxF": 100.0, "mIoU": 100.0})
    with pytest.raises(ValueError, match="not 0, 1 or 255"):
        metric.update(prediction, torch.full_like(target, 0.5))


# ---------------------------------------------------------------- devices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu():
    cases = [
        (ConfusionMatrixMetric(["a", "b", "c"]), semseg_case()),
        (DepthMetric(), depth_case()),
        (NormalsMetric(), normals_case()),
        (EdgeMetric(TOLERANCE_1_5PX), (edge_map({5: 0.85, 8: 0.45}), edge_map({4: 1.0}))),
        (SalMetric(), sal_case()),
    ]
    for metric, (prediction, target) in cases:
        metric.update(prediction, target)
        on_cpu = metric.compute()
        metric.reset()
        metric.update(prediction.cuda(), target.cuda())
        assert metric.compute() == pytest.approx(on_cpu, nan_ok=True)

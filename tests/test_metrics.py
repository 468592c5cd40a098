"""Metrics of the built-in tasks against hand-computed cases, streaming equivalence and reset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rcm_nddr.tasks.depth import DepthMetric
from rcm_nddr.tasks.edge import EDGE_THRESHOLDS, EdgeMetric, disk_max
from rcm_nddr.tasks.edge_matching import bipartite_counts, maximum_matching_size, thin
from rcm_nddr.tasks.normals import NormalsMetric
from rcm_nddr.tasks.sal import SalMetric
from rcm_nddr.tasks.segmentation import ConfusionMatrixMetric
from scipy.ndimage import distance_transform_edt
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from skimage.morphology import thin as skimage_thin

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


MATCHINGS = ["bipartite", "distance"]


@pytest.mark.parametrize("matching", MATCHINGS)
def test_edge_perfect_prediction_scores_100(matching):
    target = edge_map({4: 1.0})
    target[..., 2, :] = 1.0  # a horizontal line crossing the vertical one
    metric = EdgeMetric(TOLERANCE_1_5PX, matching)
    metric.update(target.clone(), target)
    assert metric.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    assert EdgeMetric.primary == "odsF" and EdgeMetric.higher_is_better


@pytest.mark.parametrize("matching", MATCHINGS)
def test_edge_within_tolerance_counts_and_far_does_not(matching):
    target = edge_map({4: 1.0})
    near, far = EdgeMetric(TOLERANCE_1_5PX, matching), EdgeMetric(TOLERANCE_1_5PX, matching)
    near.update(edge_map({5: 0.85}), target)  # shifted by 1 px: each pixel has its own partner
    far.update(edge_map({7: 0.85}), target)  # shifted by 3 px
    assert near.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    assert far.compute() == pytest.approx({"odsF": 0.0, "oisF": 0.0})


@pytest.mark.parametrize("matching", MATCHINGS)
def test_edge_tolerance_is_euclidean(matching):
    # one gt pixel and one predicted pixel diagonally next to it, sqrt(2) = 1.414 px apart
    target, prediction = torch.zeros(1, 1, 9, 9), torch.zeros(1, 1, 9, 9)
    target[..., 4, 4] = 1.0
    prediction[..., 5, 5] = 0.9
    inside, outside = EdgeMetric(TOLERANCE_1_5PX, matching), EdgeMetric(1.4 / math.hypot(9, 9), matching)
    inside.update(prediction, target)
    outside.update(prediction, target)
    assert inside.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    assert outside.compute() == pytest.approx({"odsF": 0.0, "oisF": 0.0})


def test_edge_thick_prediction_is_thinned_by_bipartite_matching():
    target = edge_map({4: 1.0})
    thick = edge_map({3: 0.9, 4: 0.9, 5: 0.9})
    # Guo-Hall thinning leaves the centre column without its end pixels (rows 1 .. 7)
    expected_thin = np.zeros((9, 9), dtype=bool)
    expected_thin[1:8, 4] = True
    assert np.array_equal(thin(thick[0, 0].numpy() > 0), expected_thin)
    distance, bipartite = EdgeMetric(TOLERANCE_1_5PX, "distance"), EdgeMetric(TOLERANCE_1_5PX, "bipartite")
    distance.update(thick, target)
    bipartite.update(thick, target)
    # distance: all 27 pixels lie within 1 px of the line, P = R = 1
    assert distance.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    # bipartite: 7 thinned pixels, all matched: P = 1, R = 7/9, F = 2 (7/9) / (16/9) = 7/8
    assert bipartite.compute() == pytest.approx({"odsF": 87.5, "oisF": 87.5})


def test_edge_two_lines_near_one_gt_line_share_it_only_under_distance_matching():
    target = edge_map({4: 1.0})
    prediction = edge_map({3: 0.9, 5: 0.9})  # both 1 px from the gt line, each one pixel wide
    distance, bipartite = EdgeMetric(TOLERANCE_1_5PX, "distance"), EdgeMetric(TOLERANCE_1_5PX, "bipartite")
    distance.update(prediction, target)
    bipartite.update(prediction, target)
    # distance: 18 of 18 predictions near the line, R = 1 -> F = 1
    assert distance.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    # bipartite: 9 gt pixels take 9 of the 18 predictions: P = 1/2, R = 1 -> F = 2/3
    assert bipartite.compute() == pytest.approx({"odsF": 200 / 3, "oisF": 200 / 3})


@pytest.mark.parametrize("matching", MATCHINGS)
def test_edge_ods_and_ois_by_hand(matching):
    # with one-pixel-wide lines, each at most one gt line within reach, both matchings count alike
    target = torch.cat([edge_map({4: 1.0}), edge_map({4: 1.0})])
    # image 1: true line 0.85, false line 0.45 -> F = 1 for thresholds in (0.45, 0.85]
    # image 2: true line 0.35, false line 0.65 -> best F = 2/3 (P = 1/2, R = 1) for thresholds <= 0.35
    prediction = torch.cat([edge_map({5: 0.85, 8: 0.45}), edge_map({3: 0.35, 0: 0.65})])
    metric = EdgeMetric(TOLERANCE_1_5PX, matching)
    metric.update(prediction, target)
    result = metric.compute()
    # ODS: t <= 0.35 -> P = 18/36, R = 1, F = 2/3; (0.35, 0.45] -> P = 9/27, R = 1/2, F = 0.4;
    # (0.45, 0.65] -> P = 9/18, R = 1/2, F = 0.5; (0.65, 0.85] -> P = 1, R = 1/2, F = 2/3
    assert result["odsF"] == pytest.approx(200 / 3)
    # OIS: per image best counts summed: matched 9 + 9, predicted 9 + 18, recalled 18 of 18
    # -> P = 2/3, R = 1, F = 0.8
    assert result["oisF"] == pytest.approx(80.0)

    streamed = EdgeMetric(TOLERANCE_1_5PX, matching)
    streamed.update(prediction[:1], target[:1])
    streamed.update(prediction[1:], target[1:])
    assert streamed.compute() == pytest.approx(result)
    streamed.reset()
    with pytest.raises(RuntimeError, match="no valid pixels"):
        streamed.compute()


def test_edge_ods_and_ois_differ_between_matchings_by_hand():
    target = torch.cat([edge_map({4: 1.0}), edge_map({4: 1.0})])
    # image 1: lines on both sides of the gt line, 0.8 and 0.4; image 2: the gt line at 0.3 and a
    # false line 3 px away at 0.6
    prediction = torch.cat([edge_map({3: 0.8, 5: 0.4}), edge_map({4: 0.3, 7: 0.6})])
    bipartite, distance = EdgeMetric(TOLERANCE_1_5PX, "bipartite"), EdgeMetric(TOLERANCE_1_5PX, "distance")
    bipartite.update(prediction, target)
    distance.update(prediction, target)
    # bipartite, (matched, predicted) per image and 18 gt pixels in all:
    #   t <= 0.3:   (9, 18) + (9, 18): P = 1/2, R = 1,   F = 2/3  <- image 2's best (2/3)
    #   (0.3, 0.4]: (9, 18) + (0, 9):  P = 1/3, R = 1/2, F = 0.4
    #   (0.4, 0.6]: (9, 9)  + (0, 9):  P = 1/2, R = 1/2, F = 1/2
    #   (0.6, 0.8]: (9, 9)  + (0, 0):  P = 1,   R = 1/2, F = 2/3  <- image 1's best (1)
    # ODS = 2/3; OIS sums (9, 9) and (9, 18): P = 18/27, R = 1, F = 0.8
    assert bipartite.compute() == pytest.approx({"odsF": 200 / 3, "oisF": 80.0})
    # distance, (matched, predicted, recalled) per image: image 1 matches both lines and its best is
    # every t <= 0.8 (F = 1, the highest t wins the tie: (9, 9, 9)); image 2 as above
    #   t <= 0.3:   (18, 18, 9) + (9, 18, 9): P = 27/36, R = 1, F = 6/7  <- ODS
    #   (0.3, 0.4]: (18, 18, 9) + (0, 9, 0):  P = 2/3, R = 1/2, F = 4/7
    # OIS sums (9, 9, 9) and (9, 18, 9): F = 0.8 again
    assert distance.compute() == pytest.approx({"odsF": 600 / 7, "oisF": 80.0})


@pytest.mark.parametrize("matching", MATCHINGS)
def test_edge_ignores_pixels_marked_255(matching):
    target = edge_map({4: 1.0, 0: 255.0, 1: 255.0})
    # a confident false line inside the ignored columns is neither a prediction nor a miss
    prediction = edge_map({4: 0.9, 0: 0.9})
    metric = EdgeMetric(TOLERANCE_1_5PX, matching)
    metric.update(prediction, target)
    assert metric.compute()["odsF"] == pytest.approx(100.0)
    metric.update(torch.rand(1, 1, 9, 9), torch.full((1, 1, 9, 9), 255.0))  # skipped entirely
    assert metric.compute()["odsF"] == pytest.approx(100.0)


def test_edge_ignored_pixels_are_masked_before_thinning():
    target = edge_map({4: 1.0})
    target[..., 5:] = 255.0
    # a 5 px wide band over columns 4 .. 8: thinned whole, its centre line would fall in ignored column
    # 6; masked first, the valid part is column 4 alone, one pixel wide, kept whole by thinning
    prediction = edge_map({4: 0.9, 5: 0.9, 6: 0.9, 7: 0.9, 8: 0.9})
    metric = EdgeMetric(TOLERANCE_1_5PX, "bipartite")
    metric.update(prediction, target)
    assert metric.compute() == pytest.approx({"odsF": 100.0, "oisF": 100.0})


def test_edge_matching_must_be_known():
    with pytest.raises(ValueError, match="'bipartite', 'distance'"):
        EdgeMetric(0.01, "hungarian")
    with pytest.raises(ValueError, match="max_dist"):
        EdgeMetric(-1.0)
    assert EdgeMetric().matching == "bipartite" and EdgeMetric().max_dist == 0.011


def test_thin_matches_scikit_image():
    generator = np.random.default_rng(3)
    for _ in range(60):
        height, width = generator.integers(1, 30, size=2)
        mask = generator.random((height, width)) < generator.uniform(0.2, 0.95)
        assert np.array_equal(thin(mask), skimage_thin(mask))
    blob = np.zeros((40, 50), dtype=bool)
    blob[5:35, 8:45] = True  # a filled rectangle: many sub-iterations
    assert np.array_equal(thin(blob), skimage_thin(blob))


def test_maximum_matching_size_matches_hopcroft_karp():
    generator = np.random.default_rng(4)
    for _ in range(30):
        rows, columns = generator.integers(1, 40, size=2)
        graph = csr_matrix(generator.random((rows, columns)) < generator.uniform(0.02, 0.3))
        expected = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
        assert maximum_matching_size(graph) == expected
    assert maximum_matching_size(csr_matrix((3, 0), dtype=np.int8)) == 0


def reference_bipartite_counts(scores, valid, truth, thresholds, radius):
    """Straightforward per threshold: scikit-image thinning, all pairwise distances, Hopcroft-Karp."""
    gt = np.argwhere(truth)
    matched, predicted = [], []
    for t in thresholds:
        edges = np.argwhere(skimage_thin((scores >= t) & valid))
        predicted.append(len(edges))
        squared = ((edges[:, None, :] - gt[None, :, :]) ** 2).sum(-1)
        graph = csr_matrix(squared <= radius * radius)
        matched.append(int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum()) if graph.nnz else 0)
    return np.array(matched), np.array(predicted)


@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.3])
def test_bipartite_counts_match_a_direct_computation(radius):
    generator = np.random.default_rng(5)
    thresholds = EDGE_THRESHOLDS.numpy()
    for _ in range(4):
        truth = generator.random((14, 17)) < 0.15
        valid = generator.random((14, 17)) < 0.9
        scores = np.clip(generator.random((14, 17)) * 0.8 + truth * 0.3, 0, 1).astype(np.float32)
        scores[generator.random((14, 17)) < 0.2] = 0.0  # below every threshold
        truth &= valid
        matched, predicted = bipartite_counts(scores, valid, truth, thresholds, radius)
        expected_matched, expected_predicted = reference_bipartite_counts(scores, valid, truth, thresholds, radius)
        assert np.array_equal(predicted, expected_predicted)
        assert np.array_equal(matched, expected_matched)
    # no ground truth: every prediction is a false positive
    matched, predicted = bipartite_counts(scores, valid, np.zeros_like(truth), thresholds, radius)
    assert not matched.any() and predicted[0] > 0


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
        (EdgeMetric(TOLERANCE_1_5PX, "distance"), (edge_map({5: 0.85, 8: 0.45}), edge_map({4: 1.0}))),
        (SalMetric(), sal_case()),
    ]
    for metric, (prediction, target) in cases:
        metric.update(prediction, target)
        on_cpu = metric.compute()
        metric.reset()
        metric.update(prediction.cuda(), target.cuda())
        assert metric.compute() == pytest.approx(on_cpu, nan_ok=True)

"""Edge detection: class-balanced BCE, and ODS/OIS F-measures with a distance tolerance."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rcm_nddr.registry import TASKS
from rcm_nddr.task import DatasetInfo, Metric
from tasks.binary import (
    IGNORE_VALUE,
    BinaryMapTask,
    check_binary_target,
    counts_at_thresholds,
    masked_bce_with_logits,
    threshold_buckets,
)
from tasks.common import check_map, check_same_shape, safe_divide, to_accumulator

#: binarization thresholds of the F-measure curves: 0.01, 0.02, ..., 0.99
EDGE_THRESHOLDS = torch.linspace(0.01, 0.99, 99)


def disk_max(values: Tensor, radius: float) -> Tensor:
    """Max of ``values`` (B x H x W) over the disk of ``radius`` pixels around each pixel.

    The disk holds the offsets with dy^2 + dx^2 <= radius^2, exactly the pixels an exact Euclidean
    distance transform places within ``radius``. It is taken row by row: horizontal max filters of
    growing half-width (each from the previous one with two shifted maxima), then one vertical shift
    per row offset of the disk; pixels outside the image are skipped.
    """
    reach = math.floor(radius)
    half_widths = [math.floor(math.sqrt(radius * radius - dy * dy)) for dy in range(-reach, reach + 1)]
    row_max = [values]  # row_max[w]: max over the horizontal segment [x - w, x + w]
    while len(row_max) <= max(half_widths, default=0):
        previous = row_max[-1]
        grown = previous.clone()
        grown[..., 1:] = torch.maximum(grown[..., 1:], previous[..., :-1])
        grown[..., :-1] = torch.maximum(grown[..., :-1], previous[..., 1:])
        row_max.append(grown)
    height = values.shape[1]
    result = values.clone()
    for dy, half in zip(range(-reach, reach + 1), half_widths, strict=True):
        source = row_max[half]
        if dy >= 0:
            result[:, : height - dy] = torch.maximum(result[:, : height - dy], source[:, dy:])
        else:
            result[:, -dy:] = torch.maximum(result[:, -dy:], source[:, : height + dy])
    return result


def _f_measure(precision: Tensor, recall: Tensor) -> Tensor:
    return safe_divide(2 * precision * recall, precision + recall, 0.0)


class EdgeMetric(Metric):
    """Boundary F-measures, ODS (``odsF``, primary, higher is better) and OIS (``oisF``), in percent.

    The probability map is binarized at each of the 99 thresholds ``EDGE_THRESHOLDS`` (0.01 ... 0.99,
    a pixel is an edge when its probability is >= the threshold). A predicted edge pixel is a true
    positive when a ground-truth edge pixel lies within ``max_dist`` x (image diagonal) pixels
    (Euclidean); a ground-truth edge pixel is recalled when a predicted edge pixel lies within the same
    tolerance. Ignored pixels (255) are neither predictions nor ground truth, and an image without any
    valid pixel is skipped. P and R are 0 where their denominator is 0, as in the BSDS code.

    ODS: the counts of each threshold are summed over the set, F = 2PR / (P + R) per threshold, and the
    best is reported. OIS: each image picks the threshold with its best F (the highest one on ties, so
    an image without edges picks the fewest false positives), those counts are summed over the set,
    and F is computed from the sums.

    This simplifies the BSDS/SEISM benchmark: matching is by distance alone, not a one-to-one
    bipartite assignment, so several predicted pixels may match the same ground-truth pixel and thick
    predictions are not penalized within the tolerance; predictions are not thinned; and the best
    F is taken over the discrete thresholds without interpolating between them. Scores are therefore
    comparable between runs of this code, not with published BSDS numbers.
    """

    primary = "odsF"
    higher_is_better = True

    def __init__(self, max_dist: float = 0.011) -> None:
        if not max_dist >= 0:
            raise ValueError(f"edge metric: max_dist must be >= 0 (a fraction of the diagonal), got {max_dist}")
        self.max_dist = max_dist
        self.reset()

    def reset(self) -> None:
        k = EDGE_THRESHOLDS.numel()
        # per threshold: matched predictions, predictions, recalled ground truth; summed over images
        self.ods = torch.zeros(3, k, dtype=torch.float64)
        self.gt_pixels = 0.0
        # matched predictions, predictions, recalled ground truth, ground truth at each image's best
        self.ois = torch.zeros(4, dtype=torch.float64)
        self.images = 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        check_map(target, 1, "edge metric target")
        check_same_shape(prediction, target, "edge metric")
        check_binary_target(target, "edge metric")
        radius = self.max_dist * math.hypot(*target.shape[-2:])
        valid = target[:, 0] != IGNORE_VALUE
        keep = valid.flatten(1).any(1)
        valid, scores = valid[keep], prediction[keep, 0].float()
        if not len(valid):
            return
        truth = (target[keep, 0] == 1) & valid
        near_truth = disk_max(truth.float(), radius) > 0
        # a ground-truth pixel is recalled at threshold t iff the best valid score within reach is >= t
        best_near = disk_max(scores.masked_fill(~valid, -math.inf), radius)

        k = EDGE_THRESHOLDS.numel()
        buckets = threshold_buckets(scores.flatten(1), EDGE_THRESHOLDS)
        matched = counts_at_thresholds(buckets, (valid & near_truth).flatten(1), k).double()
        predicted = counts_at_thresholds(buckets, valid.flatten(1), k).double()
        best_buckets = threshold_buckets(best_near.flatten(1), EDGE_THRESHOLDS)
        recalled = counts_at_thresholds(best_buckets, truth.flatten(1), k).double()
        gt_pixels = truth.flatten(1).sum(1).double()[:, None].expand_as(recalled)

        self.ods += to_accumulator(torch.stack([matched.sum(0), predicted.sum(0), recalled.sum(0)]))
        self.gt_pixels += float(gt_pixels[:, 0].sum())
        f = _f_measure(safe_divide(matched, predicted, 0.0), safe_divide(recalled, gt_pixels, 0.0))
        best = f.shape[1] - 1 - f.flip(1).argmax(1, keepdim=True)
        at_best = [c.gather(1, best).sum() for c in (matched, predicted, recalled, gt_pixels)]
        self.ois += to_accumulator(torch.stack(at_best))
        self.images += len(valid)

    def compute(self) -> dict[str, float]:
        if self.images == 0:
            raise RuntimeError("edge metric: no valid pixels accumulated")
        matched, predicted, recalled = self.ods
        gt = torch.tensor(self.gt_pixels, dtype=torch.float64)
        ods = _f_measure(safe_divide(matched, predicted, 0.0), safe_divide(recalled, gt, 0.0)).max()
        m, p, r, g = self.ois
        ois = _f_measure(safe_divide(m, p, 0.0), safe_divide(r, g, 0.0))
        return {"odsF": 100 * float(ods), "oisF": 100 * float(ois)}


@TASKS.register("edge")
class EdgeTask(BinaryMapTask):
    """Edges; target float 1 x H x W in {0, 1}, 255 = ignore. Prediction: sigmoid probabilities.

    Options: ``pos_weight`` (0.95) weights the BCE of edge pixels, 1 - ``pos_weight`` the others;
    ``max_dist`` (0.011, the NYUD value of the benchmark; 0.0075 is used for PASCAL) is the metric's
    matching tolerance as a fraction of the image diagonal.
    """

    target_key = "edge"
    default_loss_weight = 50.0

    def __init__(self, name: str, info: DatasetInfo, *, pos_weight: float = 0.95, max_dist: float = 0.011) -> None:
        super().__init__(name, info)
        if not 0 <= pos_weight <= 1:
            raise ValueError(f"task {name!r}: pos_weight must lie in [0, 1], got {pos_weight}")
        if not max_dist >= 0:
            raise ValueError(f"task {name!r}: max_dist must be >= 0 (a fraction of the diagonal), got {max_dist}")
        self.pos_weight = float(pos_weight)
        self.max_dist = float(max_dist)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Class-balanced BCE on logits, averaged over non-ignored pixels."""
        self._check_loss_inputs(output, target)
        return masked_bce_with_logits(output, target, self.pos_weight)

    def metric(self) -> EdgeMetric:
        return EdgeMetric(self.max_dist)

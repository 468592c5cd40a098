"""Saliency: masked BCE, and maxF / mIoU over 15 binarization thresholds (the ASTMT protocol)."""

from __future__ import annotations

import torch
from rcm_nddr.tasks.binary import (
    IGNORE_VALUE,
    BinaryMapTask,
    check_binary_target,
    counts_at_thresholds,
    masked_bce_with_logits,
    threshold_buckets,
)
from rcm_nddr.tasks.common import check_map, check_same_shape, safe_divide, to_accumulator
from torch import Tensor

from rcm_nddr.registry import TASKS
from rcm_nddr.task import Metric

#: binarization thresholds: 15 evenly spaced in [0.2, 0.9]
SAL_THRESHOLDS = torch.linspace(0.2, 0.9, 15)
#: beta^2 of the F-measure, weighting precision more than recall as is usual for saliency
BETA_SQ = 0.3


class SalMetric(Metric):
    """Saliency ``maxF`` (primary, higher is better) and ``mIoU``, in percent.

    At each threshold of ``SAL_THRESHOLDS`` the prediction is binarized (foreground when >= the
    threshold) and each image gets precision, recall and foreground IoU over its non-ignored pixels;
    these are averaged over the images. ``maxF`` is the best over thresholds of
    (1 + b^2) P R / (b^2 P + R) with b^2 = 0.3 computed from the mean P and R; ``mIoU`` is the best
    over thresholds of the mean IoU. A ratio 0/0 counts as 1 when the image has no foreground in its
    ground truth (nothing to find, so nothing missed) and 0 otherwise (an empty prediction of a
    present object). Images without any valid pixel are skipped.
    """

    primary = "maxF"
    higher_is_better = True
    state = ("sums", "images")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # per threshold: sums over images of precision, recall, IoU
        self.sums = torch.zeros(3, SAL_THRESHOLDS.numel(), dtype=torch.float64)
        self.images = 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        check_map(target, 1, "saliency metric target")
        check_same_shape(prediction, target, "saliency metric")
        check_binary_target(target, "saliency metric")
        valid = (target != IGNORE_VALUE).flatten(1)
        keep = valid.any(1)
        valid, scores = valid[keep], prediction[keep].flatten(1)
        if not len(valid):
            return
        truth = (target[keep].flatten(1) == 1) & valid
        buckets, k = threshold_buckets(scores, SAL_THRESHOLDS), SAL_THRESHOLDS.numel()
        hits = counts_at_thresholds(buckets, truth, k).double()
        predicted = counts_at_thresholds(buckets, valid, k).double()
        present = truth.sum(1).double()[:, None].expand_as(hits)
        empty = (present == 0).double()
        precision = safe_divide(hits, predicted, empty)
        recall = safe_divide(hits, present, empty)
        iou = safe_divide(hits, predicted + present - hits, empty)
        self.sums += to_accumulator(torch.stack([precision.sum(0), recall.sum(0), iou.sum(0)]))
        self.images += len(valid)

    def compute(self) -> dict[str, float]:
        if self.images == 0:
            raise RuntimeError("saliency metric: no valid pixels accumulated")
        precision, recall, iou = self.sums / self.images
        f = safe_divide((1 + BETA_SQ) * precision * recall, BETA_SQ * precision + recall, 0.0)
        return {"maxF": 100 * float(f.max()), "mIoU": 100 * float(iou.max())}


@TASKS.register("sal")
class SalTask(BinaryMapTask):
    """Salient objects; target float 1 x H x W in {0, 1}, 255 = ignore. Prediction: sigmoid probabilities."""

    target_key = "sal"
    default_loss_weight = 5.0

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """BCE on logits, averaged over non-ignored pixels."""
        self._check_loss_inputs(output, target)
        return masked_bce_with_logits(output, target)

    def metric(self) -> SalMetric:
        return SalMetric()

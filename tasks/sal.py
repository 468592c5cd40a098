"""Saliency: masked BCE, and maxF / mIoU over 15 binarization thresholds (the ASTMT protocol)."""

from __future__ import annotations

import math

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
from rcm_nddr.task import Metric, Switch

#: binarization thresholds: 15 evenly spaced in [0.2, 0.9]
SAL_THRESHOLDS = torch.linspace(0.2, 0.9, 15)
#: beta^2 of the F-measure in this project's protocol, weighting precision more than recall as is usual for
#: saliency (the survey's, ASTMT's and RCM's code use 1, the F1 score: evaluation switch ``beta2``)
BETA_SQ = 0.3
#: the conventions for an image whose ground truth has no salient pixel (evaluation switch ``empty_image``)
EMPTY_IMAGE_RULES = ("recall_one", "zero")


class SalMetric(Metric):
    """Saliency ``maxF`` (primary, higher is better) and ``mIoU``, in percent.

    At each threshold of ``SAL_THRESHOLDS`` the prediction is binarized (foreground when >= the
    threshold) and each image gets precision, recall and foreground IoU over its non-ignored pixels;
    these are averaged over the images. ``maxF`` is the best over thresholds of
    (1 + b^2) P R / (b^2 P + R) computed from the mean P and R, with b^2 = ``beta2`` (0.3 in this project's
    protocol, 1 in the survey's, ASTMT's and RCM's code); ``mIoU`` is the best over thresholds of the mean
    IoU. Images without any valid pixel are skipped.

    A precision or recall 0/0 (nothing predicted, or nothing to find) follows ``empty_image``:

    - ``"recall_one"`` (this project): it counts 1 when the image has no foreground in its ground truth
      (nothing to find, so nothing missed: recall 1, and precision 1 when nothing is predicted) and 0
      otherwise (an empty prediction of a present object);
    - ``"zero"`` (the survey's, ASTMT's and RCM's tp / (tp + fp + eps)): it counts 0, so an image without
      foreground has precision and recall 0 at every threshold.

    The IoU 0/0 counts 1 when the image has no foreground in its ground truth (prediction and ground truth
    both empty) and 0 otherwise, under both rules (as in the RCM code).
    """

    primary = "maxF"
    higher_is_better = True
    state = ("sums", "images")

    def __init__(self, beta2: float = BETA_SQ, empty_image: str = "recall_one") -> None:
        if isinstance(beta2, bool) or not isinstance(beta2, int | float) or not math.isfinite(beta2) or beta2 < 0:
            raise ValueError(f"saliency metric: beta2 must be a number >= 0, got {beta2!r}")
        if empty_image not in EMPTY_IMAGE_RULES:
            raise ValueError(
                f"saliency metric: empty_image must be one of {', '.join(map(repr, EMPTY_IMAGE_RULES))}, "
                f"got {empty_image!r}"
            )
        self.beta2 = float(beta2)
        self.empty_image = empty_image
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
        ratio_empty = empty if self.empty_image == "recall_one" else 0.0
        precision = safe_divide(hits, predicted, ratio_empty)
        recall = safe_divide(hits, present, ratio_empty)
        iou = safe_divide(hits, predicted + present - hits, empty)
        self.sums += to_accumulator(torch.stack([precision.sum(0), recall.sum(0), iou.sum(0)]))
        self.images += len(valid)

    def compute(self) -> dict[str, float]:
        if self.images == 0:
            raise RuntimeError("saliency metric: no valid pixels accumulated")
        precision, recall, iou = self.sums / self.images
        f = safe_divide((1 + self.beta2) * precision * recall, self.beta2 * precision + recall, 0.0)
        return {"maxF": 100 * float(f.max()), "mIoU": 100 * float(iou.max())}


@TASKS.register("sal")
class SalTask(BinaryMapTask):
    """Salient objects; target float 1 x H x W in {0, 1}, 255 = ignore. Prediction: sigmoid probabilities.

    Evaluation switches (``SalMetric``): ``beta2``, the F-measure's beta^2, and ``empty_image``, how an image
    without a salient pixel counts.
    """

    target_key = "sal"
    default_loss_weight = 5.0
    evaluation_switches = {
        "beta2": Switch(
            {"survey": 1.0, "astmt": 1.0, "rcm": 1.0, "project": BETA_SQ},
            help="beta^2 of maxF's F-measure: 0.3 weights precision more (saliency's usual), 1 is the F1 score",
        ),
        "empty_image": Switch(
            {"survey": "zero", "astmt": "zero", "rcm": "zero", "project": "recall_one"},
            EMPTY_IMAGE_RULES,
            help="an image with no salient pixel: 'recall_one' counts its 0/0 precision and recall as 1, "
            "'zero' counts them 0",
        ),
    }

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """BCE on logits, averaged over non-ignored pixels."""
        self._check_loss_inputs(output, target)
        return masked_bce_with_logits(output, target)

    def metric(self) -> SalMetric:
        return SalMetric(beta2=self.evaluation["beta2"], empty_image=self.evaluation["empty_image"])

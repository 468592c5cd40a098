"""Shared machinery of the binary-map tasks (edge, sal): target checks, masked BCE on logits, the BCE transfer
loss of consistency terms, pixel counts at many thresholds at once, the all-zero predictor and a greyscale
visualization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rcm_nddr.tasks.common import check_map, check_same_spatial, check_single, check_values
from torch import Tensor

from rcm_nddr.task import Task, TrivialPredictor

IGNORE_VALUE = 255
#: colour of ignored pixels in visualizations: not a grey, so it cannot be read as a probability
IGNORE_RGB = (0, 64, 128)


def check_binary_target(target: Tensor, what: str) -> None:
    """Targets hold 0 (negative), 1 (positive) or 255 (ignore)."""
    check_values(
        (target != 0) & (target != 1) & (target != IGNORE_VALUE),
        lambda bad: f"{what}: target value {float(target[bad][0])} is not 0, 1 or {IGNORE_VALUE} (ignore)",
        f"{what}: a target value is not 0, 1 or {IGNORE_VALUE} (ignore)",
    )


def masked_bce_with_logits(output: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """Mean binary cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    With ``pos_weight`` w, positives are weighted w and negatives 1 - w (the class-balanced loss of
    HED/ASTMT for edges).
    """
    # Ignored pixels get weight 0 (masking, not indexing: no data-dependent shapes, no host synchronization).
    valid = target != IGNORE_VALUE
    labels = torch.where(valid, target, 0).float()
    weight = valid.float()
    if pos_weight is not None:
        weight = weight * (labels * pos_weight + (1 - labels) * (1 - pos_weight))
    total = F.binary_cross_entropy_with_logits(output.float(), labels, weight=weight, reduction="sum")
    return total / valid.sum().clamp_min(1)


def threshold_buckets(scores: Tensor, thresholds: Tensor) -> Tensor:
    """B x N scores -> how many of the increasing ``thresholds`` lie at or below each score (0 .. K).

    Computed once per score map and shared by every ``counts_at_thresholds`` call on it.
    """
    return torch.bucketize(scores.float(), thresholds.to(scores.device, torch.float32), right=True)


def counts_at_thresholds(buckets: Tensor, mask: Tensor, n_thresholds: int) -> Tensor:
    """For each image, how many pixels inside ``mask`` score >= each threshold.

    ``buckets`` (from ``threshold_buckets``) and ``mask`` are B x N; returns B x K int64. One
    histogram pass instead of K binarizations.
    """
    batch, k = buckets.shape[0], n_thresholds
    offset = buckets + (k + 1) * torch.arange(batch, device=buckets.device)[:, None]
    histogram = torch.bincount(offset[mask], minlength=batch * (k + 1)).view(batch, k + 1)
    # count at threshold j = pixels in buckets j + 1 .. K
    return histogram.flip(1).cumsum(1).flip(1)[:, 1:]


def visualize_probability(value: Tensor) -> Tensor:
    """1 x H x W map in [0, 1] -> 3 x H x W uint8 greyscale; ignore (255) in ``IGNORE_RGB``."""
    check_single(value, 1, "binary map visualization")
    value = value[0].detach().to("cpu", torch.float32)
    ignore = value == IGNORE_VALUE
    grey = (value.clamp(0, 1) * 255).round().to(torch.uint8)
    image = grey.expand(3, *grey.shape).clone()
    image[:, ignore] = torch.tensor(IGNORE_RGB, dtype=torch.uint8)[:, None]
    return image


class ZeroMapPredictor(TrivialPredictor):
    """Predicts probability 0 everywhere (no edge, no salient object)."""

    def predict(self, target: Tensor) -> Tensor:
        return torch.zeros(target.shape, dtype=torch.float32, device=target.device)


def binarize_reference(reference: Tensor, what: str) -> Tensor:
    """A label ({0, 1}, 255 = ignore) or a predicted probability map ([0, 1]) -> a label: probabilities of
    at least 0.5 become 1, lower ones 0, and 255 stays ignore."""
    check_values(
        (reference != IGNORE_VALUE) & ~((reference >= 0) & (reference <= 1)),
        lambda bad: f"{what}: reference value {float(reference[bad][0])} is neither in [0, 1] nor {IGNORE_VALUE}",
        f"{what}: a reference value is neither in [0, 1] nor {IGNORE_VALUE} (ignore)",
    )
    positive = (reference >= 0.5).to(reference.dtype)
    return torch.where(reference == IGNORE_VALUE, reference, positive)


class BinaryMapTask(Task):
    """A per-pixel binary task: one logit channel, sigmoid post-processing, target 1 x H x W in {0, 1}
    with 255 = ignore. Subclasses give the loss and the metric.

    Transfer loss (a consistency term's transfer net into the task): ``"bce"``, the task's own loss of the
    transferred logits against the reference, a label or this task's own probability prediction thresholded
    at 0.5 (``binarize_reference``); ignored pixels (255) stay ignored.
    """

    loss_kind = "classification"
    transfer_losses = ("bce",)

    def transfer_loss(self, kind: str, transferred: Tensor, reference: Tensor) -> Tensor:
        """``"bce"``: ``loss`` of the transferred logits against the binarized reference."""
        if kind not in self.transfer_losses:
            return super().transfer_loss(kind, transferred, reference)
        what = f"{self.name} transfer loss {kind!r}"
        check_map(reference, 1, f"{what} reference")
        if not reference.dtype.is_floating_point:
            reference = reference.float()
        return self.loss(transferred, binarize_reference(reference, what))

    @property
    def out_channels(self) -> int:
        return 1

    def _check_loss_inputs(self, output: Tensor, target: Tensor) -> None:
        check_map(output, 1, f"{self.name} loss output")
        check_map(target, 1, f"{self.name} loss target")
        check_same_spatial(output, target, f"{self.name} loss")
        check_binary_target(target, f"{self.name} loss")

    def postprocess(self, output: Tensor) -> Tensor:
        check_map(output, 1, f"{self.name} postprocess")
        return torch.sigmoid(output.float())

    def visualize(self, value: Tensor) -> Tensor:
        return visualize_probability(value)

    def trivial(self) -> ZeroMapPredictor:
        return ZeroMapPredictor()

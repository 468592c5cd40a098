"""Semantic segmentation: cross-entropy with ignore 255, mIoU from a dataset-level confusion matrix."""

from __future__ import annotations

from rcm_nddr.tasks.segmentation import SegmentationTask

from rcm_nddr.registry import TASKS


@TASKS.register("semseg")
class SemsegTask(SegmentationTask):
    """Per-pixel classes from ``classes["semseg"]``; target int64 H x W, 255 = ignore.

    Metric keys: ``mIoU`` (primary, higher is better), ``pixel_acc`` and ``IoU/<class>``, in percent.
    """

    target_key = "semseg"
    default_loss_weight = 1.0

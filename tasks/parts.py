"""Part segmentation (object or human parts): the semseg machinery on the ``parts`` target."""

from __future__ import annotations

from rcm_nddr.tasks.segmentation import PART_EVALUATION_SWITCHES, SegmentationTask

from rcm_nddr.registry import TASKS


@TASKS.register("parts")
class PartsTask(SegmentationTask):
    """Per-pixel part classes from ``classes["parts"]``; target int64 H x W, 255 = ignore.

    Images whose target has no valid pixel (no part annotated, all 255) are skipped by the metric, as
    in the ASTMT protocol; a dataset should therefore mark images without parts as all-ignore. Under the
    survey, ASTMT and RCM protocols an image whose target is all background (0) is skipped as well
    (evaluation switch ``skip_single_value``); this project's protocol counts it. Metric keys as for semseg:
    ``mIoU`` (primary, higher is better), ``pixel_acc``, ``IoU/<class>``.
    """

    target_key = "parts"
    default_loss_weight = 2.0
    evaluation_switches = PART_EVALUATION_SWITCHES

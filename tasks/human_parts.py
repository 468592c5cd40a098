"""Human part segmentation (PASCAL-MT): the semseg machinery on the ``human_parts`` target."""

from __future__ import annotations

from rcm_nddr.tasks.segmentation import PART_EVALUATION_SWITCHES, SegmentationTask

from rcm_nddr.registry import TASKS


@TASKS.register("human_parts")
class HumanPartsTask(SegmentationTask):
    """Per-pixel human part classes from ``classes["human_parts"]`` (on PASCAL-MT: background, head,
    torso, upper_arm, lower_arm, upper_leg, lower_leg); target int64 H x W, 255 = ignore.

    Images without any person are all 255 in the target and so have no valid pixel; the metric skips
    them, as in the ASTMT protocol. An image of a person without annotated parts (all background, 0) counts
    in this project's protocol; under the survey, ASTMT and RCM protocols it is skipped too (evaluation switch
    ``skip_single_value``, as their human-parts evaluators do). Metric keys as for semseg: ``mIoU`` (primary,
    higher is better), ``pixel_acc``, ``IoU/<class>``.
    """

    target_key = "human_parts"
    default_loss_weight = 2.0
    evaluation_switches = PART_EVALUATION_SWITCHES

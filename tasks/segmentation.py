"""Shared machinery of the class-map tasks (semseg, parts, human_parts): masked (optionally label-smoothed)
cross-entropy, the transfer losses of consistency terms into a class map, the dataset-level confusion-matrix
mIoU, the majority-class predictor and a fixed class palette."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from rcm_nddr.tasks.common import (
    check_map,
    check_same_shape,
    check_same_spatial,
    check_single,
    check_values,
    safe_divide,
    to_accumulator,
)
from torch import Tensor

from rcm_nddr.objectives.losses import smoothed_cross_entropy, smoothed_kl
from rcm_nddr.task import DatasetInfo, Metric, Switch, Task, TrivialPredictor

IGNORE_INDEX = 255
#: the classes the mean IoU runs over (evaluation switch ``miou_classes``)
MIOU_CLASSES = ("present", "all")


def class_names_for(info: DatasetInfo, key: str, task_name: str) -> list[str]:
    """The class names the dataset declares for ``key``; a clear error when it declares none."""
    names = info.classes.get(key)
    if not names:
        declared = ", ".join(sorted(info.classes)) or "(none)"
        raise ValueError(
            f"task {task_name!r} needs the class names of {key!r}, but dataset {info.name!r} declares "
            f"none (it declares classes for: {declared})"
        )
    if len(names) >= IGNORE_INDEX:
        raise ValueError(
            f"dataset {info.name!r} declares {len(names)} classes for {key!r}; at most {IGNORE_INDEX} "
            f"are supported because {IGNORE_INDEX} is the ignore label"
        )
    return list(names)


def check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    """Labels must be integers in [0, num_classes) or the ignore label."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer class labels, got dtype {labels.dtype}")
    check_values(
        (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes)),
        lambda bad: (
            f"{what}: label {int(labels[bad][0])} is outside [0, {num_classes}) and is not the ignore "
            f"label {IGNORE_INDEX}"
        ),
        f"{what}: a label is outside [0, {num_classes}) and is not the ignore label {IGNORE_INDEX}",
    )


def masked_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored."""
    # reduction="mean" would divide by zero on an all-ignore batch and give NaN
    total = F.cross_entropy(output.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def class_palette() -> Tensor:
    """256 x 3 uint8 lookup table: label k gets the k + 1-th colour of the PASCAL VOC bit-interleaving
    scheme (so class 0 is not black), and the ignore label 255 is black."""
    colours = torch.zeros(256, 3, dtype=torch.uint8)
    for label in range(IGNORE_INDEX):
        index, rgb = label + 1, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((index >> channel) & 1) << bit
            index >>= 3
        colours[label] = torch.tensor(rgb, dtype=torch.uint8)
    return colours


_PALETTE = class_palette()


def colorize_labels(labels: Tensor) -> Tensor:
    """H x W integer labels -> 3 x H x W uint8 RGB with the fixed palette; ignore is black."""
    check_single(labels, None, "class map visualization")
    index = labels.detach().to("cpu", torch.long).clamp(0, 255)
    return _PALETTE[index].permute(2, 0, 1).contiguous()


class ConfusionMatrixMetric(Metric):
    """mIoU and pixel accuracy from a dataset-level confusion matrix (in percent).

    Pixels whose target is the ignore label are left out, so an image without any valid ground-truth
    pixel adds nothing (it is skipped, the ASTMT rule for parts). ``IoU/<class>`` is NaN for a class with an
    empty union (neither in the ground truth nor predicted). The mean IoU follows ``miou_classes``:
    ``"present"`` (this project) averages over the classes whose union is non-empty; ``"all"`` (the survey's,
    ASTMT's and RCM's code) averages over every class, a class with an empty union counting IoU 0.

    With ``skip_single_value`` an image whose whole target (valid and ignored pixels together) holds one
    single value that is the ignore label or class 0 (background only: e.g. a person without annotated
    parts) adds nothing either, as the survey's, ASTMT's and RCM's human-parts evaluators skip it. Each
    image of a batch is decided on its own.
    """

    primary = "mIoU"
    higher_is_better = True
    state = ("confusion",)

    def __init__(self, class_names: list[str], miou_classes: str = "present", skip_single_value: bool = False) -> None:
        if miou_classes not in MIOU_CLASSES:
            raise ValueError(
                f"segmentation metric: miou_classes must be one of {', '.join(map(repr, MIOU_CLASSES))}, "
                f"got {miou_classes!r}"
            )
        if not isinstance(skip_single_value, bool):
            raise ValueError(f"segmentation metric: skip_single_value must be True or False, got {skip_single_value!r}")
        self.class_names = list(class_names)
        self.miou_classes = miou_classes
        self.skip_single_value = skip_single_value
        self.reset()

    def reset(self) -> None:
        n = len(self.class_names)
        # rows: ground truth, columns: prediction
        self.confusion = torch.zeros(n, n, dtype=torch.float64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        check_same_shape(prediction, target, "segmentation metric")
        n = len(self.class_names)
        check_labels(target, n, "segmentation metric target")
        valid = target != IGNORE_INDEX
        if self.skip_single_value and target.numel():
            flat = target.flatten(1)
            first = flat[:, :1]
            single = (flat == first).all(1) & ((first[:, 0] == 0) | (first[:, 0] == IGNORE_INDEX))
            valid &= ~single[:, None, None]
        predicted = prediction[valid].long()
        if predicted.numel() and (predicted.min() < 0 or predicted.max() >= n):
            raise ValueError(f"segmentation metric: predicted labels must lie in [0, {n})")
        pairs = target[valid].long() * n + predicted
        self.confusion += to_accumulator(torch.bincount(pairs, minlength=n * n).view(n, n))

    def compute(self) -> dict[str, float]:
        total = self.confusion.sum()
        if total == 0:
            raise RuntimeError("segmentation metric: no valid pixels accumulated")
        hits = self.confusion.diagonal()
        union = self.confusion.sum(0) + self.confusion.sum(1) - hits
        iou = safe_divide(hits, union, float("nan")) * 100
        miou = iou[union > 0].mean() if self.miou_classes == "present" else torch.where(union > 0, iou, 0).mean()
        result = {
            "mIoU": float(miou),
            "pixel_acc": float(hits.sum() / total * 100),
        }
        result.update({f"IoU/{name}": float(value) for name, value in zip(self.class_names, iou, strict=True)})
        return result


class MajorityClassPredictor(TrivialPredictor):
    """Predicts everywhere the most frequent valid class of the training targets (lowest index on ties)."""

    def __init__(self, num_classes: int) -> None:
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def fit(self, target: Tensor) -> None:
        check_labels(target, self.counts.numel(), "majority-class predictor target")
        labels = target[target != IGNORE_INDEX].long()
        self.counts += to_accumulator(torch.bincount(labels, minlength=self.counts.numel()))

    def predict(self, target: Tensor) -> Tensor:
        if self.counts.sum() == 0:
            raise RuntimeError("majority-class predictor: fit() saw no valid pixel")
        majority = int(self.counts.argmax())
        return torch.full(target.shape, majority, dtype=torch.int64, device=target.device)


class SegmentationTask(Task):
    """A per-pixel classification task; subclasses set ``target_key`` and ``default_loss_weight``.

    The number of output channels is the number of classes the dataset declares for ``target_key``.

    Option ``label_smoothing`` (``loss.<name>.label_smoothing``, in [0, 1), default 0): the loss is the
    cross-entropy against a smoothed one-hot target, ``1 - label_smoothing`` on the true class and
    ``label_smoothing / (C - 1)`` on each other class (``smoothed_cross_entropy``); at 0 it is the plain
    masked cross-entropy.

    Transfer losses (a consistency term's transfer net into this task; the reference is an int64 class map,
    255 = ignore, either the label or this task's own argmax prediction): ``"cross"``, the smoothed
    cross-entropy of the transferred logits, and ``"kl"``, ``KL(smoothed one-hot of the reference ||
    softmax(transferred))`` (``smoothed_kl``), both with the task's ``label_smoothing``.

    Evaluation switches (``ConfusionMatrixMetric``): ``miou_classes``, the classes the mean IoU runs over, and
    ``skip_single_value``, whether an image whose target is all background or all ignore is skipped (never
    here and for semseg; the part tasks skip it under the survey, ASTMT and RCM protocols).
    """

    target_key: ClassVar[str]
    prediction_suffix = ".png"
    loss_kind = "classification"
    transfer_losses = ("cross", "kl")
    evaluation_switches = {
        "miou_classes": Switch(
            {"survey": "all", "astmt": "all", "rcm": "all", "project": "present"},
            MIOU_CLASSES,
            help="classes the mIoU averages: 'present' those in the ground truth or predicted, 'all' every class "
            "(an absent one counts 0)",
        ),
        "skip_single_value": Switch(
            {"survey": False, "astmt": False, "rcm": False, "project": False},
            (False, True),
            help="skip an image whose target is one single value, all background (0) or all ignore (255)",
        ),
    }

    def __init__(self, name: str, info: DatasetInfo, *, label_smoothing: float = 0.0) -> None:
        super().__init__(name, info)
        self.class_names = class_names_for(info, self.target_key, name)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float):
            raise ValueError(f"task {name!r}: label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"task {name!r}: label_smoothing must lie in [0, 1), got {label_smoothing}")
        if label_smoothing > 0 and len(self.class_names) < 2:
            raise ValueError(f"task {name!r}: label_smoothing needs at least 2 classes, the dataset declares 1")
        self.label_smoothing = float(label_smoothing)

    @property
    def out_channels(self) -> int:
        return len(self.class_names)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        check_map(output, self.out_channels, f"{self.name} loss output")
        check_map(target, None, f"{self.name} loss target")
        check_same_spatial(output, target, f"{self.name} loss")
        check_labels(target, self.out_channels, f"{self.name} loss target")
        if self.label_smoothing == 0:
            return masked_cross_entropy(output, target)
        return smoothed_cross_entropy(output, target, self.label_smoothing, IGNORE_INDEX)

    def transfer_loss(self, kind: str, transferred: Tensor, reference: Tensor) -> Tensor:
        """``"cross"`` or ``"kl"`` of the transferred logits against an int64 class map (255 = ignore)."""
        if kind not in self.transfer_losses:
            return super().transfer_loss(kind, transferred, reference)
        what = f"{self.name} transfer loss {kind!r}"
        check_map(transferred, self.out_channels, f"{what} transferred output")
        check_map(reference, None, f"{what} reference")
        check_same_spatial(transferred, reference, what)
        check_labels(reference, self.out_channels, f"{what} reference")
        loss = smoothed_cross_entropy if kind == "cross" else smoothed_kl
        return loss(transferred, reference.long(), self.label_smoothing, IGNORE_INDEX)

    def postprocess(self, output: Tensor) -> Tensor:
        check_map(output, self.out_channels, f"{self.name} postprocess")
        return output.argmax(1)

    def metric(self) -> ConfusionMatrixMetric:
        return ConfusionMatrixMetric(
            self.class_names,
            miou_classes=self.evaluation["miou_classes"],
            skip_single_value=self.evaluation["skip_single_value"],
        )

    def visualize(self, value: Tensor) -> Tensor:
        return colorize_labels(value)

    def trivial(self) -> MajorityClassPredictor:
        return MajorityClassPredictor(self.out_channels)


#: the evaluation switches of the part tasks (parts, human_parts): ``SegmentationTask``'s, with images whose
#: target is all background or all ignore skipped under the survey, ASTMT and RCM protocols
PART_EVALUATION_SWITCHES = {
    **SegmentationTask.evaluation_switches,
    "skip_single_value": Switch(
        {"survey": True, "astmt": True, "rcm": True, "project": False},
        (False, True),
        help=SegmentationTask.evaluation_switches["skip_single_value"].help,
    ),
}

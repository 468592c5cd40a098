"""Monocular depth: masked L1 (or MSE, log-L1, smooth L1) loss, the L1 and SSIM transfer losses of consistency
terms, set-level (or per-image, by evaluation switch) RMSE, MAE, SSIM and the usual relative/threshold metrics."""

from __future__ import annotations

import math
import statistics

import torch
from rcm_nddr.tasks.common import check_map, check_same_shape, check_same_spatial, check_single, to_accumulator
from torch import Tensor

from rcm_nddr.objectives.losses import masked_l1, masked_logl1, masked_mse, masked_smoothl1, masked_ssim_loss, ssim_map
from rcm_nddr.registry import TASKS
from rcm_nddr.task import DatasetInfo, Metric, Switch, Task, TrivialPredictor

#: predictions are clamped to this depth (metres) before logarithms and ratios in this project's protocol
#: (evaluation switch ``log_clamp``; the survey's, ASTMT's and RCM's code use 1e-9)
MIN_DEPTH = 1e-3
#: how ``rmse`` and ``log_rmse`` aggregate over the images (evaluation switch ``depth_rmse``)
DEPTH_RMSE_RULES = ("pooled", "per_image")
#: the depth losses by ``loss.depth.type`` (each a mean over the valid pixels)
DEPTH_LOSSES = {"l1": masked_l1, "mse": masked_mse, "logl1": masked_logl1, "smoothl1": masked_smoothl1}

# viridis sampled at 0, 1/8, ..., 1: a perceptually uniform map that is readable in greyscale too
_VIRIDIS_ANCHORS = torch.tensor(
    [
        [68, 1, 84],
        [71, 45, 123],
        [59, 82, 139],
        [44, 114, 142],
        [33, 145, 140],
        [40, 174, 128],
        [94, 201, 98],
        [173, 220, 48],
        [253, 231, 37],
    ],
    dtype=torch.float64,
)


def _interpolated_lut(anchors: Tensor, size: int = 256) -> Tensor:
    position = torch.linspace(0, len(anchors) - 1, size, dtype=torch.float64)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    frac = (position - low)[:, None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).round().to(torch.uint8)


DEPTH_LUT = _interpolated_lut(_VIRIDIS_ANCHORS)


def valid_depth(target: Tensor) -> Tensor:
    """Valid pixels: positive, finite depth (0 marks a missing measurement)."""
    return (target > 0) & torch.isfinite(target)


def colorize_depth(depth: Tensor) -> Tensor:
    """1 x H x W depth -> 3 x H x W uint8 through viridis (near dark, far bright).

    The range is normalized per image over the valid pixels; invalid pixels are black.
    """
    check_single(depth, 1, "depth visualization")
    depth = depth[0].detach().to("cpu", torch.float64)
    valid = valid_depth(depth)
    image = torch.zeros(3, *depth.shape, dtype=torch.uint8)
    if not valid.any():
        return image
    low, high = depth[valid].min(), depth[valid].max()
    scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
    index = (scaled.clamp(0, 1) * 255).round().long()
    image[:, valid] = DEPTH_LUT[index[valid]].T
    return image


class DepthMetric(Metric):
    """Depth errors over all valid pixels of the set (pixels pooled, not a mean of per-image values).

    ``rmse`` (primary, lower is better) = sqrt(sum (p - t)^2 / n); ``abs`` = sum |p - t| / n (metres);
    ``abs_rel`` = mean |p - t| / t; ``log_rmse`` = RMSE of natural logs; ``delta1/2/3`` = percent of pixels
    with max(p/t, t/p) below 1.25, 1.25^2, 1.25^3. Predictions are clamped to ``log_clamp`` metres
    (``MIN_DEPTH`` in this project's protocol, 1e-9 in the survey's, ASTMT's and RCM's code) for the log and
    ratio terms; with ``log_clamp`` 0 a zero prediction has an infinite log error.

    ``depth_rmse`` chooses how ``rmse`` and ``log_rmse`` aggregate: ``"pooled"`` (this project and the
    survey) as above, over all valid pixels of the set; ``"per_image"`` (ASTMT's and RCM's code) computes
    each image's RMSE and log RMSE over its own valid pixels, then ``rmse`` is the MEAN over the images of
    their RMSE and ``log_rmse`` the MEDIAN over the images of their log RMSE (the mean of the two middle
    values for an even count). Images without a valid pixel are skipped. Only the valid pixels (positive,
    finite target) are scored in both: the ASTMT/RCM code sets missing depths (0) to 1e-9 before it builds
    its validity mask, so it also scores the invalid pixels; that defect is not reproduced. The other keys
    are pooled under both rules. The per-image values are python lists in ``state``, so ``merge``
    concatenates them.

    ``ssim`` is the mean SSIM over the valid 3 x 3 windows of the set (windows pooled like pixels): the
    windows, constants and masking of ``ssim_map`` (the SSIM transfer loss's), on the prediction clamped at 0
    and the target, both set to 0 at invalid pixels; a window is valid when its centre pixel is. It is left
    out of the results when no valid window was seen (maps smaller than 3 x 3, or valid pixels only on the
    border).
    """

    primary = "rmse"
    higher_is_better = False
    state = ("sums", "image_rmse", "image_log_rmse")

    def __init__(self, depth_rmse: str = "pooled", log_clamp: float = MIN_DEPTH) -> None:
        if depth_rmse not in DEPTH_RMSE_RULES:
            raise ValueError(
                f"depth metric: depth_rmse must be one of {', '.join(map(repr, DEPTH_RMSE_RULES))}, got {depth_rmse!r}"
            )
        if (
            isinstance(log_clamp, bool)
            or not isinstance(log_clamp, int | float)
            or not math.isfinite(log_clamp)
            or log_clamp < 0
        ):
            raise ValueError(f"depth metric: log_clamp must be a number >= 0, got {log_clamp!r}")
        self.depth_rmse = depth_rmse
        self.log_clamp = float(log_clamp)
        self.reset()

    def reset(self) -> None:
        # n, sum sq err, sum abs rel, sum sq log err, count delta1, delta2, delta3, sum abs err,
        # sum of window SSIM, valid windows
        self.sums = torch.zeros(10, dtype=torch.float64)
        # per image with a valid pixel (depth_rmse "per_image" only): its RMSE and its log RMSE
        self.image_rmse: list[float] = []
        self.image_log_rmse: list[float] = []

    def update(self, prediction: Tensor, target: Tensor) -> None:
        check_same_shape(prediction, target, "depth metric")
        valid = valid_depth(target)
        truth = target[valid].double()
        predicted = prediction[valid].double()
        clamped = predicted.clamp_min(self.log_clamp)
        ratio = torch.maximum(clamped / truth, truth / clamped)
        ssim, windows = ssim_map(prediction.double().clamp_min(0), target.double(), valid)
        windows = windows.expand_as(ssim)
        batch = torch.stack(
            [
                torch.tensor(float(truth.numel()), dtype=torch.float64, device=truth.device),
                ((predicted - truth) ** 2).sum(),
                ((predicted - truth).abs() / truth).sum(),
                ((clamped.log() - truth.log()) ** 2).sum(),
                (ratio < 1.25).sum().double(),
                (ratio < 1.25**2).sum().double(),
                (ratio < 1.25**3).sum().double(),
                (predicted - truth).abs().sum(),
                torch.where(windows, ssim, 0).sum(),
                windows.sum().double(),
            ]
        )
        self.sums += to_accumulator(batch)
        if self.depth_rmse == "per_image":
            self._update_per_image(prediction, target, valid)

    def _update_per_image(self, prediction: Tensor, target: Tensor, valid: Tensor) -> None:
        """Append the RMSE and log RMSE of each image of the batch that has a valid pixel."""
        truth = torch.where(valid, target.double(), 1.0)
        predicted = torch.where(valid, prediction.double(), 1.0)
        clamped = predicted.clamp_min(self.log_clamp)
        count = valid.flatten(1).sum(1).double()
        sq = torch.where(valid, (predicted - truth) ** 2, 0).flatten(1).sum(1)
        sq_log = torch.where(valid, (clamped.log() - truth.log()) ** 2, 0).flatten(1).sum(1)
        keep = count > 0
        per_image = to_accumulator(torch.stack([sq[keep], sq_log[keep]]) / count[keep]).sqrt()
        self.image_rmse += per_image[0].tolist()
        self.image_log_rmse += per_image[1].tolist()

    def compute(self) -> dict[str, float]:
        n, sq, rel, sq_log, d1, d2, d3, absolute, ssim, windows = self.sums.tolist()
        if n == 0:
            raise RuntimeError("depth metric: no valid pixels accumulated")
        if self.depth_rmse == "per_image":
            rmse, log_rmse = statistics.fmean(self.image_rmse), statistics.median(self.image_log_rmse)
        else:
            rmse, log_rmse = (sq / n) ** 0.5, (sq_log / n) ** 0.5
        result = {
            "rmse": rmse,
            "abs": absolute / n,
            "abs_rel": rel / n,
            "log_rmse": log_rmse,
            "delta1": 100 * d1 / n,
            "delta2": 100 * d2 / n,
            "delta3": 100 * d3 / n,
        }
        if windows > 0:
            result["ssim"] = ssim / windows
        return result


class MeanDepthPredictor(TrivialPredictor):
    """Predicts the mean valid training depth everywhere."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def fit(self, target: Tensor) -> None:
        depth = target[valid_depth(target)].double()
        self.total += float(depth.sum())
        self.count += depth.numel()

    def predict(self, target: Tensor) -> Tensor:
        if self.count == 0:
            raise RuntimeError("mean-depth predictor: fit() saw no valid depth")
        return torch.full(target.shape, self.total / self.count, dtype=torch.float32, device=target.device)


@TASKS.register("depth")
class DepthTask(Task):
    """Depth in metres; target float 1 x H x W with 0 = invalid. Prediction: the raw output, >= 0.

    Option ``type`` (``loss.depth.type``): the loss over the valid pixels, ``"l1"`` (default, the mean
    absolute error), ``"mse"``, ``"logl1"`` (mean of log(1 + |p - t|)) or ``"smoothl1"`` (Huber, beta 1).

    Transfer losses (a consistency term's transfer net into depth; the reference is a depth map, the label
    or this task's own prediction, valid where it is positive and finite): ``"l1"``, the mean absolute error,
    and ``"ssim"``, the structural dissimilarity ``masked_ssim_loss``.

    Evaluation switches (``DepthMetric``): ``depth_rmse``, whether ``rmse`` and ``log_rmse`` pool the pixels
    of the set or aggregate per-image values, and ``log_clamp``, the depth predictions are clamped at before
    the log and ratio terms.
    """

    target_key = "depth"
    default_loss_weight = 1.0
    loss_kind = "regression"
    transfer_losses = ("l1", "ssim")
    evaluation_switches = {
        "depth_rmse": Switch(
            {"survey": "pooled", "astmt": "per_image", "rcm": "per_image", "project": "pooled"},
            DEPTH_RMSE_RULES,
            help="'pooled': rmse and log_rmse over all valid pixels of the set; 'per_image': rmse the mean of "
            "the images' RMSE, log_rmse the median of their log RMSE",
        ),
        "log_clamp": Switch(
            {"survey": 1e-9, "astmt": 1e-9, "rcm": 1e-9, "project": MIN_DEPTH},
            help="depth (metres) predictions are clamped at before the log and ratio terms",
        ),
    }

    # the option is named after its config key, loss.depth.type (the builtin is not needed here)
    def __init__(self, name: str, info: DatasetInfo, *, type: str = "l1") -> None:
        super().__init__(name, info)
        if type not in DEPTH_LOSSES:
            raise ValueError(f"task {name!r}: type must be one of {', '.join(map(repr, DEPTH_LOSSES))}, got {type!r}")
        self.loss_type = type

    @property
    def out_channels(self) -> int:
        return 1

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The ``type`` loss (default: mean absolute error) over valid pixels (0 when there is none)."""
        check_map(output, 1, f"{self.name} loss output")
        check_map(target, 1, f"{self.name} loss target")
        check_same_spatial(output, target, f"{self.name} loss")
        return DEPTH_LOSSES[self.loss_type](output, target, valid_depth(target))

    def transfer_loss(self, kind: str, transferred: Tensor, reference: Tensor) -> Tensor:
        """``"l1"`` or ``"ssim"`` of the transferred depth against a reference depth map (0 = invalid)."""
        if kind not in self.transfer_losses:
            return super().transfer_loss(kind, transferred, reference)
        what = f"{self.name} transfer loss {kind!r}"
        check_map(transferred, 1, f"{what} transferred output")
        check_map(reference, 1, f"{what} reference")
        check_same_spatial(transferred, reference, what)
        loss = masked_l1 if kind == "l1" else masked_ssim_loss
        return loss(transferred, reference, valid_depth(reference))

    def postprocess(self, output: Tensor) -> Tensor:
        check_map(output, 1, f"{self.name} postprocess")
        return output.float().clamp_min(0)

    def metric(self) -> DepthMetric:
        return DepthMetric(depth_rmse=self.evaluation["depth_rmse"], log_clamp=self.evaluation["log_clamp"])

    def visualize(self, value: Tensor) -> Tensor:
        return colorize_depth(value)

    def trivial(self) -> MeanDepthPredictor:
        return MeanDepthPredictor()

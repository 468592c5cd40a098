"""Surface normals: L1 on the L2-normalized output (also the L1 transfer loss of consistency terms), angular
error metrics in degrees."""

from __future__ import annotations

import math

import torch
from rcm_nddr.tasks.common import check_map, check_same_spatial, check_single, to_accumulator
from torch import Tensor

from rcm_nddr.objectives.losses import masked_l1
from rcm_nddr.registry import TASKS
from rcm_nddr.task import Metric, Task, TrivialPredictor

#: width of the angle histogram bins the median is read from (degrees)
MEDIAN_BIN_DEG = 0.01
_N_BINS = round(180 / MEDIAN_BIN_DEG)
_THRESHOLDS_DEG = (11.25, 22.5, 30.0)


def valid_normals(target: Tensor) -> Tensor:
    """B x 3 x H x W -> B x H x W mask of pixels with a non-zero normal (the zero vector is invalid)."""
    squared_norm = target.square().sum(1)
    return (squared_norm > 0) & torch.isfinite(squared_norm)


def unit_normals(values: Tensor) -> Tensor:
    """L2-normalize B x 3 x H x W along channels (zero vectors stay zero, with a zero gradient)."""
    # summing squares over dim 1 is several times faster on CPU than F.normalize's strided norm;
    # clamping before the sqrt keeps its gradient finite at zero vectors
    return values / values.square().sum(1, keepdim=True).clamp_min(1e-24).sqrt()


def angle_degrees(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angles in degrees (B x H x W) between two B x 3 x H x W maps, whatever their lengths.

    A zero prediction has no direction; it counts as 90 degrees off rather than as a perfect match.
    """
    px, py, pz = prediction.float().unbind(1)
    tx, ty, tz = target.float().unbind(1)
    cross = ((py * tz - pz * ty).square() + (pz * tx - px * tz).square() + (px * ty - py * tx).square()).sqrt()
    dot = px * tx + py * ty + pz * tz
    # atan2(|p x t|, p . t) needs no renormalization and stays accurate (~1e-5 degrees in float32)
    # near 0 and 180 degrees, where acos of the dot product loses digits
    angles = torch.rad2deg(torch.atan2(cross, dot))
    return angles.masked_fill((px == 0) & (py == 0) & (pz == 0), 90.0)


class NormalsMetric(Metric):
    """Angular error in degrees between the renormalized prediction and the target, over valid pixels.

    ``mean`` (primary, lower is better), ``rmse``, ``median`` and the percent of pixels with an error
    below ``11.25``, ``22.5`` and ``30`` degrees. Mean and RMSE are exact sums; the median is read
    from a histogram of ``MEDIAN_BIN_DEG`` = 0.01 degree bins (bin centres, so it is exact to within
    0.005 degrees; an even count averages the two middle values as usual). Memory is O(bins), not
    O(pixels).
    """

    primary = "mean"
    higher_is_better = False
    state = ("histogram", "sums")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.histogram = torch.zeros(_N_BINS, dtype=torch.float64)
        # n, sum angle, sum angle^2, counts below each threshold
        self.sums = torch.zeros(3 + len(_THRESHOLDS_DEG), dtype=torch.float64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        check_map(prediction, 3, "normals metric prediction")
        check_map(target, 3, "normals metric target")
        check_same_spatial(prediction, target, "normals metric")
        valid = valid_normals(target)
        angles = angle_degrees(prediction, target)[valid].double()
        bins = (angles / MEDIAN_BIN_DEG).long().clamp(0, _N_BINS - 1)
        self.histogram += to_accumulator(torch.bincount(bins, minlength=_N_BINS))
        below = [(angles < threshold).sum().double() for threshold in _THRESHOLDS_DEG]
        stats = [angles.new_tensor(float(angles.numel())), angles.sum(), (angles**2).sum(), *below]
        self.sums += to_accumulator(torch.stack(stats))

    def _median(self, n: int) -> float:
        cumulative = self.histogram.cumsum(0)
        # 0-based ranks of the middle value(s); the k-th value lies in the first bin whose cumsum > k
        ranks = torch.tensor([(n - 1) // 2, n // 2], dtype=torch.float64)
        bins = torch.searchsorted(cumulative, ranks, right=True)
        return float(((bins.double() + 0.5) * MEDIAN_BIN_DEG).mean())

    def compute(self) -> dict[str, float]:
        n, total, total_sq, *below = self.sums.tolist()
        if n == 0:
            raise RuntimeError("normals metric: no valid pixels accumulated")
        result = {"mean": total / n, "median": self._median(int(n)), "rmse": math.sqrt(total_sq / n)}
        for threshold, count in zip(_THRESHOLDS_DEG, below, strict=True):
            result[f"{threshold:g}"] = 100 * count / n
        return result


class MeanNormalPredictor(TrivialPredictor):
    """Predicts the normalized mean of the valid training normals everywhere."""

    def __init__(self) -> None:
        self.total = torch.zeros(3, dtype=torch.float64)

    def fit(self, target: Tensor) -> None:
        check_map(target, 3, "mean-normal predictor target")
        self.total += to_accumulator(target.movedim(1, -1)[valid_normals(target)].double().sum(0))

    def predict(self, target: Tensor) -> Tensor:
        norm = self.total.norm()
        if norm == 0:
            raise RuntimeError("mean-normal predictor: fit() saw no valid normal (or they cancel out)")
        mean = (self.total / norm).to(device=target.device, dtype=torch.float32)
        return mean.view(1, 3, 1, 1).expand(target.shape[0], 3, *target.shape[-2:]).contiguous()


@TASKS.register("normals")
class NormalsTask(Task):
    """Unit normals, target float 3 x H x W with the zero vector = invalid. Prediction: L2-normalized.

    Transfer loss (a consistency term's transfer net into normals): ``"l1"``, the L1 between the
    L2-normalized transferred output and the reference unit vectors (the label or this task's own
    prediction), averaged over the components of the pixels where the reference is not the zero vector.
    """

    target_key = "normals"
    default_loss_weight = 10.0
    loss_kind = "regression"
    transfer_losses = ("l1",)

    @property
    def out_channels(self) -> int:
        return 3

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """L1 between the normalized output and the target, averaged over the components of valid pixels."""
        check_map(output, 3, f"{self.name} loss output")
        check_map(target, 3, f"{self.name} loss target")
        check_same_spatial(output, target, f"{self.name} loss")
        valid = valid_normals(target).unsqueeze(1)
        # masked, not indexed: no data-dependent shapes, so the step never waits for the device
        error = (unit_normals(output.float()) - torch.where(valid, target, 0)).abs()
        return torch.where(valid, error, 0).sum() / (3 * valid.sum()).clamp_min(1)

    def transfer_loss(self, kind: str, transferred: Tensor, reference: Tensor) -> Tensor:
        """``"l1"`` of the normalized transferred output against reference unit normals (0-vector = invalid)."""
        if kind not in self.transfer_losses:
            return super().transfer_loss(kind, transferred, reference)
        what = f"{self.name} transfer loss {kind!r}"
        check_map(transferred, 3, f"{what} transferred output")
        check_map(reference, 3, f"{what} reference")
        check_same_spatial(transferred, reference, what)
        valid = valid_normals(reference).unsqueeze(1)
        return masked_l1(unit_normals(transferred.float()), reference, valid)

    def postprocess(self, output: Tensor) -> Tensor:
        check_map(output, 3, f"{self.name} postprocess")
        return unit_normals(output.float())

    def metric(self) -> NormalsMetric:
        return NormalsMetric()

    def visualize(self, value: Tensor) -> Tensor:
        """(n + 1) / 2 * 255 per component; invalid (zero) normals are black."""
        check_single(value, 3, "normals visualization")
        value = value.detach().to("cpu", torch.float64)
        image = ((value + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
        image[:, ~valid_normals(value[None])[0]] = 0
        return image

    def trivial(self) -> MeanNormalPredictor:
        return MeanNormalPredictor()

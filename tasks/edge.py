"""Edge detection: class-balanced BCE, and ODS/OIS boundary F-measures with a distance tolerance."""

from __future__ import annotations

import math

import numpy as np
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
from rcm_nddr.tasks.edge_matching import bipartite_counts
from rcm_nddr.tasks.edge_nms import edge_nms
from torch import Tensor

from rcm_nddr.registry import TASKS
from rcm_nddr.task import PROTOCOLS, DatasetInfo, Metric, Switch

#: binarization thresholds of the F-measure curves: 0.01, 0.02, ..., 0.99
EDGE_THRESHOLDS = torch.linspace(0.01, 0.99, 99)
#: how predicted edge pixels are matched to the ground truth, see ``EdgeMetric``
EDGE_MATCHINGS = ("bipartite", "distance")
#: matching tolerance (fraction of the image diagonal) when neither the config nor the dataset gives one
DEFAULT_MAX_DIST = 0.011
#: which threshold an image's OIS takes among those with its best F, see ``EdgeMetric``
EDGE_OIS_TIES = ("last", "first")


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

    Options: ``max_dist`` (0.011) is the matching tolerance as a fraction of the image diagonal: a
    predicted and a ground-truth edge pixel can match when their Euclidean distance is <= ``radius =
    max_dist * sqrt(H^2 + W^2)`` pixels, H x W being the evaluated (target) map. ``matching`` selects
    how predictions are counted at each threshold:

    ``"bipartite"`` (default), the boundary-benchmark protocol (BSDS ``correspondPixels`` as run by
    SEISM, which the ASTMT/RCM papers use for odsF on NYUD and PASCAL), per image and threshold t:

    1. ignored pixels (target 255) are set to non-edge in the prediction, and the prediction is
       binarized: a valid pixel is an edge when its probability is >= t;
    2. the binary map is thinned to one-pixel-wide lines (``edge_matching.thin``, Guo & Hall's
       two-sub-iteration algorithm: the one MATLAB's ``bwmorph(E, 'thin', Inf)`` and
       ``skimage.morphology.thin`` implement, with the same output as the latter);
    3. thinned pixels are matched one to one to ground-truth edge pixels within ``radius`` by a
       maximum-cardinality bipartite matching (``edge_matching.maximum_matching_size``: a unit-capacity
       maximum flow, Dinic's algorithm in ``scipy.sparse.csgraph.maximum_flow``);
    4. P = matches / thinned pixels, R = matches / ground-truth pixels.

    ``"distance"``, a faster approximation for validation during long runs: no thinning, and a
    predicted pixel is a true positive when any ground-truth pixel lies within ``radius`` (a
    ground-truth pixel is recalled when any predicted pixel does), so several predictions may match
    the same ground-truth pixel and thick predictions are not penalized within the tolerance.

    In both, the thresholds are the 99 ``EDGE_THRESHOLDS`` (0.01 ... 0.99); ignored pixels are neither
    predictions nor ground truth, and masking them before thinning means they never shape the thinned
    lines (a thick prediction crossing into an ignored region is thinned within its valid part); an
    image without any valid pixel is skipped; P and R are 0 where their denominator is 0, as in the
    BSDS code. ODS: the counts of each threshold are summed over the set, F = 2PR / (P + R) per
    threshold, and the best is reported. OIS: each image picks the threshold with its best F, those
    counts are summed over the set, and F is computed from the sums. ``ois_ties`` says which threshold
    an image picks among equal best F: ``"last"`` (default) the highest one, so that an image without
    ground-truth edges (F = 0 at every threshold) picks the fewest false positives, or ``"first"`` the
    lowest one, as SEISM does (MATLAB's ``max`` returns the first maximum over increasing thresholds).

    ``nms`` (default False): before thresholding, each predicted map goes through the structured edge
    toolbox's non-maximum suppression (``edge_nms.edge_nms``: r = 1, s = 5, m = 1.01, orientation from
    a triangle filter of radius 4), as SEISM's contour reader does. It is applied to the bounding box of
    the image's valid pixels, so that an image padded at the bottom and right to a common size (the
    validation transform pads the target with 255) is suppressed, smoothed and damped at its own border
    as SEISM sees it; pixels outside the box are ignored anyway. The ignored pixels inside the box keep
    their predicted values through the suppression and are masked afterwards, as without it.

    Where ``"bipartite"`` differs from SEISM/BSDS: BSDS solves a min-cost assignment with outlier
    nodes whose cost (100 x the tolerance) makes leaving a pixel unmatched dearer than any match, so
    its solution is in practice a maximum matching, the one of least total distance; this code finds a
    maximum matching without that distance tie-breaking, which only changes which pairs match, not how
    many (the counts are equal whenever the BSDS assignment is maximum). The thinning is this code's
    implementation of the published algorithm MATLAB's ``bwmorph`` documents, checked against
    scikit-image, not MATLAB itself. The best F is taken over the discrete thresholds without the BSDS
    interpolation between them. SEISM reads each prediction from an 8-bit PNG (values k / 255) and
    keeps the pixels strictly above the threshold; this code takes the float prediction and >= t. Each
    image has a single ground truth (NYUD and PASCAL do), so matched predictions and matched
    ground-truth pixels are the same count. The ground truth is used as given, not thinned: the
    datasets thin it when loading, where the reference pipeline does.
    """

    primary = "odsF"
    higher_is_better = True
    state = ("ods", "gt_pixels", "ois", "images")

    def __init__(
        self,
        max_dist: float = DEFAULT_MAX_DIST,
        matching: str = "bipartite",
        *,
        ois_ties: str = "last",
        nms: bool = False,
    ) -> None:
        if not max_dist >= 0:
            raise ValueError(f"edge metric: max_dist must be >= 0 (a fraction of the diagonal), got {max_dist}")
        if matching not in EDGE_MATCHINGS:
            raise ValueError(
                f"edge metric: matching must be one of {', '.join(map(repr, EDGE_MATCHINGS))}, got {matching!r}"
            )
        if ois_ties not in EDGE_OIS_TIES:
            raise ValueError(
                f"edge metric: ois_ties must be one of {', '.join(map(repr, EDGE_OIS_TIES))}, got {ois_ties!r}"
            )
        self.max_dist = max_dist
        self.matching = matching
        self.ois_ties = ois_ties
        self.nms = bool(nms)
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
        if self.nms:
            scores = torch.stack([suppress_in_valid_box(s, v) for s, v in zip(scores, valid, strict=True)])
        counts = _distance_counts if self.matching == "distance" else _bipartite_counts
        matched, predicted, recalled = counts(scores, valid, truth, radius)
        gt_pixels = truth.flatten(1).sum(1).double()[:, None].expand_as(recalled)

        self.ods += to_accumulator(torch.stack([matched.sum(0), predicted.sum(0), recalled.sum(0)]))
        self.gt_pixels += float(gt_pixels[:, 0].sum())
        f = _f_measure(safe_divide(matched, predicted, 0.0), safe_divide(recalled, gt_pixels, 0.0))
        if self.ois_ties == "first":
            best = f.argmax(1, keepdim=True)  # the first maximum
        else:
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


def suppress_in_valid_box(scores: Tensor, valid: Tensor) -> Tensor:
    """``edge_nms`` of the H x W ``scores`` within the bounding box of the ``valid`` pixels (at least one);
    0 outside the box."""
    rows = valid.any(1).nonzero()[:, 0]
    columns = valid.any(0).nonzero()[:, 0]
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    result = torch.zeros_like(scores, dtype=torch.float32)
    result[top:bottom, left:right] = edge_nms(scores[top:bottom, left:right])
    return result


def _distance_counts(scores: Tensor, valid: Tensor, truth: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """B x K matched predictions, predictions and recalled ground truth of ``"distance"`` matching."""
    near_truth = disk_max(truth.float(), radius) > 0
    # a ground-truth pixel is recalled at threshold t iff the best valid score within reach is >= t
    best_near = disk_max(scores.masked_fill(~valid, -math.inf), radius)
    k = EDGE_THRESHOLDS.numel()
    buckets = threshold_buckets(scores.flatten(1), EDGE_THRESHOLDS)
    matched = counts_at_thresholds(buckets, (valid & near_truth).flatten(1), k).double()
    predicted = counts_at_thresholds(buckets, valid.flatten(1), k).double()
    best_buckets = threshold_buckets(best_near.flatten(1), EDGE_THRESHOLDS)
    recalled = counts_at_thresholds(best_buckets, truth.flatten(1), k).double()
    return matched, predicted, recalled


def _bipartite_counts(scores: Tensor, valid: Tensor, truth: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """B x K matched predictions, predictions and recalled ground truth of ``"bipartite"`` matching,
    one image at a time on the CPU."""
    thresholds = EDGE_THRESHOLDS.numpy()
    scores, valid, truth = (x.detach().cpu().numpy() for x in (scores, valid, truth))
    per_image = [bipartite_counts(s, v, t, thresholds, radius) for s, v, t in zip(scores, valid, truth, strict=True)]
    matched = torch.from_numpy(np.stack([m for m, _ in per_image])).double()
    predicted = torch.from_numpy(np.stack([p for _, p in per_image])).double()
    return matched, predicted, matched.clone()


@TASKS.register("edge")
class EdgeTask(BinaryMapTask):
    """Edges; target float 1 x H x W in {0, 1}, 255 = ignore. Prediction: sigmoid probabilities.

    Options: ``pos_weight`` (0.95) weights the BCE of edge pixels, 1 - ``pos_weight`` the others;
    ``max_dist`` is the metric's matching tolerance as a fraction of the image diagonal, by default the
    dataset's ``extra["edge_max_dist"]``, else 0.011 (the benchmark's NYUD value; PASCAL uses 0.0075);
    ``matching`` is the metric's ``"bipartite"`` (default, the benchmark protocol) or ``"distance"``
    (faster, for validation during training), see ``EdgeMetric``.

    Evaluation switches (``evaluation_switches``, set by ``configure_evaluation``): ``ois_ties``,
    ``edge_nms`` and ``max_dist`` set the metric (``max_dist``, when not None, wins over the option);
    ``pascal_edge_gt`` is read by the PASCAL-MT dataset, which makes the validation edge target with it
    (the engine hands every task's switches to a dataset that takes ``evaluation``).
    """

    target_key = "edge"
    default_loss_weight = 50.0
    evaluation_switches = {
        "ois_ties": Switch(
            {"survey": "first", "astmt": "first", "rcm": "first", "project": "last"},
            EDGE_OIS_TIES,
            help="which threshold an image's OIS takes among equal best F: the highest ('last': an image "
            "without ground-truth edges picks the fewest false positives) or the lowest ('first', SEISM)",
        ),
        "edge_nms": Switch(
            {"survey": True, "astmt": True, "rcm": True, "project": False},
            (False, True),
            help="non-maximum suppression of the predicted map before thresholding (the structured edge "
            "toolbox's, r = 1, s = 5, m = 1.01, as SEISM's reader applies it)",
        ),
        "pascal_edge_gt": Switch(
            {"survey": "seg2bmap", "astmt": "seg2bmap", "rcm": "seg2bmap", "project": "laplacian"},
            ("laplacian", "seg2bmap"),
            help="PASCAL-MT validation edges from the label map: thinned non-zero 4-neighbour Laplacian "
            "('laplacian') or thinned BSDS seg2bmap boundaries ('seg2bmap', SEISM); applied by the dataset",
        ),
        "max_dist": Switch(
            dict.fromkeys(PROTOCOLS),
            help="matching tolerance, a fraction of the image diagonal; None: the option max_dist, else the "
            "dataset's edge_max_dist, else 0.011",
        ),
    }

    def __init__(
        self,
        name: str,
        info: DatasetInfo,
        *,
        pos_weight: float = 0.95,
        max_dist: float | None = None,
        matching: str = "bipartite",
    ) -> None:
        super().__init__(name, info)
        if not 0 <= pos_weight <= 1:
            raise ValueError(f"task {name!r}: pos_weight must lie in [0, 1], got {pos_weight}")
        if max_dist is None:
            max_dist = info.extra.get("edge_max_dist", DEFAULT_MAX_DIST)
        if not isinstance(max_dist, int | float) or not max_dist >= 0:
            raise ValueError(f"task {name!r}: max_dist must be >= 0 (a fraction of the diagonal), got {max_dist!r}")
        if matching not in EDGE_MATCHINGS:
            raise ValueError(
                f"task {name!r}: matching must be one of {', '.join(map(repr, EDGE_MATCHINGS))}, got {matching!r}"
            )
        self.pos_weight = float(pos_weight)
        self.max_dist = float(max_dist)
        self.matching = matching

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Class-balanced BCE on logits, averaged over non-ignored pixels."""
        self._check_loss_inputs(output, target)
        return masked_bce_with_logits(output, target, self.pos_weight)

    def metric(self) -> EdgeMetric:
        """The metric following ``self.evaluation`` (a ``max_dist`` switch of None: the task's tolerance)."""
        switches = self.evaluation
        max_dist = switches.get("max_dist")
        return EdgeMetric(
            self.max_dist if max_dist is None else float(max_dist),
            self.matching,
            ois_ties=switches.get("ois_ties", "last"),
            nms=switches.get("edge_nms", False),
        )

"""The edge task's evaluation switches (ois_ties, edge_nms, pascal_edge_gt, max_dist): presets per protocol,
validation, and for each switch a hand-computed case where the two conventions differ; the structured
edge toolbox's NMS against a per-pixel loop reference; PASCAL-MT making either edge ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.io
import torch
from rcm_nddr.tasks.edge import EdgeMetric, EdgeTask
from rcm_nddr.tasks.edge_nms import edge_nms, edge_orientation
from skimage.morphology import thin
from test_pascal import H, W, write_sample, write_split

from rcm_nddr import tasks  # noqa: F401 - registers the built-in task types
from rcm_nddr.data.pascal import PASCAL_EDGE_GT, PascalMT, label_map_boundaries, label_map_edges, seg2bmap
from rcm_nddr.errors import ConfigError
from rcm_nddr.task import PROTOCOLS, DatasetInfo

SEISM = {"ois_ties": "first", "edge_nms": True, "pascal_edge_gt": "seg2bmap", "max_dist": None}
PROJECT = {"ois_ties": "last", "edge_nms": False, "pascal_edge_gt": "laplacian", "max_dist": None}


def edge_task(**options) -> EdgeTask:
    return EdgeTask("edge", DatasetInfo("toy", extra={"edge_max_dist": 0.0075}), **options)


def scores(task: EdgeTask, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    metric = task.metric()
    metric.update(prediction, target)
    return metric.compute()


# ---------------------------------------------------------------------------------------------------
# presets and validation


def test_protocol_switches_of_every_protocol():
    assert EdgeTask.protocol_switches("survey") == SEISM
    assert EdgeTask.protocol_switches("astmt") == SEISM
    assert EdgeTask.protocol_switches("rcm") == SEISM
    assert EdgeTask.protocol_switches("project") == PROJECT
    assert set(PROTOCOLS) == {"survey", "astmt", "rcm", "project"}
    assert all(switch.help for switch in EdgeTask.evaluation_switches.values())
    assert EdgeTask.evaluation_switches["pascal_edge_gt"].choices == PASCAL_EDGE_GT


def test_project_protocol_is_todays_metric():
    task = edge_task()
    assert task.evaluation == PROJECT
    metric = task.metric()
    assert (metric.max_dist, metric.matching, metric.ois_ties, metric.nms) == (0.0075, "bipartite", "last", False)


def test_configure_evaluation_follows_the_protocol_and_overrides():
    task = edge_task(matching="distance")
    assert task.configure_evaluation("astmt") == SEISM
    metric = task.metric()
    assert (metric.max_dist, metric.matching, metric.ois_ties, metric.nms) == (0.0075, "distance", "first", True)
    switches = task.configure_evaluation("rcm", {"edge_nms": False, "max_dist": 0, "ois_ties": "last"})
    assert switches == {**SEISM, "edge_nms": False, "max_dist": 0.0, "ois_ties": "last"}
    metric = task.metric()
    assert (metric.max_dist, metric.ois_ties, metric.nms) == (0.0, "last", False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ois_ties", "middle", "'middle'"),
        ("edge_nms", 1, "got 1"),
        ("edge_nms", "yes", "'yes'"),
        ("pascal_edge_gt", "sobel", "'sobel'"),
        ("max_dist", -0.1, "-0.1"),
        ("max_dist", "far", "'far'"),
        ("max_dist", True, "True"),
        ("nms", True, "no evaluation switch 'nms'"),
    ],
)
def test_configure_evaluation_rejects_a_bad_value(key, value, message):
    task = edge_task()
    with pytest.raises(ValueError, match=message):
        task.configure_evaluation("survey", {key: value})
    assert task.evaluation == PROJECT  # unchanged


def test_metric_rejects_an_unknown_tie_rule():
    with pytest.raises(ValueError, match="ois_ties must be one of 'last', 'first', got 'middle'"):
        EdgeMetric(ois_ties="middle")


# ---------------------------------------------------------------------------------------------------
# ois_ties


@pytest.mark.parametrize("matching", ["bipartite", "distance"])
def test_ois_ties_with_an_image_without_ground_truth_edges(matching):
    # image A: one edge pixel, predicted at 0.855 -> F = 1 at every threshold <= 0.855 (P = R = 1);
    # image B: no edge, one pixel predicted at 0.355 -> F = 0 at every threshold (R = 0 / 0 := 0)
    target = torch.zeros(2, 1, 5, 5)
    target[0, 0, 2, 2] = 1
    prediction = torch.zeros(2, 1, 5, 5)
    prediction[0, 0, 2, 2] = 0.855
    prediction[1, 0, 1, 3] = 0.355
    # ODS: t <= 0.355: matched 1, predicted 2, gt 1 -> F = 2 * 0.5 * 1 / 1.5 = 2/3; 0.355 < t <= 0.855:
    # P = R = 1 -> F = 1: odsF = 100 under both rules
    # OIS "last": A takes t = 0.85 (1 of 1 matched), B takes t = 0.99 (nothing predicted): P = R = 1 -> 100
    # OIS "first": A and B take t = 0.01: matched 1, predicted 1 + 1, gt 1 -> P = 1/2, R = 1 -> F = 2/3
    last, first = edge_task(max_dist=0.0, matching=matching), edge_task(max_dist=0.0, matching=matching)
    first.configure_evaluation("project", {"ois_ties": "first"})
    assert scores(last, prediction, target) == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    assert scores(first, prediction, target) == pytest.approx({"odsF": 100.0, "oisF": 100 * 2 / 3})


# ---------------------------------------------------------------------------------------------------
# edge_nms in the metric

# the ramp of a 12-pixel side with s = min(5, 12 // 2, 12 // 2) = 5: i / 5 from each end, 1 inside
RAMP_12 = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0]


def thick_vertical_ridge() -> tuple[torch.Tensor, torch.Tensor]:
    """A 12 x 12 image: ground truth column 6; predicted 0.55, 0.9, 0.55 on columns 5, 6, 7."""
    target = torch.zeros(1, 1, 12, 12)
    target[..., 6] = 1
    prediction = torch.zeros(1, 1, 12, 12)
    prediction[..., 5], prediction[..., 6], prediction[..., 7] = 0.55, 0.9, 0.55
    return prediction, target


@pytest.mark.parametrize("matching", ["bipartite", "distance"])
def test_nms_thins_a_thick_response_and_changes_ods(matching):
    prediction, target = thick_vertical_ridge()
    plain, nms = edge_task(max_dist=0.0, matching=matching), edge_task(max_dist=0.0, matching=matching)
    nms.configure_evaluation("project", {"edge_nms": True})
    # without NMS, 0.55 < t <= 0.9 keeps exactly column 6: P = R = 1
    assert scores(plain, prediction, target) == pytest.approx({"odsF": 100.0, "oisF": 100.0})
    # with NMS: the map is constant down each column, so the orientation is 0 (normal along x); the
    # 0.55 columns are suppressed (0.55 * 1.01 < 0.9), column 6 is kept (0.9 * 1.01 > 0.55) and ramped
    # to 0.9 * RAMP_12 down the rows (its own column factor is 1). At t = 0.01: rows 1..10 predicted and
    # matched, 12 ground-truth pixels: P = 1, R = 10/12 -> F = 2 * (10/12) / (22/12) = 10/11
    assert scores(nms, prediction, target) == pytest.approx({"odsF": 100 * 10 / 11, "oisF": 100 * 10 / 11})


@pytest.mark.parametrize("matching", ["bipartite", "distance"])
def test_nms_keeps_ignored_pixels_masked(matching):
    prediction, target = thick_vertical_ridge()
    target[0, 0, 5:7, 6] = 255  # the two undamped ridge pixels are ignored (the valid box is unchanged)
    task = edge_task(max_dist=0.0, matching=matching)
    task.configure_evaluation("survey", {"max_dist": None})
    # t = 0.01: predicted rows 1..4 and 7..10 (8 pixels, all matched), ground truth rows 0..4 and 7..11
    # (10 pixels): P = 1, R = 8/10 -> F = 1.6 / 1.8 = 8/9; "first" or "last", one image takes its best
    assert scores(task, prediction, target) == pytest.approx({"odsF": 100 * 8 / 9, "oisF": 100 * 8 / 9})


@pytest.mark.parametrize("matching", ["bipartite", "distance"])
def test_nms_of_a_padded_image_is_that_of_the_image(matching):
    prediction, target = thick_vertical_ridge()
    # padded at the bottom and right as the validation transform does, the padding predicted high
    padded_prediction = torch.full((1, 1, 16, 20), 0.7)
    padded_prediction[..., :12, :12] = prediction
    padded_target = torch.full((1, 1, 16, 20), 255.0)
    padded_target[..., :12, :12] = target
    task = edge_task(max_dist=0.0, matching=matching)
    task.configure_evaluation("project", {"edge_nms": True})
    assert scores(task, padded_prediction, padded_target) == pytest.approx(
        {"odsF": 100 * 10 / 11, "oisF": 100 * 10 / 11}
    )


# ---------------------------------------------------------------------------------------------------
# edge_nms: hand-checked maps


def test_nms_thins_a_three_pixel_wide_ridge_to_one():
    edges = torch.zeros(12, 12)
    edges[:, 5], edges[:, 6], edges[:, 7] = 0.5, 1.0, 0.5
    expected = torch.zeros(12, 12)
    expected[:, 6] = torch.tensor(RAMP_12)
    assert torch.allclose(edge_nms(edges), expected, atol=1e-6)


def test_nms_thins_a_diagonal_ridge():
    n = 16
    edges = torch.zeros(n, n)
    index = torch.arange(n)
    edges[index, index] = 1.0
    edges[index[:-1], index[:-1] + 1] = 0.5
    edges[index[:-1] + 1, index[:-1]] = 0.5
    ramp = torch.tensor([min(i, n - 1 - i, 5) / 5 for i in range(n)])  # s = min(5, 8, 8) = 5
    expected = torch.diag(ramp * ramp)  # the row and the column ramp of each diagonal pixel
    assert torch.allclose(edge_nms(edges), expected, atol=1e-6)


def test_nms_border_ramp_of_a_constant_map():
    # equal neighbours are never above 1.01 times a pixel: nothing is suppressed; s = min(5, 12 // 2,
    # 8 // 2) = 4, so the rows ramp by 0, 1/4, 2/4, 3/4 from each end and the columns likewise
    rows = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.75, 0.5, 0.25, 0.0])
    columns = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    result = edge_nms(torch.full((8, 12), 0.8))
    assert torch.allclose(result, 0.8 * rows[:, None] * columns[None, :], atol=1e-6)
    assert result[3, 4] == pytest.approx(0.8 * 0.75 * 1.0) and result[1, 1] == pytest.approx(0.8 / 16)


def test_nms_keeps_a_perfectly_horizontal_ridge_as_the_toolbox_does():
    # constant along each row: Sxy = 0 exactly, sign(0) = 0, so the orientation is 0 and the
    # neighbours compared lie along the ridge: nothing is suppressed, the map is only ramped
    edges = torch.zeros(12, 12)
    edges[5], edges[6], edges[7] = 0.5, 1.0, 0.5
    ramp = torch.tensor(RAMP_12)
    assert torch.all(edge_orientation(edges) == 0)
    assert torch.allclose(edge_nms(edges), edges * ramp[:, None] * ramp[None, :], atol=1e-6)


def test_nms_of_degenerate_maps():
    assert torch.equal(edge_nms(torch.zeros(6, 7)), torch.zeros(6, 7))
    row = torch.rand(1, 9)
    assert torch.equal(edge_nms(row), row)  # fewer than two rows: unchanged
    with pytest.raises(ValueError, match="2-D"):
        edge_nms(torch.zeros(1, 4, 4))


# ---------------------------------------------------------------------------------------------------
# edge_nms against a per-pixel loop reference


def _mirror(i: int, n: int) -> int:
    """Symmetric border: reflect (edge pixel repeated) until inside."""
    while i < 0 or i >= n:
        i = -1 - i if i < 0 else 2 * n - 1 - i
    return i


def _triangle_smooth(image: np.ndarray, r: int) -> np.ndarray:
    h, w = image.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            total = 0.0
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    weight = (r + 1 - abs(dy)) * (r + 1 - abs(dx)) / (r + 1) ** 4
                    total += weight * image[_mirror(y + dy, h), _mirror(x + dx, w)]
            out[y, x] = total
    return out


def _d_dx(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            if x == 0:
                out[y, x] = a[y, 1] - a[y, 0]
            elif x == w - 1:
                out[y, x] = a[y, w - 1] - a[y, w - 2]
            else:
                out[y, x] = (a[y, x + 1] - a[y, x - 1]) / 2
    return out


def _d_dy(a: np.ndarray) -> np.ndarray:
    return _d_dx(a.T).T


def _bilinear(image: np.ndarray, x: float, y: float) -> float:
    h, w = image.shape
    x = min(max(x, 0.0), w - 1.001)
    y = min(max(y, 0.0), h - 1.001)
    x0, y0 = int(x), int(y)
    fx, fy = x - x0, y - y0
    return (
        image[y0, x0] * (1 - fx) * (1 - fy)
        + image[y0, x0 + 1] * fx * (1 - fy)
        + image[y0 + 1, x0] * (1 - fx) * fy
        + image[y0 + 1, x0 + 1] * fx * fy
    )


def reference_nms(edges: np.ndarray, r: int = 1, s: int = 5, m: float = 1.01, smoothing: int = 4) -> np.ndarray:
    """The structured edge toolbox's NMS written pixel by pixel from its description."""
    edges = edges.astype(np.float64)
    h, w = edges.shape
    smooth = _triangle_smooth(edges, smoothing)
    sx, sy = _d_dx(smooth), _d_dy(smooth)
    sxx, sxy, syy = _d_dx(sx), _d_dx(sy), _d_dy(sy)
    out = edges.copy()
    for y in range(h):
        for x in range(w):
            e = edges[y, x]
            if e == 0:
                continue
            angle = math.atan(syy[y, x] * np.sign(-sxy[y, x]) / (sxx[y, x] + 1e-5)) % math.pi
            for d in range(-r, r + 1):
                if d != 0 and e * m < _bilinear(edges, x + d * math.cos(angle), y + d * math.sin(angle)):
                    out[y, x] = 0.0
                    break
    s = min(s, w // 2, h // 2)
    for x in range(s):
        for y in range(h):
            out[y, x] *= x / s
            out[y, w - 1 - x] *= x / s
    for y in range(s):
        for x in range(w):
            out[y, x] *= y / s
            out[h - 1 - y, x] *= y / s
    return out


def _maps() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    maps = [(f"random {shape}", rng.random(shape)) for shape in ((7, 9), (13, 11), (16, 16))]
    sparse = rng.random((12, 14))
    sparse[sparse < 0.6] = 0
    maps.append(("sparse random", sparse))
    y, x = np.mgrid[0:15, 0:17]
    distance = np.abs(0.4 * x - y + 3) / math.hypot(0.4, 1)  # to the line y = 0.4 x + 3
    maps.append(("blurred line", np.exp(-(distance**2) / 2)))
    maps.append(("vertical step", np.where(x < 8, 0.2, 0.8)))
    maps.append(("slanted step", np.where(y > 0.7 * x + 2, 0.3, 0.9)))
    # centred off the pixel grid: on a column of exact mirror symmetry Sxy is 0 up to rounding, and its
    # sign (the toolbox's orientation formula) would follow the order of the floating-point sums
    maps.append(("blurred circle", np.exp(-((np.hypot(x - 8.3, y - 7.4) - 4) ** 2))))
    return maps


@pytest.mark.parametrize(("name", "edges"), _maps(), ids=[name for name, _ in _maps()])
def test_nms_matches_the_loop_reference(name, edges):
    expected = reference_nms(edges)
    actual = edge_nms(torch.from_numpy(edges).float()).double().numpy()
    assert actual.shape == edges.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert (expected[1:-1, 1:-1] == 0).any() and (expected[1:-1, 1:-1] > 0).any()  # some kept, some suppressed


# ---------------------------------------------------------------------------------------------------
# pascal_edge_gt: seg2bmap and the Laplacian


def test_seg2bmap_and_laplacian_edges_of_a_tiny_label_map():
    labels = np.array(
        [
            [1, 1, 1, 2, 2],
            [1, 1, 1, 2, 2],
            [1, 1, 1, 2, 2],
            [3, 3, 3, 3, 3],
            [3, 3, 3, 3, 3],
        ]
    )
    # seg2bmap: differs from the east, south or south-east neighbour; last row: east only; last
    # column: south only. Rows 0-1: only (y, 2) (east is 2); row 2: every pixel (south is 3, or east
    # 2 at x = 2, last column: south 3 != 2); rows 3-4: all 3
    boundaries = np.array(
        [
            [0, 0, 1, 0, 0],
            [0, 0, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert np.array_equal(seg2bmap(labels), boundaries)
    assert np.array_equal(label_map_boundaries(labels), boundaries)  # already one pixel wide
    # Laplacian up + down + left + right - 4 * centre, mirrored past the border without repeating it:
    # (0, 2): 1 + 1 + 1 + 2 - 4 = 1; (0, 3): 2 + 2 + 1 + 2 - 8 = -1; (2, 3): 2 + 3 + 1 + 2 - 8 = 0 (the
    # differences cancel); (2, 4): 2 + 3 + 2 + 2 - 8 = 1; row 3: (3, 0) 1 + 3 + 3 + 3 - 12 = -2, (3, 3)
    # 2 + 3 + 3 + 3 - 12 = -1; row 4: 3 + 3 + 3 + 3 - 12 = 0
    laplacian = np.array(
        [
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [1, 1, 1, 0, 1],
            [1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    thinned = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 1, 0, 1],
            [1, 1, 0, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert np.array_equal(thin(laplacian), thinned)
    assert np.array_equal(label_map_edges(labels), thinned)
    assert not np.array_equal(label_map_edges(labels), label_map_boundaries(labels))


def test_seg2bmap_last_row_and_column_rules_and_thinning():
    labels = np.array([[1, 2], [3, 4]])
    # (0, 0): east 2 differs; (0, 1) last column: south 4 differs; (1, 0) last row: east 4 differs;
    # (1, 1): never a boundary
    assert np.array_equal(seg2bmap(labels), np.array([[1, 1], [1, 0]], dtype=bool))
    # the thinning removes the corner of the L (its two ends stay, 8-connected)
    assert np.array_equal(label_map_boundaries(labels), np.array([[0, 1], [1, 0]], dtype=bool))
    # (0, 0): 5 everywhere around -> no; (0, 1): south-east 6; (0, 2) last column: south 6; (1, 0):
    # south-east 6; (1, 1): east 6; (1, 2) last column: south 6, equal -> no; (2, 0) last row: east 6;
    # (2, 1) last row: east 6, equal -> no
    labels = np.array([[5, 5, 5], [5, 5, 6], [5, 6, 6]])
    expected = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=bool)
    assert np.array_equal(seg2bmap(labels), expected)
    assert np.array_equal(seg2bmap(torch.from_numpy(labels)), expected)


# ---------------------------------------------------------------------------------------------------
# max_dist


def test_max_dist_switch_overrides_the_tolerance():
    target = torch.zeros(1, 1, 10, 10)
    target[0, 0, 5, 5] = 1
    prediction = torch.zeros(1, 1, 10, 10)
    prediction[0, 0, 5, 7] = 0.855  # 2 pixels from the ground truth; the diagonal is sqrt(200) = 14.142
    # the dataset's 0.0075: radius 0.106 < 2, no match: P = 0/1, R = 0/1 -> F = 0
    assert scores(edge_task(), prediction, target)["odsF"] == 0.0
    # 0.15: radius 0.15 * 14.142 = 2.12 >= 2, matched: P = R = 1 -> 100
    task = edge_task()
    task.configure_evaluation("project", {"max_dist": 0.15})
    assert task.metric().max_dist == 0.15
    assert scores(task, prediction, target)["odsF"] == pytest.approx(100.0)
    # 0.1: radius 1.414 < 2 -> 0
    task.configure_evaluation("survey", {"max_dist": 0.1, "edge_nms": False})
    assert scores(task, prediction, target)["odsF"] == 0.0
    # the switch wins over the loss option; None falls back to the option
    with_option = edge_task(max_dist=0.0)
    with_option.configure_evaluation("astmt", {"max_dist": 0.15, "edge_nms": False})
    assert scores(with_option, prediction, target)["odsF"] == pytest.approx(100.0)
    with_option.configure_evaluation("astmt", {"max_dist": None})
    assert with_option.metric().max_dist == 0.0


# ---------------------------------------------------------------------------------------------------
# PASCAL-MT making either ground truth


def _pascal_with_label_map(root) -> np.ndarray:
    write_sample(root, "a")
    write_split(root, ["a"])
    labels = np.ones((H, W), dtype=np.uint16)
    labels[:3, 5:] = 2
    labels[3:, :] = 3
    labels[4, 2] = 4
    scipy.io.savemat(root / "pascal-context" / "trainval" / "a.mat", {"LabelMap": labels})
    return labels.astype(np.int64)


def test_pascal_makes_either_edge_ground_truth(tmp_path):
    labels = _pascal_with_label_map(tmp_path)
    laplacian = torch.from_numpy(label_map_edges(labels)).float()[None]
    boundaries = torch.from_numpy(label_map_boundaries(labels)).float()[None]
    assert not torch.equal(laplacian, boundaries)

    default = PascalMT(tmp_path, "val", ["edge", "semseg"])
    assert default.edge_ground_truth == "laplacian" and torch.equal(default[0]["edge"], laplacian)
    other_keys = PascalMT(tmp_path, "val", ["edge"], evaluation={"semseg": {"pascal_edge_gt": "seg2bmap"}})
    assert torch.equal(other_keys[0]["edge"], laplacian)
    evaluation = {"edge": {**SEISM}, "semseg": {}}
    seism = PascalMT(tmp_path, "val", ["edge", "normals"], evaluation=evaluation)
    assert seism.edge_ground_truth == "seg2bmap"
    sample = seism[0]
    assert torch.equal(sample["edge"], boundaries) and sample["edge"].dtype == torch.float32
    explicit = PascalMT(tmp_path, "val", ["edge"], evaluation={"edge": {"pascal_edge_gt": "laplacian"}})
    assert torch.equal(explicit[0]["edge"], laplacian)


@pytest.mark.parametrize("value", ["sobel", None, 1])
def test_pascal_rejects_an_unknown_edge_ground_truth(tmp_path, value):
    _pascal_with_label_map(tmp_path)
    with pytest.raises(ConfigError, match=f"pascal_edge_gt.*got {value!r}"):
        PascalMT(tmp_path, "val", ["edge"], evaluation={"edge": {"pascal_edge_gt": value}})

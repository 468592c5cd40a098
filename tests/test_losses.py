"""The dense masked losses (``rcm_nddr.objectives.losses``), the task options that select them (semseg label
smoothing, depth loss type), the transfer losses of the built-in tasks and the depth metric's ``abs`` and
``ssim``: values against hand computations on tiny tensors, masking, empty batches and bad options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rcm_nddr.tasks.depth import DepthMetric

from rcm_nddr import tasks  # noqa: F401 - registers the built-in task types
from rcm_nddr.objectives.losses import (
    SSIM_C1,
    SSIM_C2,
    masked_l1,
    masked_logl1,
    masked_mse,
    masked_smoothl1,
    masked_ssim_loss,
    smoothed_cross_entropy,
    smoothed_kl,
    ssim_map,
)
from rcm_nddr.registry import TASKS
from rcm_nddr.task import DatasetInfo, Task

INFO = DatasetInfo(
    "toy",
    classes={"semseg": ["wall", "floor", "chair"], "parts": ["background", "leg"], "human_parts": ["bg", "head"]},
)
C1, C2 = 0.01**2, 0.03**2


def make_task(name: str, **options) -> Task:
    return TASKS.get(name)(name, INFO, **options)


def as_map(rows: list[list[float]]) -> torch.Tensor:
    """H x W nested lists -> 1 x 1 x H x W float tensor."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def as_mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)[None, None]


# ---------------------------------------------------------------- an elementary SSIM, one window at a time


def window_ssim_by_loops(x: list[list[float]], y: list[list[float]], valid: list[list[int]]):
    """[(ssim, centre valid)] of every 3 x 3 window of two H x W maps, masked pixels set to 0; plain floats."""
    height, width = len(x), len(x[0])
    out = []
    for i in range(1, height - 1):
        for j in range(1, width - 1):
            xs, ys = [], []
            for a in range(i - 1, i + 2):
                for b in range(j - 1, j + 2):
                    xs.append(x[a][b] if valid[a][b] else 0.0)
                    ys.append(y[a][b] if valid[a][b] else 0.0)
            mx, my = sum(xs) / 9, sum(ys) / 9
            vx = sum((u - mx) ** 2 for u in xs) / 9
            vy = sum((u - my) ** 2 for u in ys) / 9
            cxy = sum((u - mx) * (w - my) for u, w in zip(xs, ys, strict=True)) / 9
            ssim = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx * mx + my * my + C1) * (vx + vy + C2))
            out.append((ssim, bool(valid[i][j])))
    return out


def ssim_loss_by_loops(images: list[tuple[list, list, list]]) -> float:
    """Mean over images with a valid window of the mean clamped (1 - SSIM) / 2 over their valid windows."""
    scores = []
    for x, y, valid in images:
        losses = [min(max((1 - s) / 2, 0.0), 1.0) for s, ok in window_ssim_by_loops(x, y, valid) if ok]
        if losses:
            scores.append(sum(losses) / len(losses))
    return sum(scores) / len(scores) if scores else 0.0


X = [[0.5, 1.0, 2.0, 0.0], [1.5, 3.0, 1.0, 0.5], [2.0, 0.5, 4.0, 1.0], [1.0, 1.0, 0.5, 2.5]]
Y = [[1.0, 1.0, 1.5, 0.5], [1.0, 2.0, 2.0, 0.25], [2.5, 1.0, 3.0, 1.5], [0.5, 2.0, 1.0, 2.0]]
# Y is positive everywhere (a valid depth map). In MASK the window centre (1, 2) is invalid, so three of the four
# windows count, and (0, 1) is an invalid pixel inside them
MASK = [[1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


# ---------------------------------------------------------------- regression losses


def regression_case():
    """Errors 1 and 2 on the valid pixels; the invalid pixel's target is NaN (it must never matter)."""
    prediction = torch.tensor([[[[1.0, 4.0, 9.0]]]], requires_grad=True)
    target = torch.tensor([[[[2.0, 2.0, float("nan")]]]])
    valid = torch.tensor([[[[True, True, False]]]])
    return prediction, target, valid


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (masked_l1, (1 + 2) / 2),
        (masked_mse, (1 + 4) / 2),
        (masked_logl1, (math.log(2) + math.log(3)) / 2),
        # beta 1: d = 1 is at the joint (1 - 0.5), d = 2 is linear (2 - 0.5)
        (masked_smoothl1, (0.5 + 1.5) / 2),
        # beta 4: both quadratic, 0.5 d^2 / 4
        (lambda p, t, v: masked_smoothl1(p, t, v, beta=4.0), (0.5 * 1 / 4 + 0.5 * 4 / 4) / 2),
    ],
)
def test_regression_losses_by_hand_and_masked(loss, expected):
    prediction, target, valid = regression_case()
    value = loss(prediction, target, valid)
    assert value.ndim == 0 and value.item() == pytest.approx(expected)
    value.backward()
    assert torch.isfinite(prediction.grad).all() and prediction.grad[0, 0, 0, 2] == 0
    changed = prediction.detach().clone()
    changed[0, 0, 0, 2] = -1e6
    assert loss(changed, target, valid).item() == pytest.approx(expected)


def test_regression_losses_average_over_valid_components():
    # two channels, one valid pixel out of two: errors 1 and 3 on its components
    prediction = torch.tensor([[[[1.0, 7.0]], [[5.0, 7.0]]]])
    target = torch.tensor([[[[0.0, 0.0]], [[2.0, 0.0]]]])
    valid = torch.tensor([[[[True, False]]]])
    assert masked_l1(prediction, target, valid).item() == pytest.approx((1 + 3) / 2)
    assert masked_mse(prediction, target, valid).item() == pytest.approx((1 + 9) / 2)
    per_channel = torch.tensor([[[[True, False]], [[False, False]]]])
    assert masked_l1(prediction, target, per_channel).item() == pytest.approx(1.0)


def test_smoothl1_beta_must_be_positive():
    prediction, target, valid = regression_case()
    with pytest.raises(ValueError, match="beta"):
        masked_smoothl1(prediction, target, valid, beta=0.0)


def test_regression_losses_reject_mismatched_shapes_and_masks():
    prediction, target, valid = regression_case()
    with pytest.raises(ValueError, match="same shape"):
        masked_l1(prediction, target[..., :2], valid)
    with pytest.raises(ValueError, match="boolean"):
        masked_l1(prediction, target, valid.float())
    with pytest.raises(ValueError, match="valid mask"):
        masked_l1(prediction, target, valid[0])


# ---------------------------------------------------------------- SSIM


def test_ssim_of_constant_maps_by_hand():
    # one 3 x 3 window of constant maps 1 and 0: no variance, SSIM = C1 / (1 + C1)
    ones, zeros, valid = torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3, dtype=torch.bool)
    ssim, windows = ssim_map(ones, zeros, valid)
    assert ssim.shape == (1, 1, 1, 1) and windows.tolist() == [[[[True]]]]
    assert ssim.item() == pytest.approx(C1 / (1 + C1))
    assert masked_ssim_loss(ones, zeros, valid).item() == pytest.approx((1 - C1 / (1 + C1)) / 2)
    assert masked_ssim_loss(ones, ones, valid).item() == pytest.approx(0.0, abs=1e-6)
    # prediction 1 against target 2: (2 * 1 * 2 + C1) / (1 + 4 + C1)
    assert ssim_map(ones, 2 * ones, valid)[0].item() == pytest.approx((4 + C1) / (5 + C1))
    assert (SSIM_C1, SSIM_C2) == (C1, C2)


def test_ssim_map_and_loss_match_a_window_by_window_computation():
    ssim, windows = ssim_map(as_map(X), as_map(Y), as_mask(MASK))
    expected = window_ssim_by_loops(X, Y, MASK)
    assert ssim.flatten().tolist() == pytest.approx([s for s, _ in expected], rel=1e-5)
    assert windows.flatten().tolist() == [ok for _, ok in expected] == [True, False, True, True]
    loss = masked_ssim_loss(as_map(X), as_map(Y), as_mask(MASK))
    assert loss.item() == pytest.approx(ssim_loss_by_loops([(X, Y, MASK)]), rel=1e-5)


def test_ssim_loss_is_a_mean_of_per_image_means_over_images_with_a_valid_window():
    # image 1: the 4 x 4 case (3 valid windows); image 2: a single valid window (only the centre (2, 1) valid
    # among the window centres); image 3: no valid pixel at all
    mask_2 = [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]]
    mask_3 = [[0] * 4 for _ in range(4)]
    images = [(X, Y, MASK), (Y, X, mask_2), (X, X, mask_3)]
    prediction = torch.cat([as_map(x) for x, _, _ in images])
    target = torch.cat([as_map(y) for _, y, _ in images])
    valid = torch.cat([as_mask(m) for _, _, m in images])
    expected = ssim_loss_by_loops(images)
    loss = masked_ssim_loss(prediction, target, valid)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # pooling the four windows instead would weigh image 1 three times as much as image 2
    windows = [w for x, y, m in images[:2] for w in window_ssim_by_loops(x, y, m) if w[1]]
    pooled = sum((1 - s) / 2 for s, _ in windows) / len(windows)
    assert loss.item() != pytest.approx(pooled, rel=1e-5)


def test_ssim_loss_ignores_values_at_invalid_pixels():
    prediction = as_map(X).requires_grad_(True)
    target = as_map(Y)
    target[0, 0, 1, 2] = float("inf")  # invalid pixel
    loss = masked_ssim_loss(prediction, target, as_mask(MASK))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prediction.grad).all()
    assert prediction.grad[0, 0, 0, 1] == 0 and prediction.grad[0, 0, 1, 2] == 0
    changed = as_map(X)
    changed[0, 0, 0, 1] = 100.0
    assert masked_ssim_loss(changed, target, as_mask(MASK)).item() == pytest.approx(loss.item())


@pytest.mark.parametrize(("size", "mask_value"), [((4, 4), False), ((2, 5), True), ((3, 3), "border")])
def test_ssim_loss_without_valid_window_is_zero_with_a_graph(size, mask_value):
    prediction = torch.rand(2, 1, *size, requires_grad=True)
    if mask_value == "border":  # valid pixels on the border only: no window centre is valid
        valid = torch.ones(2, 1, *size, dtype=torch.bool)
        valid[..., 1, 1] = False
    else:
        valid = torch.full((2, 1, *size), mask_value)
    loss = masked_ssim_loss(prediction, torch.rand(2, 1, *size), valid)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


# ---------------------------------------------------------------- label-smoothed classification losses


def test_smoothed_cross_entropy_and_kl_by_hand():
    # softmax of log(1), log(2), log(3) = (1/6, 2/6, 3/6); label 2; smoothing 0.1 over 3 classes
    logits = torch.tensor([math.log(1), math.log(2), math.log(3)]).view(1, 3, 1, 1)
    labels = torch.tensor([[[2]]])
    p = [1 / 6, 2 / 6, 3 / 6]
    q = [0.05, 0.05, 0.9]
    cross = -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))
    kl = sum(qk * (math.log(qk) - math.log(pk)) for qk, pk in zip(q, p, strict=True))
    assert smoothed_cross_entropy(logits, labels, 0.1).item() == pytest.approx(cross)
    assert smoothed_kl(logits, labels, 0.1).item() == pytest.approx(kl)
    # no smoothing: both are -log p_y
    assert smoothed_cross_entropy(logits, labels, 0.0).item() == pytest.approx(-math.log(0.5))
    assert smoothed_kl(logits, labels, 0.0).item() == pytest.approx(-math.log(0.5))


def test_smoothed_losses_average_over_non_ignored_pixels():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(1), math.log(2), math.log(3)]]).T.reshape(1, 3, 1, 2)
    logits = torch.cat([logits, torch.full((1, 3, 1, 1), 7.0)], dim=3)  # a third, ignored pixel
    labels = torch.tensor([[[0, 2, 255]]])
    s = 0.3
    q = [[1 - s, s / 2, s / 2], [s / 2, s / 2, 1 - s]]
    p = [[1 / 3] * 3, [1 / 6, 2 / 6, 3 / 6]]
    cross = [-sum(a * math.log(b) for a, b in zip(qi, pi, strict=True)) for qi, pi in zip(q, p, strict=True)]
    kl = [sum(a * math.log(a / b) for a, b in zip(qi, pi, strict=True)) for qi, pi in zip(q, p, strict=True)]
    assert smoothed_cross_entropy(logits, labels, s).item() == pytest.approx(sum(cross) / 2)
    assert smoothed_kl(logits, labels, s).item() == pytest.approx(sum(kl) / 2)
    # another ignore value: the third pixel (label 0) is left out; the uniform pixel costs log 3 whatever q is
    other = torch.tensor([[[1, 2, 0]]])
    expected = (math.log(3) + cross[1]) / 2
    assert smoothed_cross_entropy(logits, other, s, ignore_index=0).item() == pytest.approx(expected)


@pytest.mark.parametrize("loss", [smoothed_cross_entropy, smoothed_kl])
def test_smoothing_zero_equals_pytorch_cross_entropy(loss):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (2, 5, 6), generator=generator)
    labels[torch.rand(2, 5, 6, generator=generator) < 0.3] = 255
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert loss(logits, labels, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss", [smoothed_cross_entropy, smoothed_kl])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_smoothed_losses_on_an_all_ignored_batch_are_zero_with_a_graph(loss, smoothing):
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    value = loss(logits, torch.full((2, 2, 2), 255), smoothing)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("loss", [smoothed_cross_entropy, smoothed_kl])
def test_smoothed_losses_reject_bad_smoothing_and_shapes(loss):
    logits, labels = torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="smoothing"):
            loss(logits, labels, bad)
    with pytest.raises(ValueError, match="at least 2 classes"):
        loss(torch.zeros(1, 1, 2, 2), labels, 0.1)
    with pytest.raises(ValueError, match="B x H x W"):
        loss(logits, labels[:, None], 0.0)


# ---------------------------------------------------------------- the task contract


def test_task_contract_defaults_and_declarations():
    assert Task.loss_kind == "regression" and Task.transfer_losses == ()
    kinds = {name: TASKS.get(name).loss_kind for name in ("semseg", "parts", "human_parts", "depth", "normals")}
    kinds |= {name: TASKS.get(name).loss_kind for name in ("edge", "sal")}
    assert kinds == {
        "semseg": "classification",
        "parts": "classification",
        "human_parts": "classification",
        "depth": "regression",
        "normals": "regression",
        "edge": "classification",
        "sal": "classification",
    }
    accepted = {name: TASKS.get(name).transfer_losses for name in ("semseg", "depth", "normals", "edge", "sal")}
    assert accepted == {
        "semseg": ("cross", "kl"),
        "depth": ("l1", "ssim"),
        "normals": ("l1",),
        "edge": ("bce",),
        "sal": ("bce",),
    }


@pytest.mark.parametrize(("name", "kind"), [("depth", "cross"), ("semseg", "ssim"), ("normals", "kl"), ("sal", "l1")])
def test_unknown_transfer_loss_names_the_task_type_and_kind(name, kind):
    task = make_task(name)
    with pytest.raises(NotImplementedError, match=f"{type(task).__name__}.*'{kind}'"):
        task.transfer_loss(kind, torch.zeros(1, task.out_channels, 2, 2), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- segmentation: label smoothing and transfer losses


@pytest.mark.parametrize("name", ["semseg", "parts", "human_parts"])
def test_label_smoothing_option(name):
    assert make_task(name).label_smoothing == 0.0
    assert make_task(name, label_smoothing=0.25).label_smoothing == 0.25
    for bad in (-0.1, 1.0, 1.5, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match=f"task '{name}'.*label_smoothing"):
            make_task(name, label_smoothing=bad)


def test_label_smoothing_zero_keeps_the_plain_cross_entropy():
    generator = torch.Generator().manual_seed(3)
    output = torch.randn(2, 3, 4, 5, generator=generator)
    target = torch.randint(0, 3, (2, 4, 5), generator=generator)
    target[0, :2] = 255
    plain = F.cross_entropy(output, target, ignore_index=255, reduction="sum") / (target != 255).sum()
    assert torch.equal(make_task("semseg").loss(output, target), plain)
    assert torch.equal(make_task("semseg", label_smoothing=0.0).loss(output, target), plain)
    # an all-ignore batch stays 0 with a graph, smoothed or not
    for smoothing in (0.0, 0.1):
        logits = output.clone().requires_grad_(True)
        loss = make_task("semseg", label_smoothing=smoothing).loss(logits, torch.full_like(target, 255))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_semseg_smoothed_loss_and_transfer_losses_by_hand():
    # two pixels: logits log(1, 2, 3) with label 2, and uniform logits with label 0; smoothing 0.2
    logits = torch.tensor([[math.log(1), 0.0], [math.log(2), 0.0], [math.log(3), 0.0]]).reshape(1, 3, 1, 2)
    labels = torch.tensor([[[2, 0]]])
    p = [[1 / 6, 2 / 6, 3 / 6], [1 / 3, 1 / 3, 1 / 3]]
    q = [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]
    cross = sum(-sum(a * math.log(b) for a, b in zip(qi, pi, strict=True)) for qi, pi in zip(q, p, strict=True)) / 2
    kl = sum(sum(a * math.log(a / b) for a, b in zip(qi, pi, strict=True)) for qi, pi in zip(q, p, strict=True)) / 2
    task = make_task("semseg", label_smoothing=0.2)
    assert task.loss(logits, labels).item() == pytest.approx(cross)
    assert task.transfer_loss("cross", logits, labels).item() == pytest.approx(cross)
    assert task.transfer_loss("kl", logits, labels).item() == pytest.approx(kl)
    # the reference may be the task's own prediction (an argmax map) and masks 255
    reference = task.postprocess(torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]], [[9.0, 0.0]]]]))
    assert reference.tolist() == [[[2, 0]]]
    masked = torch.tensor([[[2, 255]]])
    assert task.transfer_loss("cross", logits, masked).item() == pytest.approx(
        -sum(a * math.log(b) for a, b in zip(q[0], p[0], strict=True))
    )
    with pytest.raises(ValueError, match="label 7"):
        task.transfer_loss("cross", logits, torch.tensor([[[7, 0]]]))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        task.transfer_loss("kl", logits[:, :2], labels)


# ---------------------------------------------------------------- depth: loss type and transfer losses


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("l1", (1 + 2) / 2),
        ("mse", (1 + 4) / 2),
        ("logl1", (math.log(2) + math.log(3)) / 2),
        ("smoothl1", (0.5 + 1.5) / 2),
    ],
)
def test_depth_loss_type_by_hand(loss_type, expected):
    output = torch.tensor([[[[1.0, 4.0, 9.0]]]], requires_grad=True)
    target = torch.tensor([[[[2.0, 2.0, 0.0]]]])
    task = make_task("depth", type=loss_type)
    loss = task.loss(output, target)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert output.grad[0, 0, 0, 2] == 0
    empty = task.loss(output, torch.zeros_like(target))
    assert empty.item() == 0.0 and empty.requires_grad


def test_depth_default_loss_is_unchanged():
    generator = torch.Generator().manual_seed(4)
    output = torch.randn(2, 1, 4, 5, generator=generator)
    target = (torch.rand(2, 1, 4, 5, generator=generator) * 3).masked_fill(
        torch.rand(2, 1, 4, 5, generator=generator) < 0.3, 0
    )
    valid = target > 0
    expected = torch.where(valid, (output - target).abs(), 0).sum() / valid.sum()
    assert make_task("depth").loss(output, target).item() == pytest.approx(expected.item())
    assert make_task("depth").loss_type == "l1"


def test_depth_bad_loss_type_names_the_option_and_choices():
    with pytest.raises(ValueError, match="task 'depth'.*type.*'l1', 'mse', 'logl1', 'smoothl1'.*'huber'"):
        make_task("depth", type="huber")


def test_depth_transfer_losses_by_hand():
    task = make_task("depth")
    transferred = torch.tensor([[[[1.0, 4.0, 9.0]]]])
    reference = torch.tensor([[[[2.0, 2.0, 0.0]]]])
    assert task.transfer_loss("l1", transferred, reference).item() == pytest.approx(1.5)
    inf_reference = torch.tensor([[[[2.0, 2.0, float("inf")]]]])
    assert task.transfer_loss("l1", transferred, inf_reference).item() == pytest.approx(1.5)
    # ssim: the 4 x 4 window case, with the invalid pixels of MASK set to depth 0 in the reference
    reference = as_map(Y) * as_mask(MASK)
    expected = ssim_loss_by_loops([(X, Y, MASK)])
    assert task.transfer_loss("ssim", as_map(X), reference).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        task.transfer_loss("ssim", torch.zeros(1, 2, 4, 4), reference)


# ---------------------------------------------------------------- normals and binary maps: transfer losses


def test_normals_transfer_loss_by_hand():
    # (0, 0, 2) normalizes onto the reference; (1, 0, 0) is off by |1| + |-1| over 3 components; the third
    # pixel's reference is the zero vector (invalid)
    transferred = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 5.0], [2.0, 0.0, 5.0]]).reshape(1, 3, 1, 3)
    reference = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]).reshape(1, 3, 1, 3)
    loss = make_task("normals").transfer_loss("l1", transferred, reference)
    assert loss.item() == pytest.approx(2 / 6)


def test_binary_transfer_loss_thresholds_a_probability_reference():
    logits = torch.zeros(1, 1, 1, 5)
    # -> labels 1, 0, ignore, 1, 0
    reference = torch.tensor([[[[0.7, 0.2, 255.0, 0.5, 0.0]]]])
    log2 = math.log(2)
    assert make_task("sal").transfer_loss("bce", logits, reference).item() == pytest.approx(log2)
    # edge: positives weigh 0.95, negatives 0.05, mean over the 4 valid pixels
    edge = make_task("edge").transfer_loss("bce", logits, reference).item()
    assert edge == pytest.approx((0.95 + 0.05 + 0.95 + 0.05) * log2 / 4)
    # a label reference is used as it is
    logits = torch.tensor([[[[2.0, -1.0]]]])
    label = torch.tensor([[[[1.0, 0.0]]]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert make_task("sal").transfer_loss("bce", logits, label).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="neither in \\[0, 1\\]"):
        make_task("sal").transfer_loss("bce", logits, torch.tensor([[[[1.5, 0.0]]]]))


def test_binary_transfer_loss_on_an_all_ignored_reference_is_zero_with_a_graph():
    logits = torch.randn(1, 1, 2, 2, requires_grad=True)
    loss = make_task("edge").transfer_loss("bce", logits, torch.full((1, 1, 2, 2), 255.0))
    assert loss.item() == 0.0 and loss.requires_grad


# ---------------------------------------------------------------- depth metric: abs and ssim


def test_depth_metric_abs_and_ssim_by_hand():
    metric = DepthMetric()
    # a 3 x 3 image: prediction 1, target 2 everywhere -> |error| 1, one window with SSIM (4 + C1) / (5 + C1)
    metric.update(torch.ones(1, 1, 3, 3), torch.full((1, 1, 3, 3), 2.0))
    result = metric.compute()
    assert result["abs"] == pytest.approx(1.0)
    assert result["ssim"] == pytest.approx((4 + C1) / (5 + C1))
    assert result["rmse"] == pytest.approx(1.0)

    # the 4 x 4 case: invalid target pixels are depth 0; windows pooled with the first image's
    metric.update(as_map(X), as_map(Y) * as_mask(MASK))
    windows = [s for s, ok in window_ssim_by_loops(X, Y, MASK) if ok]
    errors = [
        abs(x - y) for xr, yr, mr in zip(X, Y, MASK, strict=True) for x, y, m in zip(xr, yr, mr, strict=True) if m
    ]
    result = metric.compute()
    assert result["ssim"] == pytest.approx(((4 + C1) / (5 + C1) + sum(windows)) / (1 + len(windows)), rel=1e-6)
    assert result["abs"] == pytest.approx((9 + sum(errors)) / (9 + len(errors)))


def test_depth_metric_ssim_clamps_the_prediction_and_is_absent_without_windows():
    target = as_map(Y)
    negative, zero = as_map(X), as_map(X)
    negative[0, 0, 1, 1], zero[0, 0, 1, 1] = -3.0, 0.0
    first, second = DepthMetric(), DepthMetric()
    first.update(negative, target)
    second.update(zero, target)
    assert first.compute()["ssim"] == pytest.approx(second.compute()["ssim"])
    small = DepthMetric()
    small.update(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0))
    assert "ssim" not in small.compute() and small.compute()["abs"] == pytest.approx(1.0)


def test_depth_metric_merge_equals_one_accumulator_over_both_halves():
    generator = torch.Generator().manual_seed(5)
    prediction = torch.rand(4, 1, 6, 7, generator=generator) * 4
    target = (torch.rand(4, 1, 6, 7, generator=generator) * 4 + 0.1).masked_fill(
        torch.rand(4, 1, 6, 7, generator=generator) < 0.25, 0
    )
    whole, first, second = DepthMetric(), DepthMetric(), DepthMetric()
    whole.update(prediction, target)
    first.update(prediction[:1], target[:1])
    second.update(prediction[1:], target[1:])
    first.merge(second)
    merged, expected = first.compute(), whole.compute()
    assert set(merged) == set(expected) >= {"rmse", "abs", "ssim", "abs_rel", "log_rmse", "delta1"}
    assert merged == pytest.approx(expected)

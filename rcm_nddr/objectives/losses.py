"""Dense loss functions with masking, shared by the task plug-ins (their own losses and the transfer losses of
the cross-task consistency terms).

Every function takes plain tensors and returns a scalar tensor. Masked pixels are left out of both the value and
the gradient; when no pixel (or window) is valid the result is 0 and still part of the autograd graph, so a batch
without any valid pixel trains nothing rather than failing. Masks are applied with ``torch.where``, never by
boolean indexing: shapes never depend on the data, so a training step does not wait for the device.

Regression losses take a prediction and a target of shape B x C x H x W and a boolean ``valid`` mask of shape
B x 1 x H x W (or B x C x H x W); their mean runs over the C components of every valid pixel. Classification
losses take logits B x C x H x W and integer labels B x H x W, ``ignore_index`` marking pixels left out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: the SSIM stabilizing constants (K1 L)^2 and (K2 L)^2 with K1 = 0.01, K2 = 0.03 and a dynamic range L = 1
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
#: side of the square window of the SSIM statistics (a stride-1 average pool without padding)
SSIM_WINDOW = 3


def _check_dense(prediction: Tensor, target: Tensor, valid: Tensor, what: str) -> Tensor:
    """The mask broadcast to the prediction's shape, after checking the three shapes agree."""
    if prediction.ndim != 4 or prediction.shape != target.shape:
        raise ValueError(
            f"{what}: expected prediction and target of the same shape B x C x H x W, got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"{what}: the valid mask must be boolean, got dtype {valid.dtype}")
    batch, channels, height, width = prediction.shape
    if valid.ndim != 4 or valid.shape[0] != batch or valid.shape[1] not in (1, channels):
        raise ValueError(
            f"{what}: expected a valid mask of shape {batch} x 1 x {height} x {width}, got {tuple(valid.shape)}"
        )
    if valid.shape[-2:] != prediction.shape[-2:]:
        raise ValueError(f"{what}: valid mask {tuple(valid.shape)} and prediction {tuple(prediction.shape)} differ")
    return valid.expand_as(prediction)


def _masked_elementwise_mean(prediction: Tensor, target: Tensor, valid: Tensor, what: str, error) -> Tensor:
    """Mean of ``error(prediction - target)`` over the components of the valid pixels (0 when none)."""
    mask = _check_dense(prediction, target, valid, what)
    prediction = prediction.float()
    # the target is replaced where invalid, so a NaN or infinite value there cannot reach the gradient
    target = torch.where(mask, target.float(), 0)
    values = torch.where(mask, error(prediction - target), 0)
    return values.sum() / mask.sum().clamp_min(1)


def masked_l1(prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean absolute error over the valid pixels: ``sum_valid |p - t| / n``, with ``n`` the number of valid
    components (valid pixels times channels)."""
    return _masked_elementwise_mean(prediction, target, valid, "masked_l1", torch.abs)


def masked_mse(prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over the valid pixels: ``sum_valid (p - t)^2 / n``."""
    return _masked_elementwise_mean(prediction, target, valid, "masked_mse", torch.square)


def masked_logl1(prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean log-compressed absolute error over the valid pixels: ``sum_valid log(1 + |p - t|) / n``."""
    return _masked_elementwise_mean(
        prediction, target, valid, "masked_logl1", lambda difference: torch.log1p(difference.abs())
    )


def masked_smoothl1(prediction: Tensor, target: Tensor, valid: Tensor, beta: float = 1.0) -> Tensor:
    """Mean Huber (smooth L1) error over the valid pixels: with ``d = |p - t|``, each component contributes
    ``0.5 d^2 / beta`` where ``d < beta`` and ``d - 0.5 beta`` elsewhere; the sum is divided by ``n``.
    ``beta`` must be positive."""
    if not beta > 0:
        raise ValueError(f"masked_smoothl1: beta must be > 0, got {beta}")

    def huber(difference: Tensor) -> Tensor:
        size = difference.abs()
        return torch.where(size < beta, 0.5 * size.square() / beta, size - 0.5 * beta)

    return _masked_elementwise_mean(prediction, target, valid, "masked_smoothl1", huber)


def ssim_map(prediction: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The SSIM of every 3 x 3 window of two masked maps, and which windows are valid.

    Both maps are set to 0 where ``valid`` is false (the mask multiplies them, as in the cross-task
    consistency work; the values there never reach the result's gradient). With ``mu``, ``sigma^2`` and
    ``sigma_xy`` the means, variances and covariance of a window (a 3 x 3 average pool, stride 1, no padding):

        SSIM = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))

    with C1 = 0.01^2 and C2 = 0.03^2. A window is valid when its centre pixel is valid (its other pixels may be
    masked: they count as zeros in the statistics). Returns the SSIM, B x C x (H - 2) x (W - 2), computed in the
    floating type of the inputs (at least float32), and the window mask, B x 1 x (H - 2) x (W - 2) (or
    B x C x ...when ``valid`` has C channels); both are empty when H or W is below 3.
    """
    mask = _check_dense(prediction, target, valid, "ssim_map")
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)
    x = torch.where(mask, prediction.to(dtype), 0)
    y = torch.where(mask, target.to(dtype), 0)
    height, width = prediction.shape[-2:]
    half = SSIM_WINDOW // 2
    centres = valid[..., half : height - half, half : width - half]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        # no whole window fits; slicing keeps the (empty) result in the graph
        return x[..., :0, :0], centres[..., :0, :0]

    def pool(values: Tensor) -> Tensor:
        return F.avg_pool2d(values, SSIM_WINDOW, stride=1)

    mu_x, mu_y = pool(x), pool(y)
    var_x = pool(x * x) - mu_x.square()
    var_y = pool(y * y) - mu_y.square()
    cov_xy = pool(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov_xy + SSIM_C2)
    denominator = (mu_x.square() + mu_y.square() + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return numerator / denominator, centres


def masked_ssim_loss(prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Structural dissimilarity of two dense maps (Godard et al. 2017; the cross-task consistency work).

    Per window (see ``ssim_map``: 3 x 3, centre pixel valid) the loss is ``clamp((1 - SSIM) / 2, 0, 1)``. Each
    image scores the mean of its loss over its valid windows (and channels); the result is the mean of those
    scores over the images with at least one valid window. An image whose valid pixels all lie on the one-pixel
    border has no valid window and is left out like an image without valid pixels; 0 (with a graph) when no
    image of the batch has a valid window.
    """
    ssim, windows = ssim_map(prediction, target, valid)
    windows = windows.expand_as(ssim)
    loss = torch.where(windows, ((1 - ssim) / 2).clamp(0, 1), 0)
    per_image_sum = loss.flatten(1).sum(1)
    per_image_count = windows.flatten(1).sum(1)
    per_image = per_image_sum / per_image_count.clamp_min(1)
    return per_image.sum() / (per_image_count > 0).sum().clamp_min(1)


def _smoothing_terms(
    logits: Tensor, labels: Tensor, smoothing: float, ignore_index: int, what: str
) -> tuple[Tensor, Tensor]:
    """The summed smoothed cross-entropy of the non-ignored pixels and their number."""
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what}: expected logits B x C x H x W and labels B x H x W, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"{what}: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in size")
    if not 0 <= smoothing < 1:
        raise ValueError(f"{what}: smoothing must lie in [0, 1), got {smoothing}")
    classes = logits.shape[1]
    if smoothing > 0 and classes < 2:
        raise ValueError(f"{what}: label smoothing needs at least 2 classes, got {classes}")
    logits = logits.float()
    valid = labels != ignore_index
    # the per-pixel negative log-likelihood of the true class (0 at ignored pixels)
    nll = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if smoothing == 0:
        total = nll.sum()
    else:
        # - sum over the other classes of log p_k = - sum over all classes + the true class's term
        others = torch.where(valid, -F.log_softmax(logits, 1).sum(1) - nll, 0)
        total = (1 - smoothing) * nll.sum() + smoothing / (classes - 1) * others.sum()
    return total, valid.sum()


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float, ignore_index: int = 255) -> Tensor:
    """Cross-entropy against the label-smoothed one-hot distribution, averaged over the non-ignored pixels.

    With ``C`` classes, the true class ``y`` and ``p = softmax(logits)``, the target distribution ``q`` gives
    ``1 - smoothing`` to ``y`` and ``smoothing / (C - 1)`` to each other class, and a pixel contributes
    ``- sum_k q_k log p_k``. At ``smoothing`` 0 this is ``F.cross_entropy(logits, labels,
    ignore_index=ignore_index)``; unlike that function it is 0 (with a graph) when every pixel is ignored.
    ``smoothing`` lies in [0, 1).
    """
    total, count = _smoothing_terms(logits, labels, smoothing, ignore_index, "smoothed_cross_entropy")
    return total / count.clamp_min(1)


def smoothed_kl(logits: Tensor, labels: Tensor, smoothing: float, ignore_index: int = 255) -> Tensor:
    """``KL(q || p)`` from the label-smoothed one-hot ``q`` (see ``smoothed_cross_entropy``) to the predicted
    ``p = softmax(logits)``, averaged over the non-ignored pixels.

    ``KL(q || p) = sum_k q_k (log q_k - log p_k)`` in nats, with ``0 log 0 = 0``: the smoothed cross-entropy
    minus the entropy of ``q``, ``H(q) = - (1 - s) log(1 - s) - s log(s / (C - 1))``. At ``smoothing`` 0,
    ``q`` is one-hot, ``H(q) = 0`` and the KL equals the cross-entropy. 0 (with a graph) when every pixel is
    ignored.
    """
    total, count = _smoothing_terms(logits, labels, smoothing, ignore_index, "smoothed_kl")
    classes = logits.shape[1]
    negative_entropy = 0.0
    if smoothing > 0:
        negative_entropy = (1 - smoothing) * math.log(1 - smoothing) + smoothing * math.log(smoothing / (classes - 1))
    # the entropy term is a constant per pixel: added once per counted pixel (not at all when none counts)
    return (total + negative_entropy * count) / count.clamp_min(1)

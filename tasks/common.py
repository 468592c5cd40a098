"""Shape checks and small numeric helpers shared by the built-in task plug-ins."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_map(tensor: Tensor, channels: int | None, what: str) -> None:
    """Raise a clear error unless ``tensor`` is B x channels x H x W (B x H x W when channels is None)."""
    if channels is None:
        if tensor.ndim != 3:
            raise ValueError(f"{what}: expected a B x H x W tensor, got shape {tuple(tensor.shape)}")
    elif tensor.ndim != 4 or tensor.shape[1] != channels:
        raise ValueError(f"{what}: expected a B x {channels} x H x W tensor, got shape {tuple(tensor.shape)}")


def check_single(tensor: Tensor, channels: int | None, what: str) -> None:
    """Like ``check_map`` for one sample without the batch dimension."""
    if channels is None:
        if tensor.ndim != 2:
            raise ValueError(f"{what}: expected an H x W tensor, got shape {tuple(tensor.shape)}")
    elif tensor.ndim != 3 or tensor.shape[0] != channels:
        raise ValueError(f"{what}: expected a {channels} x H x W tensor, got shape {tuple(tensor.shape)}")


def check_values(bad: Tensor, message: Callable[[Tensor], str], device_message: str) -> None:
    """Fail when any element of the mask ``bad`` is set. On the CPU: a ValueError from ``message(bad)``
    (which may read the offending values). On an accelerator the check is queued with the computation
    (``torch._assert_async``), so the training step does not wait for the device to learn the answer; a
    failure then stops the process with ``device_message``."""
    if bad.device.type == "cpu":
        if bad.any():
            raise ValueError(message(bad))
    else:
        torch._assert_async(~bad.any(), device_message)


def check_same_spatial(output: Tensor, target: Tensor, what: str) -> None:
    """Losses work at target resolution: batch and spatial sizes must agree."""
    if output.shape[0] != target.shape[0] or output.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{what}: output {tuple(output.shape)} and target {tuple(target.shape)} differ in batch or "
            "spatial size; resize the output to the target resolution first"
        )


def check_same_shape(prediction: Tensor, target: Tensor, what: str) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")


def safe_divide(numerator: Tensor, denominator: Tensor, empty: Tensor | float) -> Tensor:
    """``numerator / denominator`` where the denominator is positive, ``empty`` where it is zero."""
    ratio = numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(denominator > 0, ratio, torch.as_tensor(empty, dtype=ratio.dtype, device=ratio.device))


def to_accumulator(tensor: Tensor) -> Tensor:
    """Batch statistics move to the CPU in float64 so long evaluations sum without drift."""
    return tensor.detach().to(device="cpu", dtype=torch.float64)

"""Cross-stitch units (Misra et al., CVPR 2016): at chosen stage boundaries each task's features become a
learned linear combination of its source tasks' features, one weight per source and channel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from rcm_nddr.nn.fusion import StageFusion


class CrossStitchUnit(nn.Module):
    """One task's cross-stitch unit at one stage: ``out[:, c] = sum_s weight[s, c] * x_s[:, c]``.

    The weights are per channel (``weight``: n_sources x channels), as in the dense-prediction MTL survey
    code, rather than one scalar per task pair as in the paper: a channel-wise unit costs
    ``n_sources * channels`` parameters and contains the scalar one. Row 0 weighs the own task's
    features and starts at ``alpha``; every other row starts at ``beta``, by default
    ``(1 - alpha) / (n_sources - 1)`` so each channel's weights sum to 1. No BatchNorm, no ReLU: a
    unit is linear, so at initialization it computes ``alpha * x_own + beta * sum of the others``.
    """

    def __init__(self, channels: int, n_sources: int, alpha: float = 0.9, beta: float | None = None) -> None:
        super().__init__()
        if channels < 1 or n_sources < 1:
            raise ValueError(f"CrossStitchUnit needs channels >= 1 and n_sources >= 1, got {channels}, {n_sources}")
        if beta is None:
            beta = (1.0 - alpha) / (n_sources - 1) if n_sources > 1 else 0.0
        self.channels, self.n_sources = channels, n_sources
        weight = torch.full((n_sources, channels), float(beta))
        weight[0] = alpha
        self.weight = nn.Parameter(weight)

    def forward(self, sources: Sequence[Tensor]) -> Tensor:
        """``sources``: the source tasks' features of this stage, the own task's first."""
        if len(sources) != self.n_sources:
            raise ValueError(f"CrossStitchUnit expects {self.n_sources} source feature maps, got {len(sources)}")
        weights = self.weight[:, None, :, None, None]  # source x (N, C, H, W)
        out = weights[0] * sources[0]
        for w, x in zip(weights[1:], sources[1:], strict=True):
            out = out + w * x
        return out


class CrossStitchFusion(StageFusion):
    """The cross-stitch units of a model, ``self[task][stage]``, so their parameters are named
    ``fusion.<task>.<stage>.weight`` under a MultiTaskNet.

    ``tasks_sources[t]`` lists the tasks t reads, t first. A task that is only ever a source (an older
    task under one-way fusion) gets no unit and passes through unchanged. There is no shortcut.
    """

    kind = "cross-stitch"

    def __init__(
        self,
        tasks_sources: Mapping[str, Sequence[str]],
        stage_channels: Mapping[str, int],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
    ) -> None:
        super().__init__(stage_channels)
        for task, sources in tasks_sources.items():
            self.add_task(task, sources, stages, alpha, beta)

    def add_task(
        self,
        task: str,
        sources: Sequence[str],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
    ) -> None:
        """Cross-stitch units for ``task`` reading ``sources`` (``task`` first) after each of ``stages``."""
        ordered = self.check_task(task, sources, stages)
        units: dict[str, nn.Module] = {
            s: CrossStitchUnit(self.stage_channels[s], len(sources), alpha, beta) for s in ordered
        }
        self.register(task, sources, ordered, units)

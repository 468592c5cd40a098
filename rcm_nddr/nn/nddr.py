"""NDDR fusion (CVPR 2019): at chosen stage boundaries each task mixes the stage features of its source
tasks with a learned ``1x1 conv -> BN -> ReLU``, initialized to mostly keep its own features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcm_nddr.nn.fusion import StageFusion, transitive_sources

__all__ = ["SHORTCUT", "NDDR_INITS", "NDDRFusion", "NDDRLayer", "NDDRShortcut", "transitive_sources"]

#: how an NDDR layer's conv starts: ``constant`` (``alpha I`` / ``beta I`` blocks) or ``xavier``
#: (``nn.init.xavier_uniform_``, the NDDR-CNN ablation)
NDDR_INITS = ("constant", "xavier")


class NDDRLayer(nn.Module):
    """One task's NDDR layer at one stage: ``ReLU(BN(W [x_own, x_s1, x_s2, ...]))`` with ``W`` a bias-free
    1x1 conv from ``n_sources * channels`` to ``channels``.

    With ``init="constant"`` (the default) ``W`` starts as ``[alpha I, beta I, ..., beta I]``: the output
    is ``alpha`` times the own features plus ``beta`` times each other source's, before BatchNorm.
    ``beta`` defaults to ``(1 - alpha) / (n_sources - 1)`` so the blocks sum to 1. ``init="xavier"``
    draws ``W`` with ``nn.init.xavier_uniform_`` instead (``alpha``, ``beta`` unused). ``bn=False`` drops
    the BatchNorm (``self.bn`` is an Identity, nothing of it in the state dict): ``ReLU(W [...])``.
    """

    def __init__(
        self,
        channels: int,
        n_sources: int,
        alpha: float = 0.9,
        beta: float | None = None,
        init: str = "constant",
        bn: bool = True,
    ) -> None:
        super().__init__()
        if channels < 1 or n_sources < 1:
            raise ValueError(f"NDDRLayer needs channels >= 1 and n_sources >= 1, got {channels}, {n_sources}")
        if init not in NDDR_INITS:
            raise ValueError(f"unknown NDDR init {init!r}; expected one of {list(NDDR_INITS)}")
        if beta is None:
            beta = (1.0 - alpha) / (n_sources - 1) if n_sources > 1 else 0.0
        self.channels, self.n_sources = channels, n_sources
        self.conv = nn.Conv2d(n_sources * channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            if init == "xavier":
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                eye = torch.eye(channels)
                blocks = [alpha * eye] + [beta * eye] * (n_sources - 1)
                self.conv.weight.copy_(torch.cat(blocks, dim=1)[:, :, None, None])

    def forward(self, sources: Sequence[Tensor]) -> Tensor:
        """``sources``: the source tasks' features of this stage, the own task's first."""
        if len(sources) != self.n_sources:
            raise ValueError(f"NDDRLayer expects {self.n_sources} source feature maps, got {len(sources)}")
        return self.relu(self.bn(self.conv(torch.cat(list(sources), dim=1))))


class NDDRShortcut(nn.Module):
    """The NDDR-shortcut of one task: its NDDR outputs of every fusion stage resized to the last stage's
    size, concatenated, and mapped back to the last stage's channels by ``1x1 conv -> BN -> ReLU``.

    The conv starts as the identity on the last stage's block and zero on the others, so the shortcut
    begins by passing the last stage through (like the NDDR layers, it starts from what the network
    computed without it) and learns how much of the earlier stages to add."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        out = channels[-1]
        self.conv = nn.Conv2d(sum(channels), out, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, sum(channels[:-1]) :, 0, 0].copy_(torch.eye(out))

    def forward(self, stage_features: Sequence[Tensor]) -> Tensor:
        size = stage_features[-1].shape[-2:]
        resized = [
            x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for x in stage_features
        ]
        return self.relu(self.bn(self.conv(torch.cat(resized, dim=1))))


SHORTCUT = "shortcut"


class NDDRFusion(StageFusion):
    """The NDDR layers of a model, ``self[task][stage]`` (and ``self[task]["shortcut"]`` with the
    shortcut), so their parameters are named ``fusion.<task>.<stage>.*`` under a MultiTaskNet (what the
    parameter accounting and the model store read).

    ``tasks_sources[t]`` lists the tasks t reads, t first. A task that is only ever a source (an older
    task under one-way fusion) gets no layer and passes through unchanged. Tasks added later with
    ``add_task`` may fuse at other stages than ``stages``, and with other layer options.
    """

    kind = "NDDR"

    def __init__(
        self,
        tasks_sources: Mapping[str, Sequence[str]],
        stage_channels: Mapping[str, int],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
        shortcut: bool = False,
        init: str = "constant",
        bn: bool = True,
    ) -> None:
        super().__init__(stage_channels)
        for task, sources in tasks_sources.items():
            self.add_task(task, sources, stages, alpha, beta, shortcut, init, bn)

    def add_task(
        self,
        task: str,
        sources: Sequence[str],
        stages: Sequence[str],
        alpha: float = 0.9,
        beta: float | None = None,
        shortcut: bool = False,
        init: str = "constant",
        bn: bool = True,
    ) -> None:
        """NDDR layers for ``task`` reading ``sources`` (``task`` first) after each of ``stages``
        (``init``, ``bn``: see ``NDDRLayer``)."""
        ordered = self.check_task(task, sources, stages)
        layers: dict[str, nn.Module] = {
            s: NDDRLayer(self.stage_channels[s], len(sources), alpha, beta, init, bn) for s in ordered
        }
        if shortcut:
            layers[SHORTCUT] = NDDRShortcut([self.stage_channels[s] for s in ordered])
        self.register(task, sources, ordered, layers)

    def has_shortcut(self, task: str) -> bool:
        return task in self.sources and SHORTCUT in self[task]

    def shortcut(self, task: str, stage_features: Sequence[Tensor]) -> Tensor:
        """Task ``task``'s shortcut over its NDDR outputs, one per fusion stage in forward order."""
        return self[task][SHORTCUT](stage_features)

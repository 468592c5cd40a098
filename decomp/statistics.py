"""Streaming mean and covariance of the pre-BN (pre-activation, for VGG) responses of every reparameterized
conv, and their eigendecomposition with a deterministic sign convention (response initialization)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rcm_nddr.nn.filter_bank import reparameterized_convs

log = logging.getLogger(__name__)


@dataclass
class Decomposition:
    """The principal directions of one conv's responses: ``U`` (float64 Co x Co, columns are the
    eigenvectors), ``eigenvalues`` (float64 Co, descending), ``mean`` (float64 Co) and the number of
    response vectors ``n`` they were estimated from."""

    U: Tensor
    eigenvalues: Tensor
    mean: Tensor
    n: int


def fix_signs(vectors: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive (the first such entry on ties)."""
    # argmax returns the first index of the maximum, which settles ties deterministically
    rows = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[rows, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1
    return vectors * signs


def eigendecompose(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, signs fixed) of a symmetric matrix, in float64."""
    covariance = covariance.to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (covariance + covariance.T))
    return eigenvalues.flip(0), fix_signs(vectors.flip(1))


class ResponseStatistics:
    """Running ``n``, ``sum r`` and ``sum r r^T`` (float64) of the responses ``r = W * x`` of each
    reparameterized conv of a plain backbone, where every spatial position of every image is one
    sample in R^Co. The state is O(Co^2) per layer whatever the number of images; responses are
    never kept.

    The response is the conv's output as the forward hook sees it: for a conv with a bias (VGG, no
    BatchNorm), the pre-activation ``W * x + b``. The bias moves the mean only, so ``U`` is the same with
    or without it, and it is the ``U`` that RI rotates weight and bias by (``RCConv2d.from_conv``).

    The backbone is put in eval mode, so BatchNorm uses its running statistics (and dropout is off), as
    at inference.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone.eval()
        self.layers: list[str] = reparameterized_convs(backbone)
        if not self.layers:
            raise ValueError(f"{type(backbone).__name__} has no reparameterized convs to decompose")
        self.count: dict[str, int] = dict.fromkeys(self.layers, 0)
        self.sum: dict[str, Tensor] = {}
        self.outer: dict[str, Tensor] = {}
        self.images = 0

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Run ``images`` (B x 3 x H x W) through the backbone and add every layer's responses."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images B x C x H x W, got shape {tuple(images.shape)}")
        with self._hooks():
            self.backbone(images)
        self.images += images.shape[0]

    def _add(self, layer: str, response: Tensor) -> None:
        channels = response.shape[1]
        samples = response.detach().transpose(0, 1).reshape(channels, -1).to(torch.float64)
        if layer not in self.sum:
            self.sum[layer] = torch.zeros(channels, dtype=torch.float64, device=samples.device)
            self.outer[layer] = torch.zeros(channels, channels, dtype=torch.float64, device=samples.device)
        self.count[layer] += samples.shape[1]
        self.sum[layer] += samples.sum(dim=1)
        self.outer[layer].addmm_(samples, samples.T)

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        modules = dict(self.backbone.named_modules())
        handles = [
            modules[name].register_forward_hook(lambda _m, _i, out, name=name: self._add(name, out))
            for name in self.layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def state_nbytes(self) -> int:
        """Bytes held by the accumulators (constant once every layer has seen one batch)."""
        return sum(t.numel() * t.element_size() for d in (self.sum, self.outer) for t in d.values())

    def decompose(self) -> dict[str, Decomposition]:
        """``Sigma = E[r r^T] - mu mu^T = U diag(lambda) U^T`` per layer, in forward order, on the CPU."""
        if self.images == 0:
            raise ValueError("no responses collected yet: call update() with at least one batch of images")
        silent = [layer for layer in self.layers if self.count[layer] == 0]
        if silent:
            raise ValueError(f"the forward pass never reached the convs {', '.join(silent)}")
        out = {}
        for layer in self.layers:
            n = self.count[layer]
            mean = self.sum[layer] / n
            covariance = self.outer[layer] / n - torch.outer(mean, mean)
            eigenvalues, vectors = eigendecompose(covariance)
            out[layer] = Decomposition(U=vectors.cpu(), eigenvalues=eigenvalues.cpu(), mean=mean.cpu(), n=n)
        return out


def accumulate_responses(
    backbone: nn.Module, images: Iterable[Tensor], progress: bool = True, total: int | None = None
) -> ResponseStatistics:
    """Run ``backbone`` over batches of images (each B x 3 x H x W, moved to the backbone's device) and
    return the accumulated statistics. ``total`` (images) only sizes the progress bar."""
    stats = ResponseStatistics(backbone)
    device = next(backbone.parameters()).device
    with tqdm(total=total, unit="img", desc="responses", disable=not progress, dynamic_ncols=True) as bar:
        for batch in images:
            stats.update(batch.to(device, non_blocking=True))
            bar.update(batch.shape[0])
    if stats.images == 0:
        raise ValueError("no images to decompose the responses of")
    log.info("collected the responses of %d layers over %d images", len(stats.layers), stats.images)
    return stats


def decompose_responses(
    backbone: nn.Module, images: Iterable[Tensor], progress: bool = True, total: int | None = None
) -> dict[str, Decomposition]:
    """The decomposition per layer (forward order) of ``backbone``'s responses over batches of images."""
    return accumulate_responses(backbone, images, progress, total).decompose()

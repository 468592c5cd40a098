"""Make a decomposition file from a config's train split or from a folder of images: build the plain
pretrained backbone, stream its responses, decompose and write the file."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from rcm_nddr.config import Config
from rcm_nddr.engine.builders import build_dataset, resolve_device
from rcm_nddr.nn.backbone import ResNetBackbone, resnet_backbone
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256

from .images import ImageFolder
from .statistics import accumulate_responses
from .storage import save_decomposition

log = logging.getLogger(__name__)


def make_decomposition(
    cfg: Config,
    out: str | Path,
    max_images: int | None = None,
    progress: bool = True,
    backbone: ResNetBackbone | None = None,
    batch_size: int | None = None,
) -> Path:
    """Decompose the responses of the config's plain backbone over its train split (validation
    transforms, in split order, the first ``max_images`` only if given) and write the file to ``out``.

    ``backbone`` replaces the one built from ``cfg.backbone`` (e.g. the very bank a run trains on, so a
    randomly initialized bank matches its file); ``batch_size`` defaults to ``cfg.train.batch_size``.
    Runs on ``cfg.train.device``."""
    if backbone is None:
        b = cfg.backbone
        backbone = resnet_backbone(b.arch, weights=b.weights, output_stride=b.output_stride)
    dataset = build_dataset(cfg, cfg.dataset.train_split, train=False)
    meta = {
        "arch": cfg.backbone.arch,
        "weights": cfg.backbone.weights,
        "output_stride": backbone.output_stride,
        "source": f"{cfg.dataset.root} split {cfg.dataset.train_split} (config {cfg.source})",
    }
    device = resolve_device(cfg.train.device)
    return _decompose(
        backbone.to(device),
        _limit(dataset, max_images),
        out,
        meta,
        batch_size or cfg.train.batch_size,
        cfg.train.num_workers,
        progress,
    )


def decompose_folder(
    images: str | Path,
    out: str | Path,
    arch: str = "resnet18",
    weights: str = "none",
    output_stride: int = 16,
    size: Sequence[int] = (128, 128),
    max_images: int | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Decompose the responses of ``arch`` with ``weights`` (``none``, ``torchvision`` or a state dict
    path) over the .png/.jpg images under ``images``, each resized and center-cropped to ``size``."""
    backbone = resnet_backbone(arch, weights=weights, output_stride=output_stride)
    folder = ImageFolder(images, (int(size[0]), int(size[1])))
    meta = {
        "arch": arch,
        "weights": weights,
        "output_stride": output_stride,
        "source": f"{folder.root} at {size[0]}x{size[1]}",
    }
    device_ = resolve_device(device)
    return _decompose(backbone.to(device_), _limit(folder, max_images), out, meta, batch_size, num_workers, progress)


def _limit(dataset: Dataset, max_images: int | None) -> Dataset:
    if max_images is not None and max_images <= 0:
        raise ValueError(f"max_images must be positive, got {max_images}")
    if max_images is None or max_images >= len(dataset):
        return dataset
    return Subset(dataset, range(max_images))


def _decompose(
    backbone: ResNetBackbone,
    dataset: Dataset,
    out: str | Path,
    meta: dict[str, Any],
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> Path:
    out = Path(out)
    sha256 = filter_bank_sha256(bank_weights(backbone))
    log.info(
        "decomposing the responses of %s (filter bank sha256 %s) over %d images -> %s",
        meta["arch"],
        sha256[:12],
        len(dataset),
        out,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_images,
        pin_memory=next(backbone.parameters()).is_cuda,
    )
    start = time.perf_counter()
    stats = accumulate_responses(backbone, _stack_same_size(loader), progress=progress, total=len(dataset))
    decomposition = stats.decompose()
    save_decomposition(out, decomposition, {**meta, "filter_bank_sha256": sha256, "images": stats.images})
    log.info(
        "wrote the decomposition of %d layers (%d images, %.1f s) to %s",
        len(decomposition),
        stats.images,
        time.perf_counter() - start,
        out,
    )
    return out


def _collate_images(samples: list[Any]) -> list[Tensor]:
    """Keep the images of a batch (a sample dict's ``image`` or a bare tensor), unstacked."""
    return [s["image"] if isinstance(s, dict) else s for s in samples]


def _stack_same_size(batches: Iterable[list[Tensor]]) -> Iterator[Tensor]:
    """Stack each run of consecutive same-size images into one batch, so images of mixed sizes work."""
    for images in batches:
        group = [images[0]]
        for image in images[1:]:
            if image.shape == group[0].shape:
                group.append(image)
            else:
                yield torch.stack(group)
                group = [image]
        yield torch.stack(group)

"""Make a decomposition file from a dataset or from a folder of images: stream the responses of a plain
pretrained backbone, decompose them and write the file (``rcm_nddr.engine.builders.make_decomposition``
does it for a config's train split)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rcm_nddr.decomp.images import ImageFolder
from rcm_nddr.decomp.statistics import accumulate_responses
from rcm_nddr.decomp.storage import save_decomposition
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from rcm_nddr.nn.backbone import plain_backbone
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256

log = logging.getLogger(__name__)


def decompose_folder(
    images: str | Path,
    out: str | Path,
    arch: str = "resnet18",
    weights: str = "none",
    output_stride: int | None = None,
    size: Sequence[int] = (128, 128),
    max_images: int | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Path:
    """Decompose the responses of ``arch`` (any of ``rcm_nddr.nn.backbone.ARCHS``) with ``weights`` (``none``,
    ``torchvision`` or a state dict path) over the .png/.jpg images under ``images``, each resized and
    center-cropped to ``size``. ``output_stride`` None is the arch's default (16, or 8 for vgg16)."""
    backbone = plain_backbone(arch, weights=weights, output_stride=output_stride)
    folder = ImageFolder(images, (int(size[0]), int(size[1])))
    meta = {
        "arch": arch,
        "weights": weights,
        "output_stride": backbone.output_stride,
        "source": f"{folder.root} at {size[0]}x{size[1]}",
    }
    folder_ = limit(folder, max_images)
    return decompose_dataset(backbone.to(device), folder_, out, meta, batch_size, num_workers, progress)


def limit(dataset: Dataset, max_images: int | None) -> Dataset:
    if max_images is not None and max_images <= 0:
        raise ValueError(f"max_images must be positive, got {max_images}")
    if max_images is None or max_images >= len(dataset):
        return dataset
    return Subset(dataset, range(max_images))


def decompose_dataset(
    backbone: nn.Module,
    dataset: Dataset,
    out: str | Path,
    meta: dict[str, Any],
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> Path:
    """Decompose ``backbone``'s responses over the images of ``dataset`` (sample dicts or image tensors)
    and write them with ``meta`` to ``out``."""
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

"""The int8 calibration set a model store keeps (``ModelStore.add_calibration``): training crops as the
training transform makes them (a fixed seed per crop), recorded at the first registration into a store."""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rcm_nddr.config import Config
from rcm_nddr.engine.evaluate import denormalize
from rcm_nddr.store import ModelStore

log = logging.getLogger(__name__)

#: at most this many crops, and at most this many bytes of them (uint8): a few hundred crops of the
#: demo's 128 x 128, fewer of larger crops
CALIBRATION_IMAGES = 256
CALIBRATION_BYTES = 32 * 2**20


def calibration_crops(dataset: Dataset, count: int = CALIBRATION_IMAGES, budget: int = CALIBRATION_BYTES) -> Tensor:
    """uint8 RGB crops (N x 3 x H x W) of the first samples of a training ``dataset`` (the training
    transform drawn from seed i for sample i, so the same crops on every machine), at most ``count`` of
    them and ``budget`` bytes."""
    first = dataset[(0, 0)]["image"]
    n = max(1, min(count, len(dataset), budget // first.numel()))
    images = [first] + [dataset[(i, i)]["image"] for i in range(1, n)]
    return denormalize(torch.stack(images))


def keep_calibration_set(cfg: Config, store: ModelStore, dataset: Dataset) -> None:
    """Record the calibration set of ``store`` from ``dataset`` (the config's training split) when the store
    keeps none yet; a store keeps the set of the first group that registers into it."""
    if store.calibration_images() is not None:
        return
    crops = calibration_crops(dataset)
    source = f"{cfg.dataset.name} {cfg.dataset.train_split}: the first {len(crops)} samples as training crops"
    store.add_calibration(crops, source)

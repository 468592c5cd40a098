"""Pretraining a filter bank offline: a plain ResNet shared by several tasks (one head each) trained
jointly on SYNTH_MT, exported as a torchvision-format state dict usable as ``backbone.weights``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.files import atomic_write

log = logging.getLogger(__name__)


def default_output(cfg: Config) -> Path:
    return Path(cfg.store) / f"{cfg.backbone.arch}_bank.pth"


def pretrain(cfg: Config, out: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Train the config's tasks on one shared plain backbone and write its weights to ``out``
    (``.safetensors``, else a torch file loadable with ``weights_only=True``)."""
    if cfg.backbone.reparam != "none":
        raise ConfigError(f"{cfg.source}: key 'backbone.reparam': pretraining trains plain convs, set it to none")
    out = Path(out) if out is not None else default_output(cfg)
    trainer = Trainer(cfg, overwrite=overwrite, progress=progress, shared_backbone=True)
    trainer.fit()
    state = {k: v.detach().to("cpu").contiguous() for k, v in trainer.model.backbone.net.state_dict().items()}
    if out.suffix == ".safetensors":
        atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"arch": cfg.backbone.arch}))
    else:
        atomic_write(out, lambda tmp: torch.save(state, tmp))
    log.info("pretrained %s backbone written to %s", cfg.backbone.arch, out)
    return out

"""Pretraining a filter bank offline: one backbone shared by several tasks (one head each) trained
jointly on SYNTH_MT, exported as a state dict usable as ``backbone.weights``: a plain network
(torchvision names, ``reparam: none``) or a network in RC form (``reparam: rc``: every reparameterized conv
as a bank ``Ws`` and a modulator ``Wt`` trained together, named as the official RCM models), which the RC
variant starts from."""

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
    """Train the config's tasks on one shared backbone (plain, or in RC form with ``reparam: rc``) and write
    its weights to ``out`` (``.safetensors``, else a torch file loadable with ``weights_only=True``)."""
    b = cfg.backbone
    if b.reparam not in ("none", "rc"):
        raise ConfigError(
            f"{cfg.source}: key 'backbone.reparam': pretraining trains plain convs (none) or convs in RC form "
            f"(rc), not {b.reparam}"
        )
    if b.reparam == "rc" and (b.ri or b.nff):
        raise ConfigError(
            f"{cfg.source}: key 'backbone.{'ri' if b.ri else 'nff'}': pretraining in RC form trains each conv's "
            "bank and modulator together (from plain weights: modulator = identity); set backbone.ri and "
            "backbone.nff to false"
        )
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

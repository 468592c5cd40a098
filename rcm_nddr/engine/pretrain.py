"""Pretraining a filter bank offline: one backbone shared by several tasks (one head each) trained
jointly on SYNTH_MT, exported as a state dict usable as ``backbone.weights``: a plain network
(torchvision names, ``reparam: none``) or a network in RC form (``reparam: rc``: every reparameterized conv
as a bank ``Ws`` and a modulator ``Wt`` trained together, named as the official RCM models), which the RC
variant starts from."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.engine.evaluate import to_json
from rcm_nddr.engine.provenance import config_sha256
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.files import atomic_write, atomic_write_text, file_sha256

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
        atomic_write(out, lambda tmp: save_state(state, tmp))
    write_recipe(cfg, out, trainer.iteration, trainer.last_metrics)
    log.info("pretrained %s backbone written to %s (recipe: %s)", cfg.backbone.arch, out, recipe_path(out))
    return out


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` of ``state`` whose bytes depend on the tensors only: saved to a path, torch names the
    archive's folder after the file (here a random temporary name), which would give one bank a new sha256,
    and so new study cells, every time it is written."""
    with open(path, "wb") as f:
        torch.save(state, f)


def recipe_path(bank: str | Path) -> Path:
    """The JSON next to a pretrained bank that says how it was made: ``<bank stem>.json``."""
    bank = Path(bank)
    return bank.with_name(bank.stem + ".json")


def write_recipe(cfg: Config, bank: Path, iterations: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Record how ``bank`` was made (resolved config, data, iterations, last validation, its sha256), so a
    bank found on disk says whether it is the quick one of the demo or the full recipe."""
    meta = Path(cfg.dataset.root) / "meta.json"
    try:
        data = json.loads(meta.read_text())
        dataset = {"root": str(cfg.dataset.root), "splits": data.get("splits"), "seed": data.get("seed")}
    except (OSError, ValueError):
        dataset = {"root": str(cfg.dataset.root)}
    recipe = {
        "bank": bank.name,
        "sha256": file_sha256(bank),
        "config": str(cfg.source),
        "config_sha256": config_sha256(cfg),
        "tasks": list(cfg.tasks),
        "iterations": int(iterations),
        "batch_size": cfg.train.batch_size,
        "dataset": dataset,
        "validation": metrics,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resolved_config": cfg.to_dict(),
    }
    atomic_write_text(recipe_path(bank), to_json(recipe, indent=2))
    return recipe


def read_recipe(bank: str | Path) -> dict[str, Any] | None:
    """The recipe of ``bank`` when it is there and belongs to this file (sha256), else None."""
    try:
        recipe = json.loads(recipe_path(bank).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recipe, dict) or recipe.get("sha256") != file_sha256(bank):
        return None
    return recipe


def describe_bank(bank: str | Path, recipe: dict[str, Any] | None = None) -> str:
    """One line on a bank's recipe for logs: its iterations, tasks and data, or that it has none. ``recipe``:
    the bank's ``read_recipe`` when the caller has it (read here otherwise)."""
    recipe = recipe if recipe is not None else read_recipe(bank)
    if recipe is None:
        return f"{bank} (no recipe file {recipe_path(bank).name} for this file: how it was made is unknown)"
    d = recipe.get("dataset", {})
    train = (d.get("splits") or {}).get("train")
    return (
        f"{bank} ({recipe['iterations']} iterations of {'+'.join(recipe['tasks'])}, batch {recipe['batch_size']}, "
        f"on {d.get('root')}{f' ({train} train images)' if train else ''})"
    )

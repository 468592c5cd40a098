"""Build the run's components from a validated config: tasks, datasets, model, optimizer, schedule."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError, OptimizerConfig, SchedulerConfig
from ..data.transforms import build_transforms
from ..model import MultiTaskNet
from ..nn.backbone import STAGES, ResNetBackbone, SharedBackbone, TaskBackbones, resnet_backbone
from ..nn.filter_bank import bank_weights, filter_bank_sha256
from ..nn.heads import DeepLabV3PlusHead
from ..nn.nddr import NDDRFusion
from ..nn.rc import RCResNet
from ..registry import DATASETS, TASKS, RegistryError, discover
from ..task import DatasetInfo, Task

log = logging.getLogger(__name__)


def _discover(cfg: Config) -> None:
    try:
        discover(cfg.plugins)
    except RegistryError as exc:
        raise ConfigError(f"{cfg.source}: key 'plugins': {exc}") from exc


def task_classes(cfg: Config) -> dict[str, type[Task]]:
    """The task type of every task of the run (task name = task type name)."""
    _discover(cfg)
    out = {}
    for name in cfg.tasks:
        try:
            out[name] = TASKS.get(name)
        except RegistryError as exc:
            raise ConfigError(f"{cfg.source}: key 'tasks': {exc}") from exc
    return out


def build_dataset(cfg: Config, split: str, train: bool):
    """The config's dataset for ``split`` with training or validation transforms."""
    _discover(cfg)
    try:
        dataset_cls = DATASETS.get(cfg.dataset.name)
    except RegistryError as exc:
        raise ConfigError(f"{cfg.source}: key 'dataset.name': {exc}") from exc
    targets = sorted({cls.target_key for cls in task_classes(cfg).values()})
    return dataset_cls(
        root=cfg.dataset.root,
        split=split,
        targets=targets,
        transform=build_transforms(train, cfg.dataset.crop, cfg.dataset.scales, cfg.dataset.flip),
    )


def build_tasks(cfg: Config, info: DatasetInfo) -> dict[str, Task]:
    """Instantiate each task with its options from ``loss.<name>`` (all keys but ``weight``)."""
    tasks = {}
    for name, cls in task_classes(cfg).items():
        options = {k: v for k, v in cfg.loss.get(name, {}).items() if k != "weight"}
        try:
            inspect.signature(cls).bind(name, info, **options)
        except TypeError as exc:
            raise ConfigError(
                f"{cfg.source}: key 'loss.{name}': {exc} (options of task type {name!r}: "
                f"{', '.join(list(inspect.signature(cls).parameters)[2:]) or 'none'})"
            ) from exc
        tasks[name] = cls(name, info, **options)
    return tasks


def loss_weights(cfg: Config, tasks: dict[str, Task]) -> dict[str, float]:
    return {name: float(cfg.loss.get(name, {}).get("weight", task.default_loss_weight)) for name, task in tasks.items()}


def build_backbone(cfg: Config, task_names: list[str], shared: bool = False) -> nn.Module:
    """The multi-task backbone of ``backbone.reparam``: ``none`` gives every task its own fully trained
    ResNet (or one shared ResNet with ``shared``, for pretraining); ``rc`` a frozen filter bank from
    ``backbone.weights`` with per-task modulators, RI from ``backbone.decomposition`` when ``ri``."""
    b = cfg.backbone

    def plain() -> ResNetBackbone:
        return resnet_backbone(b.arch, weights=b.weights, output_stride=b.output_stride)

    if b.reparam == "rc":
        net = plain()
        decomposition = load_ri(cfg, net) if b.ri else None
        return RCResNet(net, task_names, decomposition, nff=b.nff)
    if shared:
        return SharedBackbone(plain())
    return TaskBackbones({name: plain() for name in task_names})


def decomposition_path(cfg: Config) -> Path:
    """``backbone.decomposition``, or ``<store>/ri.safetensors`` when the config names none."""
    if cfg.backbone.decomposition is not None:
        return Path(cfg.backbone.decomposition)
    return Path(cfg.store) / "ri.safetensors"


def load_ri(cfg: Config, net: ResNetBackbone) -> dict[str, torch.Tensor]:
    """The eigenvectors U of every reparameterized conv, from ``decomposition_path(cfg)`` (made from
    the train split when the file is missing), checked against this filter bank's sha256."""
    from decomp import load_decomposition, make_decomposition

    path = decomposition_path(cfg)
    if not path.is_file():
        log.info("decomposition %s is missing: computing it from %s", path, cfg.dataset.train_split)
        make_decomposition(cfg, path, backbone=net)
    layers, _ = load_decomposition(path, expected_bank_sha256=filter_bank_sha256(bank_weights(net)))
    return {name: d.U for name, d in layers.items()}


def build_fusion(cfg: Config, task_names: list[str], stage_channels: dict[str, int]) -> NDDRFusion | None:
    """``fusion.type: nddr``: every task of the group reads all the group's tasks (itself first, then
    the others in config order) at ``fusion.stages``; None for ``fusion.type: none``."""
    f = cfg.fusion
    if f.type == "none":
        return None
    if f.shortcut:
        raise ConfigError(f"{cfg.source}: key 'fusion.shortcut': the NDDR shortcut is not implemented; set it to false")
    # Sources already in the model store (older groups, read one-way) come with the store; until then
    # the only sources are the group's own tasks.
    if f.sources != "all":
        raise ConfigError(f"{cfg.source}: key 'fusion.sources': expected 'all' (the group's tasks), got {f.sources!r}")
    bad = [s for s in f.stages if s not in STAGES]
    if bad or len(set(f.stages)) != len(f.stages):
        raise ConfigError(
            f"{cfg.source}: key 'fusion.stages': expected distinct stages out of {list(STAGES)}, got {f.stages}"
        )
    sources = {t: [t, *(o for o in task_names if o != t)] for t in task_names}
    return NDDRFusion(sources, stage_channels, f.stages, alpha=f.alpha, beta=f.beta)


def build_model(cfg: Config, tasks: dict[str, Task], shared: bool = False) -> MultiTaskNet:
    """The config's backbone, its fusion (``fusion.type``) and one DeepLabv3+ head per task."""
    backbone = build_backbone(cfg, list(tasks), shared=shared)
    fusion = build_fusion(cfg, list(tasks), backbone.stage_channels)
    heads = {
        name: DeepLabV3PlusHead(
            high_channels=backbone.stage_channels["layer4"],
            low_channels=backbone.stage_channels["layer1"],
            out_channels=task.out_channels,
            channels=cfg.head.channels,
            output_stride=cfg.backbone.output_stride,
        )
        for name, task in tasks.items()
    }
    return MultiTaskNet(tasks, backbone, heads, fusion)


_OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay),
}

# Learning-rate multipliers as a function of (scheduler config, iteration, fraction of training done).
_SCHEDULES: dict[str, Callable[[SchedulerConfig, int, float], float]] = {
    "poly": lambda s, it, progress: (1.0 - progress) ** s.power,
    "cosine": lambda s, it, progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "step": lambda s, it, progress: s.gamma ** sum(it >= m for m in s.milestones),
    "constant": lambda s, it, progress: 1.0,
}


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer over every trainable parameter of ``model``. The fusion's parameters (if
    any) form a second group with ``lr * fusion.lr_mult`` and ``fusion.weight_decay``; the schedule
    scales both groups alike, so the ratio holds throughout."""
    fusion = getattr(model, "fusion", None)
    fused = [] if fusion is None else [p for p in fusion.parameters() if p.requires_grad]
    held = {id(p) for p in fused}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    groups = [{"params": rest}]
    if fused:
        f = cfg.fusion
        groups.append({"params": fused, "lr": cfg.optimizer.lr * f.lr_mult, "weight_decay": f.weight_decay})
    return _OPTIMIZERS[cfg.optimizer.name](groups, cfg.optimizer)


def lr_factor(cfg: Config, max_iters: int) -> Callable[[int], float]:
    """The learning-rate multiplier at iteration ``it`` (the schedule is stepped once per iteration)."""
    s = cfg.scheduler
    shape = _SCHEDULES[s.name]

    def schedule(it: int) -> float:
        f = shape(s, it, min(it, max_iters) / max_iters)
        if s.warmup_iters and it < s.warmup_iters:
            f *= (it + 1) / s.warmup_iters
        return f

    return schedule


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, max_iters: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_iters))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'train.device': {name!r} asked for but no CUDA device is available")
    return device

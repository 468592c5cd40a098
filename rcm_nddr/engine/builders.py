"""Build the run's components from a validated config: tasks, datasets, model, optimizer, schedule."""

from __future__ import annotations

import inspect
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcm_nddr.config import Config, ConfigError, OptimizerConfig, SchedulerConfig
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.decomp import decompose_dataset, limit, load_decomposition
from rcm_nddr.engine.plan import GroupPlan
from rcm_nddr.files import atomic_write, file_sha256
from rcm_nddr.nn.accounting import owned_by
from rcm_nddr.nn.assembly import (
    AssemblyError,
    TaskSpec,
    build_head,
    build_network,
    dataset_description,
    load_task_tensors,
    plugin_paths,
)
from rcm_nddr.nn.backbone import SharedBackbone, plain_backbone, rc_form_of
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.rc_vgg import rc_backbone
from rcm_nddr.nn.weights import RCForm, WeightsError, factorize
from rcm_nddr.registry import DATASETS, TASKS, RegistryError, discover, options_error
from rcm_nddr.store import ModelStore, StoreError
from rcm_nddr.task import DatasetInfo, Task

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
    """The config's dataset for ``split`` with training or validation transforms. A validation set whose class
    takes ``evaluation`` gets the run's evaluation switches by target key (e.g. PASCAL's edge ground truth)."""
    _discover(cfg)
    try:
        dataset_cls = DATASETS.get(cfg.dataset.name)
    except RegistryError as exc:
        raise ConfigError(f"{cfg.source}: key 'dataset.name': {exc}") from exc
    classes = task_classes(cfg)
    targets = sorted({cls.target_key for cls in classes.values()})
    options = dict(cfg.dataset.options)
    error = options_error(dataset_cls, (cfg.dataset.root, split, targets, None), options)
    if error:
        raise ConfigError(f"{cfg.source}: key 'dataset.options' of dataset {cfg.dataset.name!r}: {error}")
    if not train:
        options.update(dataset_evaluation(dataset_cls, classes, cfg.protocol, cfg.evaluation))
    return dataset_cls(
        root=cfg.dataset.root,
        split=split,
        targets=targets,
        transform=build_transforms(train, cfg.dataset.crop, cfg.dataset.scales, cfg.dataset.flip),
        **options,
    )


def dataset_evaluation(
    dataset_cls: type, classes: Mapping[str, type[Task]], protocol: str, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"evaluation": {target key: switches}}`` for a dataset class that makes a target differently under
    some evaluation switch (PASCAL's edges: it takes ``evaluation``), else ``{}``: the switches of each task
    (``classes``: task name -> type) under ``protocol``, then ``overrides[task name]``."""
    if "evaluation" not in inspect.signature(dataset_cls).parameters:
        return {}
    return {
        "evaluation": {
            cls.target_key: {**cls.protocol_switches(protocol), **overrides.get(name, {})}
            for name, cls in classes.items()
        }
    }


def build_tasks(cfg: Config, info: DatasetInfo) -> dict[str, Task]:
    """Instantiate each task with its options from ``loss.<name>`` (all keys but ``weight``), its metric
    following ``evaluation.protocol`` and the switches of ``evaluation.<name>``."""
    tasks = {}
    for name, cls in task_classes(cfg).items():
        options = {k: v for k, v in cfg.loss.get(name, {}).items() if k != "weight"}
        error = options_error(cls, (name, info), options)
        if error:
            raise ConfigError(f"{cfg.source}: key 'loss.{name}' of task type {name!r}: {error}")
        tasks[name] = cls(name, info, **options)
        try:
            tasks[name].configure_evaluation(cfg.protocol, cfg.evaluation.get(name))
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: key 'evaluation.{name}': {exc}") from exc
    return tasks


def loss_weights(cfg: Config, tasks: dict[str, Task]) -> dict[str, float]:
    return {name: float(cfg.loss.get(name, {}).get("weight", task.default_loss_weight)) for name, task in tasks.items()}


def pretrained_backbone(cfg: Config) -> nn.Module:
    """The plain backbone of ``backbone.weights``: the filter bank's source and the starting point of a
    new task's BatchNorm and downsample copies (or, with ``reparam: none``, of its whole backbone)."""
    b = cfg.backbone
    return plain_backbone(b.arch, weights=b.weights, output_stride=b.output_stride)


def rc_start(cfg: Config, net: nn.Module) -> RCForm | None:
    """The network pretrained in RC form that ``backbone.weights`` holds when an ``rc`` run starts from it
    (the RCM paper's RC variant: the bank is its ``Ws``, every task's modulators start at its ``Wt``);
    None otherwise. Its convs must be the reparameterized convs of ``net``; RI does not combine with it."""
    b = cfg.backbone
    form = rc_form_of(b.weights) if b.reparam == "rc" else None
    if form is None:
        return None
    if b.ri:
        raise ConfigError(
            f"{cfg.source}: key 'backbone.ri': backbone.weights {b.weights} holds a network pretrained in RC form "
            "(bank and modulators), whose modulators start every task: set backbone.ri to false (the RC variant)"
        )
    expected = set(bank_weights(net))
    if set(form.bank) != expected:
        missing, unexpected = sorted(expected - set(form.bank)), sorted(set(form.bank) - expected)
        raise WeightsError(
            f"weights {b.weights}: its RC-form convs do not fit {b.arch}'s reparameterized convs: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    return form


def make_decomposition(
    cfg: Config,
    out: str | Path,
    max_images: int | None = None,
    progress: bool = True,
    backbone: nn.Module | None = None,
    batch_size: int | None = None,
) -> Path:
    """Decompose the responses of the config's plain backbone over its train split (validation
    transforms, in split order, the first ``max_images`` only if given) and write the file to ``out``.

    ``backbone`` replaces the one built from ``cfg.backbone`` (e.g. the very bank a run trains on, so a
    randomly initialized bank matches its file); ``batch_size`` defaults to ``cfg.train.batch_size``.
    Runs on ``cfg.train.device``."""
    if backbone is None:
        backbone = pretrained_backbone(cfg)
    dataset = build_dataset(cfg, cfg.dataset.train_split, train=False)
    meta = {
        "arch": cfg.backbone.arch,
        "weights": cfg.backbone.weights,
        "output_stride": backbone.output_stride,
        "source": f"{cfg.dataset.root} split {cfg.dataset.train_split} (config {cfg.source})",
    }
    device = resolve_device(cfg.train.device)
    return decompose_dataset(
        backbone.to(device),
        limit(dataset, max_images),
        out,
        meta,
        batch_size or cfg.train.batch_size,
        cfg.train.num_workers,
        progress,
    )


def decomposition_path(cfg: Config) -> Path:
    """``backbone.decomposition``, or ``<store>/ri.safetensors`` when the config names none."""
    if cfg.backbone.decomposition is not None:
        return Path(cfg.backbone.decomposition)
    return Path(cfg.store) / "ri.safetensors"


@dataclass
class ResponseInit:
    """The RI of a run: the eigenvectors U of every reparameterized conv (None without ``rc`` + ``ri``)
    and their decomposition file. ``content`` holds the file's bytes while a decomposition this build
    computed is not written yet (``write()`` does it, when the run starts)."""

    eigenvectors: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    content: bytes | None = field(default=None, repr=False)

    def write(self) -> None:
        """Write a computed decomposition to ``path`` (atomically; nothing to do when the file was read)."""
        content = self.content
        if content is None or self.path is None:
            return
        atomic_write(self.path, lambda tmp: tmp.write_bytes(content))
        log.info("decomposition written to %s", self.path)
        self.content = None


def resolve_ri(cfg: Config, net: nn.Module, store: ModelStore | None = None) -> ResponseInit:
    """The run's RI, without writing anything. A store that records a decomposition provides it (a config
    naming a different existing file is refused with both sha256s); otherwise ``decomposition_path(cfg)``,
    computed from the train split when missing and held in memory until ``write()``. The file must
    belong to this bank (sha256)."""
    b = cfg.backbone
    if b.reparam != "rc" or not b.ri:
        return ResponseInit()
    rc_start(cfg, net)  # refuses RI over a network pretrained in RC form, before any decomposition is made
    stored = store.decomposition_path if store is not None and store.exists else None
    if stored is not None:
        named = Path(b.decomposition) if b.decomposition is not None else None
        if named is not None and named.is_file() and named.resolve() != stored.resolve():
            named_sha, stored_sha = file_sha256(named), file_sha256(stored)
            if named_sha != stored_sha:
                raise StoreError(
                    f"{cfg.source}: key 'backbone.decomposition': {named} (sha256 {named_sha}) is not the "
                    f"decomposition of the store {stored} (sha256 {stored_sha}); a store holds one decomposition"
                )
        path = stored
    else:
        path = decomposition_path(cfg)
    bank_sha256 = filter_bank_sha256(bank_weights(net))
    if path.is_file():
        layers, _ = load_decomposition(path, expected_bank_sha256=bank_sha256)
        return ResponseInit({name: d.U for name, d in layers.items()}, path)
    log.info("decomposition %s is missing: computing it from %s", path, cfg.dataset.train_split)
    # decomp writes files only: the file is made in a scratch directory and kept in memory, so nothing next
    # to the store exists before the run starts. Its data loader draws from the global RNG: without the
    # fork, a run that makes the file would initialize its tasks differently from the same run finding it.
    with tempfile.TemporaryDirectory(prefix="rcm-nddr-ri-") as scratch, torch.random.fork_rng(devices=[]):
        made = make_decomposition(cfg, Path(scratch) / path.name, backbone=net)
        layers, _ = load_decomposition(made, expected_bank_sha256=bank_sha256)
        content = made.read_bytes()
    return ResponseInit({name: d.U for name, d in layers.items()}, path, content)


def load_ri(
    cfg: Config, net: nn.Module, store: ModelStore | None = None
) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    """``resolve_ri`` with the file written when it was computed: the eigenvectors and their file."""
    ri = resolve_ri(cfg, net, store)
    ri.write()
    return ri.eigenvectors, ri.path


def bank_as_used(cfg: Config, net: nn.Module, decomposition: dict[str, torch.Tensor] | None) -> dict:
    """The filter bank the convs compute with: the pretrained conv weights, rotated to ``U^T W`` by RI, or
    the ``Ws`` of a network pretrained in RC form."""
    if cfg.backbone.reparam == "rc":
        start = rc_start(cfg, net)
        if start is not None:
            return {name: w.detach().float() for name, w in start.bank.items()}
        return rc_backbone(net, [], decomposition).filter_bank()
    return {name: w.detach() for name, w in bank_weights(net).items()}


def open_store(
    cfg: Config,
    net: nn.Module,
    decomposition: dict[str, torch.Tensor] | None,
    decomposition_file: Path | None,
    decomposition_content: bytes | None = None,
) -> ModelStore:
    """The config's model store, created with this bank and decomposition (``decomposition_content``,
    else the file) when missing; an existing store with another backbone or bank is refused with both
    sha256s named."""
    b = cfg.backbone
    return ModelStore.create(
        cfg.store,
        b.arch,
        b.weights,
        bank_as_used(cfg, net, decomposition),
        decomposition_file=decomposition_file,
        reparam=b.reparam,
        ri=b.reparam == "rc" and b.ri,
        output_stride=b.output_stride,
        source_bank_sha256=filter_bank_sha256(bank_weights(net)),
        exist_ok=True,
        decomposition_content=decomposition_content,
    )


def check_store_backbone(cfg: Config, store: ModelStore, net: nn.Module) -> None:
    """The cheap checks of an existing store against the config, before any decomposition is computed."""
    if store.exists:
        b = cfg.backbone
        store.check_backbone(
            b.arch,
            b.reparam,
            b.reparam == "rc" and b.ri,
            b.output_stride,
            b.weights,
            filter_bank_sha256(bank_weights(net)),
        )


def config_spec(cfg: Config, name: str, task: Task, sources: list[str]) -> TaskSpec:
    """The description of a new task of the config's group (what its store record keeps)."""
    f, h = cfg.fusion, cfg.head
    fusion = {"type": f.type, "stages": list(f.stages), "alpha": f.alpha, "beta": f.beta}
    if f.type == "nddr":
        fusion.update(shortcut=f.shortcut, init=f.init, bn=f.bn)
    return TaskSpec(
        name=name,
        type=name,
        nff=cfg.backbone.reparam == "rc" and cfg.backbone.nff,
        head_channels=h.channels,
        head_type=h.type,
        head_dropout=h.dropout,
        head_init=h.init,
        sources=list(sources),
        fusion=fusion if (sources or f.sources == "own") and f.type != "none" else {},
        trunk=cfg.tasks[0] if cfg.backbone.sharing == "shared" and name != cfg.tasks[0] else None,
        modulators_of=cfg.tasks[0] if cfg.backbone.shared_modulators and name != cfg.tasks[0] else None,
        options={k: v for k, v in cfg.loss.get(name, {}).items() if k != "weight"},
        plugins=plugin_paths(cfg.plugins),
        dataset=dataset_description(task.info),
    )


def build_model(
    cfg: Config,
    tasks: dict[str, Task],
    shared: bool = False,
    store: ModelStore | None = None,
    plan: GroupPlan | None = None,
    net: nn.Module | None = None,
    decomposition: dict[str, torch.Tensor] | None = None,
    for_checkpoint: bool = False,
) -> MultiTaskNet:
    """The config's group: its backbone (``backbone.reparam``), NDDR fusion per ``plan`` and one
    DeepLabv3+ head per task. With a ``store``, its filter bank replaces the config's and the stored tasks
    of ``plan.frozen`` are loaded frozen. ``shared`` trains one backbone shared by the tasks (pretraining;
    with ``reparam: rc`` in RC form, ``factorize``). ``net`` and ``decomposition`` default to those of
    ``backbone.weights``; weights in RC form give the bank and the modulators' start (``rc_start``).
    ``for_checkpoint``: a checkpoint's state dict will be loaded over every weight, so no RI is made."""
    net = pretrained_backbone(cfg) if net is None else net
    if shared:
        if cfg.backbone.reparam == "rc":  # pretraining in RC form: bank and modulators train together
            net = factorize(net, rc_form_of(cfg.backbone.weights))
        backbone = SharedBackbone(net)
        heads = {name: build_head(backbone, task, cfg.head.channels) for name, task in tasks.items()}
        return MultiTaskNet(tasks, backbone, heads)
    start = None if for_checkpoint else rc_start(cfg, net)
    if start is not None:
        decomposition = start.modulators
        log.info("the modulators start from the RC-form network %s", cfg.backbone.weights)
    elif decomposition is None and cfg.backbone.reparam == "rc" and cfg.backbone.ri and not for_checkpoint:
        decomposition, _ = load_ri(cfg, net, store)
    plan = plan or GroupPlan()
    records = store.tasks if store is not None and store.exists else []
    by_name = {r.name: r for r in records}
    missing = [n for n in plan.frozen if n not in by_name]
    if missing:
        raise StoreError(f"the store {cfg.store} no longer registers {missing}, which this group reads")
    specs = [TaskSpec.from_record(by_name[n]) for n in plan.frozen]
    specs += [config_spec(cfg, name, task, plan.sources.get(name, [])) for name, task in tasks.items()]
    bank = store.filter_bank() if store is not None and store.exists else None
    if bank is None and start is not None:
        bank = start.bank
    try:
        model = build_network(
            cfg.backbone.reparam, net, specs, tasks, frozen=plan.frozen, decomposition=decomposition, bank=bank
        )
        if plan.frozen:
            load_task_tensors(model, {n: store.load_task_tensors(n) for n in plan.frozen})
    except AssemblyError as exc:
        raise StoreError(f"{store.store_file if store is not None else cfg.source}: {exc}") from exc
    if cfg.backbone.init_from is not None and not for_checkpoint:
        init_from_store(cfg, model, list(tasks))
    if cfg.backbone.train_encoder != "all":
        model.freeze_encoder(list(tasks), keep_batchnorm=cfg.backbone.train_encoder == "norm")
    return model


def init_from_store(cfg: Config, model: MultiTaskNet, names: list[str]) -> None:
    """Start each of ``names`` from the same-named task of the store ``backbone.init_from``: every tensor of
    its encoder and head (not its fusion), which must fit the new task's exactly (same arch, reparam and
    head)."""
    key = "backbone.init_from"
    source = ModelStore(cfg.backbone.init_from)
    if not source.exists:
        raise ConfigError(f"{cfg.source}: key '{key}': {source.path} is not a model store")
    available = {r.name for r in source.tasks}
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(
            f"{cfg.source}: key '{key}': the store {source.path} has no task {missing} to start from "
            f"(it has {sorted(available) or 'none'})"
        )
    state = model.state_dict()
    for name in names:
        wanted = {k for k in state if owned_by(k, name) and not k.startswith("fusion.")}
        given = {k: v for k, v in source.load_task_tensors(name).items() if not k.startswith("fusion.")}
        differ = sorted(k for k in wanted & set(given) if given[k].shape != state[k].shape)
        if set(given) != wanted or differ:
            raise ConfigError(
                f"{cfg.source}: key '{key}': task '{name}' of {source.path} does not fit this run's '{name}' "
                f"(missing {sorted(wanted - set(given))[:3]}, unexpected {sorted(set(given) - wanted)[:3]}, "
                f"other shapes {differ[:3]}); it needs the same backbone, reparam and head"
            )
        model.load_state_dict(given, strict=False)
        log.info("task %s starts from task %s of %s", name, name, source.path)


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


def build_optimizer(cfg: Config, model: nn.Module, extra: Sequence[dict] = ()) -> torch.optim.Optimizer:
    """The config's optimizer over every trainable parameter of ``model``. The fusion's parameters (if
    any) form a second group with ``lr * fusion.lr_mult`` and ``fusion.weight_decay``; ``extra`` groups
    follow (the group objective's parameters). The schedule scales every group alike, so the ratios hold
    throughout."""
    fusion = getattr(model, "fusion", None)
    fused = [] if fusion is None else [p for p in fusion.parameters() if p.requires_grad]
    held = {id(p) for p in fused}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    groups = [{"params": rest}]
    if fused:
        f = cfg.fusion
        groups.append({"params": fused, "lr": cfg.optimizer.lr * f.lr_mult, "weight_decay": f.weight_decay})
    groups += list(extra)
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

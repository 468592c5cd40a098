"""YAML run configs: a typed schema with the project's canonical keys, ``_base_`` inheritance (a config
builds on other config files), validation with errors that name the dotted key and the file it came
from, and ``--set a.b=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from rcm_nddr.errors import ConfigError
from rcm_nddr.inheritance import Origins, Where, apply_overrides, below, load_tree, locator, parse_override
from rcm_nddr.protocols import PROTOCOLS
from rcm_nddr.registry import DATASETS, TASKS, discover, installed_names
from rcm_nddr.schema import build, coerce


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    root: str = "data/SYNTH_MT"
    train_split: str = "train"
    val_split: str = "val"
    crop: tuple[int, int] = (128, 128)
    #: random-scale factors of the training augmentation ([1.0] turns it off); depth is divided by the factor
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    #: random horizontal flips in training (normals' x component negated)
    flip: bool = True
    #: keyword options of the dataset class (e.g. ``classes: 7`` for Cityscapes); an unknown one is an error
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackboneConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16"] = "resnet18"
    #: ``none`` (random init), ``torchvision`` (ImageNet weights) or a path to a state dict
    weights: str = "none"
    #: 8 or 16 for the ResNets; VGG-16 (DeepLab-LargeFOV) has output stride 8 only
    output_stride: Literal[8, 16] = 16
    #: ``none``: plain convs, fully trained; ``rc``: frozen filter bank + per-task modulators;
    #: ``ra_series`` / ``ra_parallel``: frozen convs + per-task residual adapters (ResNets)
    reparam: Literal["none", "rc", "ra_series", "ra_parallel"] = "none"
    #: RI and NFF apply to ``reparam: rc``
    ri: bool = True
    nff: bool = True
    decomposition: str | None = None
    #: what of the encoder a new task trains: ``all``; ``norm``: its BatchNorm only (convs, modulators
    #: and adapters stay at their initial values); ``none``: nothing (the decoder-only baseline: the
    #: encoder, BatchNorm statistics included, stays as initialized)
    train_encoder: Literal["all", "norm", "none"] = "all"
    #: ``per_task``: each task of the group has its own encoder path; ``shared``: hard parameter sharing,
    #: the group's tasks share one trained encoder (its first task's path), each with its own head
    sharing: Literal["per_task", "shared"] = "per_task"
    #: ``reparam: rc``: the group's tasks share one set of modulators (its first task's), each keeping its
    #: own BatchNorm and downsample copies (``sharing: shared`` shares those too, as RCM's common_mt_params)
    shared_modulators: bool = False
    #: a model store whose same-named tasks each new task starts from (its encoder and head; NDDR-CNN
    #: initializes each branch from its single-task network); null: the pretrained ``weights``
    init_from: str | None = None


@dataclass
class AutoSourcesConfig:
    """``fusion.sources: auto``: a probe of ``probe_iters`` iterations reading every stored task, then each
    candidate's affinity on ``batches`` held-out training batches (``rcm_nddr.engine.affinity``); kept when
    above ``threshold``, at most ``max_sources`` (null: no limit)."""

    probe_iters: int = 20
    batches: int = 2
    threshold: float = 0.01
    max_sources: int | None = None


@dataclass
class FusionConfig:
    #: ``none``: the tasks' paths stay separate; ``nddr``: NDDR layers after each of ``stages``;
    #: ``cross_stitch``: cross-stitch units (per-channel weighted sums of the sources' features) instead
    type: Literal["none", "nddr", "cross_stitch"] = "none"
    #: the stored tasks the group reads besides its own: ``all``, ``auto`` (measured, see ``auto``) or names;
    #: ``own``: NDDR layers reading the task's own features only (a control: the layers without other tasks)
    sources: Union[Literal["all", "auto", "own"], list[str]] = "all"  # noqa: UP007 - evaluated by the schema walker
    auto: AutoSourcesConfig = field(default_factory=AutoSourcesConfig)
    stages: list[str] = field(default_factory=lambda: ["stem", "layer1", "layer2", "layer3", "layer4"])
    alpha: float = 0.9
    beta: float | None = None
    lr_mult: float = 100.0
    weight_decay: float = 1e-4
    shortcut: bool = False
    #: NDDR's ablations: the 1x1 conv starts as ``[alpha I, beta I, ...]`` (``constant``) or Xavier-uniform;
    #: ``bn: false`` drops the BatchNorm after it
    init: Literal["constant", "xavier"] = "constant"
    bn: bool = True


@dataclass
class HeadConfig:
    #: ``deeplabv3plus`` (ASPP and a decoder on the stride-4 features) or ``deeplabv3`` (ASPP only)
    type: Literal["deeplabv3plus", "deeplabv3"] = "deeplabv3plus"
    channels: int = 256
    #: the dropout after the ASPP projection (0: none)
    dropout: float = 0.5
    #: ``default``: PyTorch's conv initialization; ``normal``: N(0, 0.01) as the official RCM code
    init: Literal["default", "normal"] = "default"


@dataclass
class ConsistencyConfig:
    """One cross-task consistency term (an item of ``loss.consistency``): a transfer net maps the raw output
    of ``source`` to the output space of ``target``; the transferred prediction is scored with ``loss`` (a
    transfer loss of the target's task type) against the target's own prediction, its label, or both
    (``supervise``), and added to the loss of ``target`` (of ``source`` when the target is a stored task):
    ``mix: add`` adds ``weight`` times the term, ``mix: convex`` makes the loss ``(1 - weight)`` times the
    task's own loss plus ``weight`` times the term (as xtask). ``detach_target``: the target's prediction is
    a fixed reference (the gradient reaches the source and the transfer net only)."""

    source: str = ""
    target: str = ""
    loss: str = ""
    weight: float = 1.0
    supervise: Literal["prediction", "label", "both"] = "prediction"
    detach_target: bool = True
    mix: Literal["add", "convex"] = "add"
    #: the transfer net's options: BatchNorm after its convs, doubled widths
    batch_norm: bool = False
    wider: bool = False


#: the keys of ``loss`` that are not task names
LOSS_KEYS = ("weighting", "consistency")


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedulerConfig:
    name: Literal["poly", "step", "cosine", "constant"] = "poly"
    power: float = 0.9
    #: for ``step``: multiply the lr by ``gamma`` at each of these iterations
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_iters: int = 0


#: ``torch.compile`` modes (``train.compile`` / ``test.compile``; ``true`` means ``default``)
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class TrainConfig:
    #: training length in iterations (2000 when neither this nor ``epochs`` is set)
    max_iters: int | None = None
    #: alternative to ``max_iters``: whole passes over the train split (at most one of the two)
    epochs: int | None = None
    batch_size: int = 8
    num_workers: int = 2
    val_every: int = 500
    checkpoint_every: int | None = None
    log_every: int = 20
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    #: in a distributed run: BatchNorm statistics over the global batch (SyncBatchNorm) instead of each
    #: process's slice
    sync_bn: bool = False
    #: ``torch.compile`` the training step's model and the validation model: true (= ``default``) or a mode
    compile: bool | CompileMode = False
    #: keep the run's ``last``/``best`` checkpoints once the group is registered (default: removed; the
    #: store, metrics and logs stay)
    keep_checkpoints: bool = False


@dataclass
class TestConfig:
    batch_size: int = 8
    #: ``best`` or ``last`` checkpoint of the run
    checkpoint: Literal["best", "last"] = "best"
    #: single-task results for Delta_MTL: a model store or a JSON file ({task: {metric: value}})
    baselines: str | None = None
    #: ``torch.compile`` the evaluated model (test.py): true (= ``default``) or a mode
    compile: bool | CompileMode = False


@dataclass
class Config:
    store: str = "results/synthetic/resnet18"
    tasks: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    #: per task: ``weight`` plus options of the task type (e.g. ``edge: {weight: 50, pos_weight: 0.95}``);
    #: ``weighting: {type: ..., lr, weight_decay, options}`` (the loss weighting, default fixed) and
    #: ``consistency: [...]`` (``ConsistencyConfig`` items)
    loss: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    #: ``protocol`` (``rcm_nddr.protocols.PROTOCOLS``, default ``project``): whose conventions the metrics follow;
    #: per task, evaluation switches over the protocol's (e.g. ``sal: {beta2: 0.3}``)
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: where the config was loaded from (not a YAML key)
    source: str = field(default="<defaults>", metadata={"internal": True})
    #: the ``_base_`` files merged under it, every one of them in merge order (not a YAML key)
    bases: list[str] = field(default_factory=list, metadata={"internal": True})

    @property
    def weighting(self) -> dict[str, Any]:
        """``loss.weighting`` with its defaults: ``type`` (fixed), ``lr`` (None), ``weight_decay`` (0) and the
        method's options."""
        return {"type": "fixed", "lr": None, "weight_decay": 0.0, **self.loss.get("weighting", {})}

    @property
    def consistency(self) -> list[ConsistencyConfig]:
        """``loss.consistency``: the cross-task consistency terms."""
        return list(self.loss.get("consistency", []))

    @property
    def protocol(self) -> str:
        """``evaluation.protocol``, ``project`` when not set."""
        return self.evaluation.get("protocol", "project")

    @property
    def group_name(self) -> str:
        """The name of this run's task group: its task names joined with '+'."""
        return "+".join(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """Every YAML key, resolved (bases merged, overrides applied, defaults filled in)."""
        out = _to_plain(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                out.pop(f.name)
        return out


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None), merge it over its
    ``_base_`` configs, apply ``--set`` overrides and validate everything. Raises ConfigError naming
    the dotted key and the file it came from (a base is named with the config that uses it).

    ``_base_: PATH`` or ``_base_: [PATH, ...]`` (relative to the file that names them) lists configs
    this one builds on: each is loaded the same way (it may have bases of its own), they are merged
    in list order, then this file's keys on top, then the overrides. Mappings merge key by key;
    lists and scalars replace.
    """
    where = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    origins: Origins = {}
    bases: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data, origins = load_tree(p, where, where, [p.resolve()], bases)
    if overrides:
        data = apply_overrides(data, overrides, where, Config)
        where = f"{where} (with --set {' '.join(overrides)})"
        for item in overrides:
            dotted = ".".join(parse_override(item, where)[0])
            for key in below(origins, dotted):
                del origins[key]
            origins[dotted] = where
    at = locator(origins, where)
    cfg = build(Config, data, "", at)
    cfg.source = where
    cfg.bases = bases
    _check(cfg, at)
    return cfg


def _unknown_task_types(cfg: Config) -> list[str]:
    """The run's task names that no task type answers to. The installed names are read from the package
    metadata; only when one is missing there are the built-ins and the config's plug-ins imported."""
    known = {*installed_names(TASKS.entry_point_group), *TASKS.names()}
    if all(name in known for name in cfg.tasks):
        return []
    discover(cfg.plugins)
    return [name for name in cfg.tasks if name not in TASKS]


def _check(cfg: Config, where: Where) -> None:
    """Cross-key rules the types alone cannot express."""

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where(key)}: key '{key}': {message}")

    if not cfg.tasks:
        raise fail("tasks", "at least one task is required")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise fail("tasks", f"duplicate task names in {cfg.tasks}")
    unknown = _unknown_task_types(cfg)
    if unknown:
        close = difflib.get_close_matches(unknown[0], TASKS.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise fail(
            "tasks",
            f"unknown task type {unknown[0]!r}{hint}; known: {', '.join(TASKS.names())} "
            "(a plug-in's task types need its module under 'plugins:')",
        )
    _check_loss(cfg, where, fail)
    for name, value in cfg.evaluation.items():
        if name == "protocol":
            if value not in PROTOCOLS:
                raise fail("evaluation.protocol", f"expected one of {', '.join(PROTOCOLS)}, got {value!r}")
        elif name not in cfg.tasks:
            raise fail(f"evaluation.{name}", f"not a task of this run (tasks: {cfg.tasks}) nor 'protocol'")
        elif not isinstance(value, dict):
            raise fail(f"evaluation.{name}", f"expected a mapping of evaluation switches, got {value!r}")
    t = cfg.train
    if t.max_iters is not None and t.epochs is not None:
        raise ConfigError(
            f"{where('train.epochs')}: keys 'train.max_iters' and 'train.epochs': set at most one of them"
        )
    if t.max_iters is None and t.epochs is None:
        t.max_iters = 2000
    positive = {
        "train.max_iters": t.max_iters,
        "train.epochs": t.epochs,
        "train.batch_size": t.batch_size,
        "train.val_every": t.val_every,
        "train.checkpoint_every": t.checkpoint_every,
        "train.log_every": t.log_every,
        "test.batch_size": cfg.test.batch_size,
        "head.channels": cfg.head.channels,
        **{f"fusion.auto.{k}": getattr(cfg.fusion.auto, k) for k in ("probe_iters", "batches", "max_sources")},
        "dataset.crop[0]": cfg.dataset.crop[0],
        "dataset.crop[1]": cfg.dataset.crop[1],
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise fail(key, f"expected a positive integer, got {value}")
    if t.batch_size < 2:
        raise fail(
            "train.batch_size",
            f"expected at least 2, got {t.batch_size}: BatchNorm in training needs more than one value per "
            "channel, and the head's image pooling has one per image",
        )
    if not cfg.dataset.scales or any(s <= 0 for s in cfg.dataset.scales):
        raise fail("dataset.scales", "expected a non-empty list of positive factors")
    if t.num_workers < 0:
        raise fail("train.num_workers", f"expected >= 0, got {t.num_workers}")
    _check_ranges(cfg, fail)
    _check_model(cfg, fail)
    if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
        raise fail("train.device", f"expected auto, cpu, cuda or cuda:N, got {t.device!r}")


def _check_loss(cfg: Config, where: Where, fail: typing.Callable[[str, str], ConfigError]) -> None:
    """``loss``: task entries (mappings of a task of the run, ``weight >= 0``), ``weighting`` (a mapping
    with a ``type`` name, ``lr > 0`` or null, ``weight_decay >= 0``; the method's options are checked when
    the run is built) and ``consistency`` (a list of ``ConsistencyConfig``, replaced by the parsed items)."""
    for name, options in cfg.loss.items():
        if name == "consistency":
            items = coerce(options, list[ConsistencyConfig], "loss.consistency", where)
            for i, item in enumerate(items):
                key = f"loss.consistency[{i}]"
                for part in ("source", "target", "loss"):
                    if not getattr(item, part):
                        raise fail(f"{key}.{part}", "required (e.g. {source: semseg, target: depth, loss: l1})")
                if item.source == item.target:
                    raise fail(f"{key}.target", f"expected a task other than the source {item.source!r}")
                if not 0 <= item.weight < (1 if item.mix == "convex" else math.inf):
                    bound = "in [0, 1) with mix: convex" if item.mix == "convex" else ">= 0"
                    raise fail(f"{key}.weight", f"expected a number {bound}, got {item.weight}")
            cfg.loss["consistency"] = items
            continue
        if not isinstance(options, dict):
            raise fail(f"loss.{name}", f"expected a mapping, got {options!r}")
        coerce(options, dict[str, Any], f"loss.{name}", where)  # every number finite
        if name == "weighting":
            kind = options.get("type", "fixed")
            if not isinstance(kind, str) or not kind:
                raise fail("loss.weighting.type", f"expected the name of a loss weighting, got {kind!r}")
            lr, decay = options.get("lr"), options.get("weight_decay", 0.0)
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
                raise fail("loss.weighting.lr", f"expected a number > 0 or null, got {lr!r}")
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
                raise fail("loss.weighting.weight_decay", f"expected a number >= 0, got {decay!r}")
            continue
        if name not in cfg.tasks:
            raise fail(f"loss.{name}", f"not a task of this run (tasks: {cfg.tasks}) nor one of {', '.join(LOSS_KEYS)}")
        w = options.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise fail(f"loss.{name}.weight", f"expected a number >= 0, got {w!r}")
    convex: dict[str, float] = {}
    for item in cfg.consistency:
        if item.mix == "convex":
            convex[item.target] = convex.get(item.target, 0.0) + item.weight
    for target, total in convex.items():
        if total >= 1:
            raise fail("loss.consistency", f"the convex weights of the terms into {target!r} sum to {total} (>= 1)")


def _check_ranges(cfg: Config, fail: typing.Callable[[str, str], ConfigError]) -> None:
    """The values the optimizer and the schedule accept (torch refuses some only when the optimizer is
    built, and a negative ``scheduler.power`` fails only at the last iteration)."""
    o, s, f = cfg.optimizer, cfg.scheduler, cfg.fusion
    positive = {"optimizer.lr": o.lr, "fusion.lr_mult": f.lr_mult, "scheduler.power": s.power}
    not_negative = {"optimizer.weight_decay": o.weight_decay, "fusion.weight_decay": f.weight_decay}
    fractions = {"optimizer.momentum": o.momentum, "optimizer.betas[0]": o.betas[0], "optimizer.betas[1]": o.betas[1]}
    rules = [
        ("> 0", lambda v: v > 0, {**positive, "scheduler.gamma": s.gamma}),
        (">= 0", lambda v: v >= 0, {**not_negative, "scheduler.warmup_iters": s.warmup_iters}),
        ("a value in [0, 1)", lambda v: 0 <= v < 1, fractions),
    ]
    for expected, ok, values in rules:
        for key, value in values.items():
            if not ok(value):
                raise fail(key, f"expected {expected}, got {value}")


def _check_model(cfg: Config, fail: typing.Callable[[str, str], ConfigError]) -> None:
    """The architecture choices that do not combine."""
    b, f, h = cfg.backbone, cfg.fusion, cfg.head
    if b.arch == "vgg16" and b.output_stride != 8:
        raise fail("backbone.output_stride", f"VGG-16 (DeepLab-LargeFOV) has output stride 8, got {b.output_stride}")
    if b.arch == "vgg16" and b.reparam.startswith("ra_"):
        raise fail("backbone.reparam", f"residual adapters ({b.reparam}) are built on ResNet blocks, not on vgg16")
    if b.sharing == "shared" and f.type != "none":
        raise fail("backbone.sharing", f"shared (one encoder for the group) does not combine with fusion.type {f.type}")
    if b.shared_modulators and (b.reparam != "rc" or b.sharing == "shared"):
        why = f"reparam is {b.reparam}" if b.reparam != "rc" else "sharing: shared shares the whole encoder already"
        raise fail("backbone.shared_modulators", f"shares RC modulators, but {why}")
    if f.sources == "auto" and f.type == "none":
        raise fail("fusion.sources", "auto measures which stored tasks the fusion layers read; fusion.type is none")
    if f.sources == "own" and (f.type != "nddr" or b.shared_modulators):
        why = f"fusion.type is {f.type}" if f.type != "nddr" else "backbone.shared_modulators reads the first task's"
        raise fail("fusion.sources", f"own gives each task NDDR layers on its own features only, but {why}")
    ablations = {"fusion.shortcut": f.shortcut, "fusion.bn": not f.bn, "fusion.init": f.init != "constant"}
    ablated = [key for key, set_ in ablations.items() if set_]
    if f.type == "cross_stitch" and ablated:
        raise fail(ablated[0], "is an option of NDDR fusion; cross-stitch units have no shortcut, BatchNorm or init")
    if not 0 <= h.dropout < 1 or not math.isfinite(h.dropout):
        raise fail("head.dropout", f"expected a rate in [0, 1), got {h.dropout}")


def check_paths(cfg: Config) -> None:
    """Files the run needs must exist: one error naming the dotted key and the path."""
    store, decomposition = Path(cfg.store), cfg.backbone.decomposition
    for p in (store, *store.parents):  # the nearest existing one must be a directory to hold the store
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{cfg.source}: key 'store': {p} is a file; expected a model store directory")
        if p.exists():
            break
    if decomposition is not None and Path(decomposition).is_dir():
        raise ConfigError(
            f"{cfg.source}: key 'backbone.decomposition': {decomposition} is a directory; expected the path of "
            "a decomposition file (.safetensors, made there when missing)"
        )
    root = Path(cfg.dataset.root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{cfg.source}: key 'dataset.root': {root} is a file; expected the dataset's directory")
    if not root.is_dir():
        discover(cfg.plugins)  # the dataset type says how to get its data
        hint = getattr(DATASETS.get(cfg.dataset.name), "MISSING_ROOT_HINT", "") if cfg.dataset.name in DATASETS else ""
        hint = f"; {hint.format(root=root)}" if hint else ""
        raise ConfigError(f"{cfg.source}: key 'dataset.root': directory {root} does not exist{hint}")
    w = cfg.backbone.weights
    if w not in ("none", "torchvision") and Path(w).is_dir():
        raise ConfigError(f"{cfg.source}: key 'backbone.weights': {w} is a directory; expected a state dict file")
    if w not in ("none", "torchvision") and not Path(w).is_file():
        raise ConfigError(
            f"{cfg.source}: key 'backbone.weights': file {w} does not exist (expected 'none', 'torchvision' or "
            f"a path to a state dict); pretrain a filter bank there with `rcm-nddr pretrain --config CONFIG "
            f"--out {w}` (on SYNTH_MT: CONFIG = configs/synthetic/pretrain.yaml, or run `make demo`)"
        )


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

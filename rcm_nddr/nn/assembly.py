"""Assembling a MultiTaskNet from task descriptions: the tasks of a new group (from its config) beside
the tasks already in a model store (from their records), over one backbone and one filter bank.

A ``TaskSpec`` is everything needed to rebuild one task's modules and its plug-in instance; the model
store keeps it in each task's record (``model`` and ``dataset``), so loading a store needs neither the
configs nor the datasets the tasks were trained with."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcm_nddr.nn.accounting import owned_by
from rcm_nddr.nn.adapters import RAResNet
from rcm_nddr.nn.backbone import PerTaskBackbone, TaskBackbones, plain_backbone
from rcm_nddr.nn.cross_stitch import CrossStitchFusion
from rcm_nddr.nn.fusion import StageFusion
from rcm_nddr.nn.heads import DeepLabV3Head, DeepLabV3PlusHead
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import NDDRFusion, transitive_sources
from rcm_nddr.nn.rc_vgg import rc_backbone
from rcm_nddr.nn.vgg import VGGBackbone
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.task import DatasetInfo, Task

#: the fixed probe input every registered task is run on (``store verify`` runs it again)
PROBE_SEED = 20201
PROBE_SHAPE = (2, 3, 64, 64)


class AssemblyError(ValueError):
    """Task descriptions that cannot be assembled into one network."""


@dataclass
class TaskSpec:
    """One task's architecture and plug-in: ``sources`` are the tasks it reads through fusion besides
    itself, ``fusion`` the fusion settings (empty: no fusion; without sources: NDDR on the task's own
    features, ``fusion.sources: own``; ``type``: nddr or cross_stitch, ``stages``, ``alpha``, ``beta``;
    NDDR's ``shortcut``, ``init``, ``bn``), ``head`` the decoder (``type``, ``channels``, ``dropout``,
    ``init``), ``options`` the task type's options and ``dataset`` its DatasetInfo as plain data."""

    name: str
    type: str
    nff: bool = False
    head_channels: int = 256
    head_type: str = "deeplabv3plus"
    head_dropout: float = 0.5
    head_init: str = "default"
    #: the task whose encoder path this task runs on (hard parameter sharing; it is also its source)
    trunk: str | None = None
    #: the task whose RC modulators this task uses (shared modulators; it is also its source)
    modulators_of: str | None = None
    sources: list[str] = field(default_factory=list)
    fusion: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)

    def model_description(self) -> dict[str, Any]:
        """What a store record keeps under ``model``."""
        return {
            "nff": self.nff,
            "head": {
                "type": self.head_type,
                "channels": self.head_channels,
                "dropout": self.head_dropout,
                "init": self.head_init,
            },
            "fusion": dict(self.fusion) if self.fusion else None,
            "options": dict(self.options),
            "plugins": list(self.plugins),
            "trunk": self.trunk,
            "modulators_of": self.modulators_of,
        }

    @classmethod
    def from_record(cls, record: Any) -> TaskSpec:
        """The spec of a store record (``record.model``, ``record.dataset``, ``record.sources``)."""
        model, where = record.model, f"task '{record.name}'"
        try:
            return cls(
                name=record.name,
                type=record.type,
                nff=bool(model["nff"]),
                head_channels=int(model["head"]["channels"]),
                # (stores written before the head options existed: DeepLabv3+ with torchvision's dropout)
                head_type=str(model["head"].get("type", "deeplabv3plus")),
                head_dropout=float(model["head"].get("dropout", 0.5)),
                head_init=str(model["head"].get("init", "default")),
                trunk=model.get("trunk"),
                modulators_of=model.get("modulators_of"),
                sources=list(record.sources),
                fusion=dict(model["fusion"] or {}),
                options=dict(model.get("options") or {}),
                plugins=list(model.get("plugins") or []),
                dataset=dict(record.dataset),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AssemblyError(f"{where}: its record's 'model' description is incomplete ({exc!r})") from exc

    def build_task(self) -> Task:
        """The task plug-in instance, of a type registered already: a built-in, an installed entry point,
        or a plug-in the caller imported (a record's ``plugins`` are never imported here: a store's
        reader decides whether to trust them, see ``rcm_nddr.store.loading.import_plugins``)."""
        discover()
        cls = TASKS.get(self.type)
        info = DatasetInfo(
            name=self.dataset.get("name", "unknown"),
            classes={k: list(v) for k, v in (self.dataset.get("classes") or {}).items()},
            extra=dict(self.dataset.get("extra") or {}),
        )
        return cls(self.name, info, **self.options)


def dataset_description(info: DatasetInfo) -> dict[str, Any]:
    return {"name": info.name, "classes": {k: list(v) for k, v in info.classes.items()}, "extra": dict(info.extra)}


def plugin_paths(plugins: Iterable[str]) -> list[str]:
    """Plug-ins as recorded: ``.py`` paths made absolute so a store loads from any working directory."""
    return [str(Path(p).expanduser().resolve()) if p.endswith(".py") or "/" in p else p for p in plugins]


def skeleton(arch: str, output_stride: int) -> PerTaskBackbone:
    """A randomly initialized plain backbone to load weights into, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return plain_backbone(arch, weights="none", output_stride=output_stride)


def _rc(plain: nn.Module, decomposition: Mapping[str, Tensor] | None) -> nn.Module:
    return rc_backbone(plain, [], decomposition, nff=False)


#: how each ``backbone.reparam`` turns the plain pretrained backbone into a multi-task one without tasks (the
#: tasks are added one by one); ``none`` (a whole backbone per task) is built from the specs
_SHARED_BANK: dict[str, Callable[[nn.Module, Mapping[str, Tensor] | None], nn.Module]] = {
    "rc": _rc,
    "ra_series": lambda plain, _: RAResNet(plain, [], mode="series"),
    "ra_parallel": lambda plain, _: RAResNet(plain, [], mode="parallel"),
}

#: the fusion modules by ``fusion.type``, and the options of a task's record each one takes
_FUSIONS: dict[str, tuple[type[StageFusion], tuple[str, ...]]] = {
    "nddr": (NDDRFusion, ("alpha", "beta", "shortcut", "init", "bn")),
    "cross_stitch": (CrossStitchFusion, ("alpha", "beta")),
}


def build_network(
    reparam: str,
    plain: nn.Module,
    specs: Sequence[TaskSpec],
    heads_for: Mapping[str, Task],
    frozen: Iterable[str] = (),
    decomposition: Mapping[str, Tensor] | None = None,
    bank: Mapping[str, Tensor] | None = None,
) -> MultiTaskNet:
    """A MultiTaskNet over ``specs`` (sources listed before their readers), with heads for
    ``heads_for`` and ``frozen`` tasks frozen. ``plain`` gives the starting point of new tasks (pretrained
    BatchNorm, downsample and, for ``reparam: none``, the whole network; its convs the filter bank, rotated
    by ``decomposition`` for RI) and ``bank`` replaces the bank as used (a model store's)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise AssemblyError(f"a task appears twice in {names}")
    own = [spec for spec in specs if spec.trunk is None]
    shared = {spec.name: spec.trunk for spec in specs if spec.trunk is not None}
    missing = sorted({t for t in shared.values() if t not in [o.name for o in own]})
    if missing:
        raise AssemblyError(f"tasks {sorted(shared)} run on the encoder of {missing}, which this network lacks")
    if reparam == "none":
        backbone: nn.Module = TaskBackbones({spec.name: copy.deepcopy(plain) for spec in own})
    elif reparam in _SHARED_BANK:
        if reparam.startswith("ra_") and isinstance(plain, VGGBackbone):
            raise AssemblyError(f"backbone.reparam {reparam!r}: residual adapters need a ResNet, not VGG-16")
        backbone = _SHARED_BANK[reparam](plain, decomposition)
        if bank is not None:
            backbone.load_filter_bank(bank)
        for spec in own:
            if reparam == "rc":
                backbone.add_task(spec.name, nff=spec.nff, modulators_of=spec.modulators_of)
            else:
                backbone.add_task(spec.name)
    else:
        raise AssemblyError(f"unknown backbone.reparam {reparam!r}; known: none, {', '.join(_SHARED_BANK)}")
    backbone.routes.update(shared)
    fusion = _build_fusion(backbone, specs, names)
    by_name = {s.name: s for s in specs}
    heads = {name: build_head(backbone, task, by_name[name]) for name, task in heads_for.items()}
    return MultiTaskNet(dict(heads_for), backbone, heads, fusion, frozen=frozen)


def _build_fusion(backbone: nn.Module, specs: Sequence[TaskSpec], names: Sequence[str]) -> StageFusion | None:
    """The fusion of the tasks with fusion layers (reading others, or only their own features under
    ``fusion.sources: own``): one method per network (a store's groups fuse alike)."""
    fused = [s for s in specs if s.fusion]
    if not fused:
        return None
    kinds = {s.fusion.get("type", "nddr") for s in fused}
    if len(kinds) > 1:
        listed = ", ".join(f"'{s.name}' ({s.fusion.get('type', 'nddr')})" for s in fused)
        raise AssemblyError(f"the tasks of one network fuse with one method; these differ: {listed}")
    (kind,) = kinds
    if kind not in _FUSIONS:
        raise AssemblyError(f"unknown fusion type {kind!r}; known: {', '.join(_FUSIONS)}")
    cls, options = _FUSIONS[kind]
    fusion = cls({}, backbone.stage_channels, [])
    for spec in fused:
        unknown = [s for s in spec.sources if s not in names]
        if unknown:
            raise AssemblyError(f"task '{spec.name}' reads {unknown}, which are not part of this network")
        given = {k: v for k, v in spec.fusion.items() if k in options}
        fusion.add_task(spec.name, [spec.name, *spec.sources], spec.fusion["stages"], **given)
    return fusion


#: the decoder heads by ``head.type``
_HEADS = {"deeplabv3plus": DeepLabV3PlusHead, "deeplabv3": DeepLabV3Head}


def build_head(backbone: nn.Module, task: Task, spec: TaskSpec | int = 256) -> nn.Module:
    """The head of ``task`` on ``backbone``'s last stage (and its stride-4 stage for DeepLabv3+), as
    ``spec`` describes it (an int: a DeepLabv3+ head of that width with the default options)."""
    spec = spec if isinstance(spec, TaskSpec) else TaskSpec(name=task.name, type=task.name, head_channels=spec)
    common = {
        "high_channels": backbone.stage_channels["layer4"],
        "out_channels": task.out_channels,
        "channels": spec.head_channels,
        "output_stride": backbone.output_stride,
        "dropout": spec.head_dropout,
        "init": spec.head_init,
    }
    if spec.head_type not in _HEADS:
        raise AssemblyError(f"task '{task.name}': unknown head type {spec.head_type!r}; known: {', '.join(_HEADS)}")
    if spec.head_type == "deeplabv3plus":
        common["low_channels"] = backbone.stage_channels["layer1"]
    return _HEADS[spec.head_type](**common)


def load_task_tensors(model: MultiTaskNet, tensors: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Load each task's stored tensors into ``model``; every tensor the model has for those tasks must
    be given, and nothing else (a stored head is skipped when the model reads the task only as a source)."""
    state = model.state_dict()
    for name, given in tensors.items():
        expected = {k for k in state if owned_by(k, name)}
        usable = {k: v for k, v in given.items() if k in expected or not k.startswith(f"heads.{name}.")}
        missing, unexpected = sorted(expected - set(usable)), sorted(set(usable) - expected)
        if missing or unexpected:
            raise AssemblyError(
                f"the stored tensors of task '{name}' do not fit its network: "
                f"missing {_few(missing)}, unexpected {_few(unexpected)}"
            )
        for key, value in usable.items():
            if value.shape != state[key].shape:
                raise AssemblyError(
                    f"the stored tensor {key!r} of task '{name}' has shape {tuple(value.shape)}, "
                    f"the network expects {tuple(state[key].shape)}"
                )
        model.load_state_dict(usable, strict=False)


def _few(keys: list[str]) -> str:
    return f"{keys[:4]}{'...' if len(keys) > 4 else ''}"


def probe_input() -> Tensor:
    """The fixed probe batch: standard-normal images from a fixed seed (the same on every machine)."""
    return torch.randn(PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


@torch.no_grad()
def probe_outputs(model: MultiTaskNet, names: Sequence[str], images: Tensor | None = None) -> dict[str, Tensor]:
    """The raw outputs of ``names`` on the probe input, in eval mode, fp32, on the model's device."""
    images = probe_input() if images is None else images
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return {t: model(images.to(device), tasks=[t], raw=True)[t].float().cpu() for t in names}
    finally:
        model.train(was_training)


def assemble(
    backbone: Mapping[str, Any],
    bank: Mapping[str, Tensor] | None,
    records: Sequence[Any],
    names: Sequence[str],
    load_tensors: Callable[[str], Mapping[str, Tensor]],
) -> MultiTaskNet:
    """The inference network of ``names`` from store records (in store order), with each needed task's
    tensors from ``load_tensors(name)``: heads for ``names``, every task they read as a frozen source,
    the bank as stored (None for plain networks, which use none); eval mode, no parameter requires a
    gradient."""
    specs = {r.name: TaskSpec.from_record(r) for r in records}
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise AssemblyError(f"unknown task(s) {unknown}; available: {list(specs)}")
    needed = transitive_sources(names, {n: spec.sources for n, spec in specs.items()})
    missing = [n for n in needed if n not in specs]
    if missing:
        raise AssemblyError(f"task(s) {missing} are read through NDDR but are not available")
    ordered = [specs[r.name] for r in records if r.name in needed]
    heads_for = {n: specs[n].build_task() for n in names}
    plain = skeleton(backbone["arch"], backbone["output_stride"])
    model = build_network(backbone["reparam"], plain, ordered, heads_for, frozen=set(needed) - set(names), bank=bank)
    load_task_tensors(model, {n: load_tensors(n) for n in needed})
    model.requires_grad_(False)
    return model.eval()

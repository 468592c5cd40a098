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
from rcm_nddr.nn.backbone import ResNetBackbone, TaskBackbones, resnet_backbone
from rcm_nddr.nn.heads import DeepLabV3PlusHead
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import NDDRFusion, transitive_sources
from rcm_nddr.nn.rc import RCResNet
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.task import DatasetInfo, Task

#: the fixed probe input every registered task is run on (``store verify`` runs it again)
PROBE_SEED = 20201
PROBE_SHAPE = (2, 3, 64, 64)


class AssemblyError(ValueError):
    """Task descriptions that cannot be assembled into one network."""


@dataclass
class TaskSpec:
    """One task's architecture and plug-in: ``sources`` are the tasks it reads through NDDR besides
    itself (empty: no fusion), ``fusion`` the NDDR settings (``stages``, ``alpha``, ``beta``,
    ``shortcut``), ``options`` the task type's options and ``dataset`` its DatasetInfo as plain data."""

    name: str
    type: str
    nff: bool = False
    head_channels: int = 256
    sources: list[str] = field(default_factory=list)
    fusion: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)

    def model_description(self) -> dict[str, Any]:
        """What a store record keeps under ``model``."""
        return {
            "nff": self.nff,
            "head": {"type": "deeplabv3plus", "channels": self.head_channels},
            "fusion": dict(self.fusion) if self.sources else None,
            "options": dict(self.options),
            "plugins": list(self.plugins),
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


def skeleton(arch: str, output_stride: int) -> ResNetBackbone:
    """A randomly initialized plain backbone to load weights into, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return resnet_backbone(arch, weights="none", output_stride=output_stride)


def build_network(
    reparam: str,
    plain: ResNetBackbone,
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
    if reparam == "rc":
        backbone: nn.Module = RCResNet(plain, [], decomposition, nff=False)
        if bank is not None:
            backbone.load_filter_bank(bank)
        for spec in specs:
            backbone.add_task(spec.name, nff=spec.nff)
    elif reparam == "none":
        backbone = TaskBackbones({spec.name: copy.deepcopy(plain) for spec in specs})
    else:
        raise AssemblyError(f"unknown backbone.reparam {reparam!r}")
    fusion = None
    fused = [s for s in specs if s.sources]
    if fused:
        fusion = NDDRFusion({}, backbone.stage_channels, [])
        for spec in fused:
            unknown = [s for s in spec.sources if s not in names]
            if unknown:
                raise AssemblyError(f"task '{spec.name}' reads {unknown}, which are not part of this network")
            f = spec.fusion
            fusion.add_task(
                spec.name,
                [spec.name, *spec.sources],
                f["stages"],
                alpha=f.get("alpha", 0.9),
                beta=f.get("beta"),
                shortcut=bool(f.get("shortcut", False)),
            )
    by_name = {s.name: s for s in specs}
    heads = {name: build_head(backbone, task, by_name[name].head_channels) for name, task in heads_for.items()}
    return MultiTaskNet(dict(heads_for), backbone, heads, fusion, frozen=frozen)


def build_head(backbone: nn.Module, task: Task, channels: int) -> DeepLabV3PlusHead:
    """A DeepLabv3+ head for ``task`` on ``backbone``'s last and stride-4 stages."""
    return DeepLabV3PlusHead(
        high_channels=backbone.stage_channels["layer4"],
        low_channels=backbone.stage_channels["layer1"],
        out_channels=task.out_channels,
        channels=channels,
        output_stride=backbone.output_stride,
    )


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
    bank: Mapping[str, Tensor],
    records: Sequence[Any],
    names: Sequence[str],
    load_tensors: Callable[[str], Mapping[str, Tensor]],
) -> MultiTaskNet:
    """The inference network of ``names`` from store records (in store order), with each needed task's
    tensors from ``load_tensors(name)``: heads for ``names``, every task they read as a frozen source,
    the bank as stored; eval mode, no parameter requires a gradient."""
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

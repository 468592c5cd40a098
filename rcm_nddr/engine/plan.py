"""How a task group joins its model store: which stored tasks each new task reads and which it loads frozen."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.nn.backbone import STAGES
from rcm_nddr.nn.nddr import transitive_sources
from rcm_nddr.store import StoreError, TaskRecord

log = logging.getLogger(__name__)


@dataclass
class GroupPlan:
    """How a group joins its store: ``sources[t]`` lists the tasks new task t reads through NDDR besides
    itself (stored tasks in store order, then its group mates; empty: no fusion) and ``frozen`` the
    stored tasks the group needs, directly or through their own sources (loaded frozen). ``pins`` holds
    the sha256 of each frozen task's tensors file when the run started: registration refuses the group
    if one of them was replaced meanwhile. ``candidates`` (``fusion.sources: auto``) lists the stored tasks
    the group could read, before the choice; ``auto[t]`` is the measurement that chose t's stored sources
    (``rcm_nddr.engine.affinity``), empty until made. The plan is checkpointed: a resumed run reads the
    same sources and does not measure again."""

    sources: dict[str, list[str]] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    auto: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"sources": self.sources, "frozen": self.frozen, "pins": self.pins}
        return {**out, "candidates": self.candidates, "auto": self.auto} if self.candidates or self.auto else out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupPlan:
        sources = {k: list(v) for k, v in data["sources"].items()}
        auto = {k: dict(v) for k, v in (data.get("auto") or {}).items()}
        candidates = list(data.get("candidates") or [])
        return cls(sources, list(data["frozen"]), dict(data.get("pins") or {}), candidates, auto)

    @property
    def pending(self) -> bool:
        """Whether ``fusion.sources: auto`` still has to measure and choose (``choose_sources``)."""
        return bool(self.candidates) and not self.auto

    def source_pins(self, task: str) -> dict[str, str]:
        """The pins of the stored tasks ``task`` reads (its group mates are pinned when registered)."""
        return {s: self.pins[s] for s in self.sources.get(task, []) if s in self.pins}


def plan_group(cfg: Config, records: list[TaskRecord], replace: bool = False) -> GroupPlan:
    """The sources and frozen tasks of the config's group in a store holding ``records``.

    A task name already registered is refused unless ``replace``, itself refused while a task outside the
    group reads it. ``fusion.sources: all`` reads every stored task (but those being replaced), a list
    reads those tasks; tasks of one group always read each other. ``auto`` plans to read every stored task
    as ``all`` does and lists them as ``candidates``: the run measures them and narrows the plan
    (``choose_sources``) before it trains. ``own`` reads nothing, not even the group's other tasks."""
    f, names = cfg.fusion, list(cfg.tasks)
    by_name = {r.name: r for r in records}
    taken = [n for n in names if n in by_name]
    if taken and not replace:
        listed = ", ".join(f"'{n}' (group {by_name[n].group})" for n in taken)
        raise StoreError(
            f"the store {cfg.store} already registers {listed}; retrain it with --replace, or train into another store"
        )
    readers = sorted({r.name for r in records if r.name not in names and set(r.sources) & set(taken)})
    if readers:
        raise StoreError(
            f"cannot replace {taken} in the store {cfg.store}: task(s) {readers} read them through NDDR "
            "(remove those first)"
        )
    available = [r.name for r in records if r.name not in names]
    # hard parameter sharing and shared modulators: the group's tasks read its first task's encoder or modulators
    first_read = {t: [names[0]] for t in names[1:]}
    if cfg.backbone.sharing == "shared":
        return GroupPlan(first_read)
    if f.type == "none":
        return GroupPlan(first_read if cfg.backbone.shared_modulators else {})
    kinds = {r.name: r.model["fusion"].get("type", "nddr") for r in records if r.model.get("fusion")}
    other = {n: k for n, k in kinds.items() if k != f.type and n not in names}
    if other:
        listed = ", ".join(f"'{n}' ({k})" for n, k in other.items())
        raise ConfigError(
            f"{cfg.source}: key 'fusion.type': {f.type}, but the store {cfg.store} fuses with another method "
            f"({listed}); the tasks of one store fuse alike (train into another store)"
        )
    bad = [s for s in f.stages if s not in STAGES]
    if bad or not f.stages or len(set(f.stages)) != len(f.stages):
        raise ConfigError(
            f"{cfg.source}: key 'fusion.stages': expected distinct stages out of {list(STAGES)}, got {f.stages}"
        )
    if f.sources == "own":  # each task's NDDR layers read its own features only (config_spec): nothing to read
        return GroupPlan()
    if f.sources in ("all", "auto"):
        older = available
    else:
        unknown = [s for s in f.sources if s not in available]
        if unknown:
            raise ConfigError(
                f"{cfg.source}: key 'fusion.sources': {unknown} are not tasks of the store {cfg.store} "
                f"this group could read (available: {available or 'none'}; the group's own tasks always read "
                "each other)"
            )
        older = [n for n in available if n in f.sources]
    plan = _reading(names, dict.fromkeys(names, older), records, warn=f.sources != "auto" or not older)
    if f.sources == "auto" and older:
        plan.candidates = list(older)
    return plan


def _reading(names: list[str], older: dict[str, list[str]], records: list[TaskRecord], warn: bool) -> GroupPlan:
    """The plan of a group whose task t reads the stored tasks ``older[t]`` (in store order) and its mates."""
    sources = {t: [*older[t], *(o for o in names if o != t)] for t in names}
    for t, read in sources.items():
        if not read and warn:
            log.warning("fusion is on but task %s has no other task to read: it gets no fusion layers", t)
    stored = [r.name for r in records if any(r.name in older[t] for t in names)]
    needed = transitive_sources(stored, {r.name: r.sources for r in records})
    frozen = [r.name for r in records if r.name in needed]
    pins = {r.name: r.files[r.tensors_file] for r in records if r.name in needed and r.tensors_file in r.files}
    return GroupPlan({t: s for t, s in sources.items() if s}, frozen, pins)


def choose_sources(
    plan: GroupPlan, chosen: dict[str, list[str]], measured: dict[str, dict[str, Any]], records: list[TaskRecord]
) -> GroupPlan:
    """``plan`` (of ``fusion.sources: auto``) narrowed to the stored tasks ``chosen[t]`` for each new task t,
    with the measurement that chose them (``measured[t]``, kept in the plan and the task's record)."""
    names = list(measured)
    unknown = {t: [s for s in read if s not in plan.candidates] for t, read in chosen.items()}
    if any(unknown.values()):
        raise ValueError(f"chosen sources {unknown} are not among the candidates {plan.candidates}")
    older = {t: [s for s in plan.candidates if s in chosen.get(t, [])] for t in names}
    narrowed = _reading(names, older, records, warn=False)
    narrowed.candidates, narrowed.auto = list(plan.candidates), {t: dict(m) for t, m in measured.items()}
    return narrowed

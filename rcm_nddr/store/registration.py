"""The rules of a registration: the records and tensors of a task group, checked against each other and
against the tasks the store already holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcm_nddr.store.format import SHA256, TASK_NAME, StoreError, TaskRecord, cpu_tensors, expect, plain

_RECORD_INPUT_KEYS = {
    "name",
    "type",
    "sources",
    "config",
    "parameters",
    "metrics",
    "group",
    "files",
    "model",
    "dataset",
    "environment",
    "source_pins",
}


def record_from_input(record: TaskRecord | Mapping[str, Any], index: int) -> TaskRecord:
    """``records[index]`` of a registration, checked, as a TaskRecord of plain data (no group, no files)."""
    where = f"register_group: records[{index}]"
    if isinstance(record, TaskRecord):
        record = record.to_dict()
    if not isinstance(record, Mapping):
        raise StoreError(f"{where}: expected a TaskRecord or a dict, got {type(record).__name__}")
    unknown = set(record) - _RECORD_INPUT_KEYS
    if unknown:
        raise StoreError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(_RECORD_INPUT_KEYS)}")
    name = expect(record, "name", str, where)
    if not TASK_NAME.match(name):
        raise StoreError(f"{where}: task name {name!r} must be letters, digits, '_' or '-' (it names files)")
    sources = list(record.get("sources") or [])
    if not all(isinstance(s, str) for s in sources):
        raise StoreError(f"{where}: key 'sources' must be a list of task names, got {sources!r}")
    pins = dict(record.get("source_pins") or {})
    if not set(pins) <= set(sources) or not all(isinstance(v, str) and SHA256.match(v) for v in pins.values()):
        raise StoreError(f"{where}: key 'source_pins' must map sources of the task to sha256s, got {pins!r}")
    parameters = plain(dict(record.get("parameters") or {}), f"{where}.parameters")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in parameters.values()):
        raise StoreError(f"{where}: key 'parameters' must map categories to integer counts, got {parameters!r}")
    return TaskRecord(
        name=name,
        type=expect(record, "type", str, where),
        sources=sources,
        config=plain(dict(record.get("config") or {}), f"{where}.config"),
        parameters=parameters,
        metrics=plain(dict(record.get("metrics") or {}), f"{where}.metrics"),
        model=plain(dict(record.get("model") or {}), f"{where}.model"),
        dataset=plain(dict(record.get("dataset") or {}), f"{where}.dataset"),
        environment=plain(dict(record.get("environment") or {}), f"{where}.environment"),
        source_pins=pins,
    )


def checked_group(
    records: Sequence[TaskRecord | Mapping[str, Any]],
    tensors: Mapping[str, Mapping[str, Tensor]],
    probes: Mapping[str, Mapping[str, Tensor]],
) -> tuple[list[TaskRecord], dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """The arguments of ``register_group`` checked: the records, and CPU copies of the tensors and
    probes by task name."""
    new = [record_from_input(r, i) for i, r in enumerate(records)]
    names = [r.name for r in new]
    if not new:
        raise StoreError("register_group: no task records given")
    if len(set(names)) != len(names):
        raise StoreError(f"register_group: a task name appears twice in {names}")
    if set(tensors) != set(names):
        raise StoreError(f"register_group: tensors are given for {sorted(tensors)}, expected {sorted(names)}")
    if set(probes) != set(names):
        raise StoreError(
            f"register_group: probes are given for {sorted(probes)}, expected {sorted(names)} "
            "(every task has one: ModelStore.compute_probes makes them)"
        )
    state = {n: cpu_tensors(tensors[n], f"tensors of task '{n}'") for n in names}
    probe_state = {n: cpu_tensors(p, f"probe of task '{n}'") for n, p in probes.items()}
    for name in names:
        check_finite(state[name], f"task '{name}'")
        check_finite(probe_state[name], f"the probe of task '{name}'")
    return new, state, probe_state


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """StoreError naming the first tensor of ``tensors`` that holds a NaN or an infinity."""
    for key, value in tensors.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise StoreError(
                    f"register_group: {what}: tensor '{key}' has {bad} of {value.numel()} values that are NaN or "
                    "infinite (training diverged: lower optimizer.lr, or check the data); nothing was registered"
                )


def check_registration(store_file: Path, existing: list[TaskRecord], new: list[TaskRecord], replace: bool) -> None:
    """Refuse registering ``new`` beside ``existing``: a registered name unless ``replace``, a replaced
    task that another task reads, and sources that are not registered or are the task itself."""
    names = {r.name for r in new}
    taken = [t for t in existing if t.name in names]
    if taken and not replace:
        listed = ", ".join(f"'{t.name}' (group {t.group})" for t in taken)
        raise StoreError(f"{store_file} already registers {listed}; pass replace=True to retrain")
    readers = sorted({t.name for t in existing if t.name not in names and set(t.sources) & names})
    if taken and readers:
        raise StoreError(
            f"cannot replace {sorted(t.name for t in taken)} in {store_file}: "
            f"task(s) {readers} read them through NDDR (key 'sources')"
        )
    known = {t.name for t in existing} | names
    for r in new:
        unknown = [s for s in r.sources if s not in known]
        if unknown:
            raise StoreError(f"task '{r.name}' reads unregistered task(s) {unknown} (key 'sources')")
        if r.name in r.sources:
            raise StoreError(f"task '{r.name}' lists itself in its 'sources'")
    stored = {t.name: t for t in existing if t.name not in names}
    for r in new:
        for source, pin in r.source_pins.items():
            if source in stored and stored[source].files[stored[source].tensors_file] != pin:
                current = stored[source].files[stored[source].tensors_file]
                raise StoreError(
                    f"task '{r.name}' was trained against '{source}' with sha256 {pin}, but {store_file} now holds "
                    f"'{source}' with sha256 {current}: it was replaced while '{r.name}' trained; train "
                    f"'{r.name}' again. Nothing was registered"
                )


def pin_sources(new: list[TaskRecord], existing: list[TaskRecord]) -> None:
    """Fill in each new record's ``source_pins``: the sha256 of every source's tensors file, a group mate's
    as just written (its ``files`` filled in), a stored task's as the store records it."""
    files = {t.name: t.files[t.tensors_file] for t in existing}
    files.update({r.name: r.files[r.tensors_file] for r in new})
    for r in new:
        r.source_pins = {s: files[s] for s in r.sources}

"""The rules of a registration: the records and tensors of a task group, checked against each other and
against the tasks the store already holds."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from rcm_nddr.store.format import StoreError, TaskRecord, cpu_tensors, expect, plain

# Task names become file names, and a dot would let "x.probe" collide with the probe of task "x".
_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
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
    if not _TASK_NAME.match(name):
        raise StoreError(f"{where}: task name {name!r} must be letters, digits, '_' or '-' (it names files)")
    sources = list(record.get("sources") or [])
    if not all(isinstance(s, str) for s in sources):
        raise StoreError(f"{where}: key 'sources' must be a list of task names, got {sources!r}")
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
    if not set(probes) <= set(names):
        raise StoreError(f"register_group: probes for unknown task(s) {sorted(set(probes) - set(names))}")
    state = {n: cpu_tensors(tensors[n], f"tensors of task '{n}'") for n in names}
    probe_state = {n: cpu_tensors(p, f"probe of task '{n}'") for n, p in probes.items()}
    return new, state, probe_state


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

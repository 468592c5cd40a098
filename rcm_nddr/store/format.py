"""The on-disk format of a model store: its file names, the ``store.yaml`` document (parsed and checked
into TaskRecords) and the safetensors files that hold its tensors (DESIGN §6)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import Tensor

from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_write, file_sha256
from rcm_nddr.store.sealing import SealError, check_seal

#: 2: store.yaml sealed by digests (``rcm_nddr.store.sealing``), source tasks pinned by sha256, probes required
SCHEMA_VERSION = 2
STORE_FILE = "store.yaml"
LOCK_FILE = "store.yaml.lock"
#: the journal of a registration that replaces files: its new store.yaml and the renames still to do
PENDING_FILE = "store.yaml.pending"
#: suffix of a replacing file written beside the one it replaces, until the journal renames it
STAGED_SUFFIX = ".staged"
BANK_FILE = "filter_bank.safetensors"
DECOMPOSITION_FILE = "ri.safetensors"
#: the int8 calibration set: training crops as uint8 RGB, N x 3 x H x W (tensor ``images``)
CALIBRATION_FILE = "calibration.safetensors"
TASKS_DIR = "tasks"
#: task names become file names: no path separators, and no dot (``x.probe`` would collide with the
#: probe of task ``x``)
TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(UserError):
    """A model store that is missing, malformed, inconsistent, or asked for something it refuses."""


@dataclass
class TaskRecord:
    """One registered task as listed in ``store.yaml``.

    ``group`` is the 1-based number of the registration that added the task (tasks trained together
    share it), ``sources`` the tasks whose features it reads through NDDR, ``files`` maps paths
    relative to the store to their sha256, ``parameters`` is the task's parameter breakdown by
    category, and ``metrics`` may name its primary metric under ``primary`` (e.g.
    ``{"primary": "mIoU", "mIoU": 33.1}``). ``model`` describes the task's modules (NFF, head, NDDR
    stages, task options, plug-ins; ``sources_auto``: the affinities that chose its sources under
    ``fusion.sources: auto``; other keys are kept and ignored) and ``dataset`` its dataset (name, class
    names), so ``load_model`` rebuilds it from the store alone. ``environment`` is the provenance of the
    run that trained it (packages, devices, source commit, image, config sha256, seed, command line: its
    ``env.json``).
    ``source_pins`` maps each source task to the sha256 of the tensors file it was trained against."""

    name: str
    type: str
    group: int = 0
    sources: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    source_pins: dict[str, str] = field(default_factory=dict)

    @property
    def tensors_file(self) -> str:
        return f"{TASKS_DIR}/{self.name}.safetensors"

    @property
    def probe_file(self) -> str:
        return f"{TASKS_DIR}/{self.name}.probe.safetensors"

    @property
    def trainable_parameters(self) -> int:
        """``parameters["total"]``, else the sum of every category but the shared ``filter_bank``."""
        if "total" in self.parameters:
            return int(self.parameters["total"])
        return sum(int(v) for k, v in self.parameters.items() if k != "filter_bank")

    @property
    def primary_metric(self) -> tuple[str, Any] | None:
        key = self.metrics.get("primary")
        if isinstance(key, str) and key in self.metrics:
            return key, self.metrics[key]
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- store.yaml


def new_store_doc(backbone: Mapping[str, Any], decomposition_sha256: str | None) -> dict[str, Any]:
    """The store.yaml document of a store with ``backbone`` and no tasks yet."""
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": dict(backbone),
        "decomposition_sha256": decomposition_sha256,
        "tasks": [],
    }


def plain(value: Any, where: str) -> Any:
    """``value`` as YAML/JSON-safe plain data (tuples become lists, paths strings, scalar tensors and
    numpy scalars numbers), so that store.yaml never needs a custom loader."""
    if isinstance(value, str):
        return str(value)  # also str subclasses (e.g. torch.__version__), which YAML cannot represent
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise StoreError(f"{where}: expected plain data (numbers, strings, lists, dicts), got {type(value).__name__}")


def plain_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A parsed store.yaml document (tasks as TaskRecords) as the plain data that is written, unsealed."""
    tasks = [t.to_dict() if isinstance(t, TaskRecord) else t for t in doc["tasks"]]
    return plain({**doc, "tasks": tasks}, STORE_FILE)


def expect(doc: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str, optional: bool = False):
    """``doc[key]`` checked to be of ``types`` (a bool is no int here); StoreError naming ``where``."""
    if key not in doc:
        if optional:
            return None
        raise StoreError(f"{where}: missing key '{key}'")
    value = doc[key]
    if optional and value is None:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = " or ".join(t.__name__ for t in _as_tuple(types))
        raise StoreError(f"{where}: key '{key}' must be {names}, got {value!r}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def parse_task(doc: Any, where: str, legacy: bool = False) -> TaskRecord:
    """One entry of store.yaml's ``tasks``, checked; ``legacy``: of schema_version 1 (no ``source_pins``,
    the probe optional)."""
    if not isinstance(doc, Mapping):
        raise StoreError(f"{where}: expected a mapping, got {doc!r}")
    name = expect(doc, "name", str, where)
    if not TASK_NAME.match(name):
        raise StoreError(f"{where}: task name {name!r} must be letters, digits, '_' or '-' (it names files)")
    sources = expect(doc, "sources", list, where)
    files = expect(doc, "files", dict, where)
    parameters = expect(doc, "parameters", dict, where)
    pins = {} if legacy else expect(doc, "source_pins", dict, where)
    if not all(isinstance(s, str) for s in sources):
        raise StoreError(f"{where}: key 'sources' must be a list of task names, got {sources!r}")
    # a record names its own two files and nothing else: nothing outside the store is read or deleted
    own = {f"{TASKS_DIR}/{name}.safetensors", f"{TASKS_DIR}/{name}.probe.safetensors"}
    if set(files) != own and not (legacy and f"{TASKS_DIR}/{name}.safetensors" in files and set(files) <= own):
        raise StoreError(
            f"{where}: key 'files' must list exactly {sorted(own)} (its tensors and probe), got {sorted(files)}"
        )
    if not all(isinstance(v, str) and SHA256.match(v) for v in files.values()):
        raise StoreError(f"{where}: key 'files' must map each file to its sha256 (64 hexadecimal digits)")
    if (
        not legacy
        and set(pins) != set(sources)
        or not all(isinstance(v, str) and SHA256.match(v) for v in pins.values())
    ):
        raise StoreError(f"{where}: key 'source_pins' must map each of its sources {sources} to a sha256, got {pins!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in parameters.values()):
        raise StoreError(f"{where}: key 'parameters' must map categories to integer counts")
    return TaskRecord(
        name=name,
        type=expect(doc, "type", str, where),
        group=expect(doc, "group", int, where),
        sources=list(sources),
        config=dict(expect(doc, "config", dict, where)),
        files=dict(files),
        parameters=dict(parameters),
        metrics=dict(expect(doc, "metrics", dict, where)),
        model=dict(expect(doc, "model", dict, where, optional=True) or {}),
        dataset=dict(expect(doc, "dataset", dict, where, optional=True) or {}),
        environment=dict(expect(doc, "environment", dict, where, optional=True) or {}),
        source_pins=dict(pins),
    )


def parse_store(doc: Any, path: Path, legacy: bool = False) -> dict[str, Any]:
    """Check the structure of a loaded store.yaml; the tasks come back as TaskRecords. ``legacy``: read a
    store.yaml of schema_version 1 (for ``ModelStore.migrate`` only), which has no digests."""
    if not isinstance(doc, Mapping):
        raise StoreError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    if "schema_version" not in doc:
        raise StoreError(f"{path}: missing key 'schema_version'")
    if legacy:
        if doc["schema_version"] != 1:
            raise StoreError(f"{path}: schema_version {doc['schema_version']!r}, expected 1")
    elif doc["schema_version"] == 1:
        raise StoreError(
            f"{path} has schema_version 1 (no digests, no source pins): run `rcm-nddr store migrate "
            f"{path.parent}` once; it verifies the store and rewrites store.yaml as schema_version {SCHEMA_VERSION}"
        )
    elif doc["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: unknown schema_version {doc['schema_version']!r} (this version reads {SCHEMA_VERSION})"
        )
    else:
        try:
            doc = check_seal(doc, path)
        except SealError as exc:
            raise StoreError(str(exc)) from exc
    backbone = expect(doc, "backbone", dict, str(path))
    where = f"{path}: backbone"
    expect(backbone, "arch", str, where)
    expect(backbone, "reparam", str, where)
    expect(backbone, "ri", bool, where)
    expect(backbone, "output_stride", int, where)
    expect(backbone, "weights", str, where)
    expect(backbone, "weights_sha256", str, where, optional=True)
    expect(backbone, "source_bank_sha256", str, where, optional=True)
    expect(backbone, "filter_bank_sha256", str, where)
    expect(doc, "decomposition_sha256", str, str(path), optional=True)
    calibration = expect(doc, "calibration", dict, str(path), optional=True)
    if calibration is not None:
        where = f"{path}: calibration"
        if not SHA256.match(str(expect(calibration, "sha256", str, where))):
            raise StoreError(f"{where}: key 'sha256' must be 64 hexadecimal digits")
        expect(calibration, "images", int, where)
    tasks_doc = expect(doc, "tasks", list, str(path))
    tasks = [parse_task(t, f"{path}: tasks[{i}]", legacy) for i, t in enumerate(tasks_doc)]
    names = [t.name for t in tasks]
    for t in tasks:
        if names.count(t.name) > 1:
            raise StoreError(f"{path}: task '{t.name}' is listed more than once")
        unknown = [s for s in t.sources if s not in names]
        if unknown:
            raise StoreError(f"{path}: task '{t.name}' reads unregistered task(s) {unknown} (key 'sources')")
        for source, pin in t.source_pins.items():
            held = tasks[names.index(source)]
            if held.files[held.tensors_file] != pin:
                raise StoreError(
                    f"{path}: task '{t.name}' was trained against '{source}' with sha256 {pin}, but the store "
                    f"holds '{source}' with sha256 {held.files[held.tensors_file]}"
                )
    parsed = {
        "schema_version": SCHEMA_VERSION,
        "backbone": dict(backbone),
        "decomposition_sha256": doc.get("decomposition_sha256"),
        "tasks": tasks,
    }
    if calibration is not None:  # (a store written before calibration sets has no key)
        parsed["calibration"] = dict(calibration)
    return parsed


# ----------------------------------------------------------------------------- tensor files


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refused (StoreError) unless it resolves inside the store ``root`` (no absolute
    path, no ``..``, no symbolic link leading out)."""
    path = root / relative
    base = root.resolve()
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(base):
        raise StoreError(f"{root / STORE_FILE} names {relative!r}, which is not inside the store; refused")
    return path


def cpu_tensors(tensors: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """Private, contiguous CPU copies of ``tensors`` (a non-empty dict by name), ready for safetensors."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise StoreError(f"{where}: expected a non-empty dict of tensors by name")
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise StoreError(f"{where}: expected tensors by string name, got {key!r}: {type(value).__name__}")
        # safetensors refuses tensors that share storage (tied weights, views): store private copies.
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> str:
    """Write ``tensors`` to ``path`` atomically; the file's sha256."""
    data = save(tensors)  # bytes: a full disk is then an OSError of the write, not a SafetensorError
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return file_sha256(path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:
        raise StoreError(f"{path} could not be read as safetensors: {exc}") from exc


def copy_file(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` atomically; the copy's sha256."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return file_sha256(target)

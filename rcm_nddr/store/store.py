"""The model store: a directory holding one frozen filter bank and the tasks trained on it, indexed by
``store.yaml`` with the sha256 of every file (DESIGN §6)."""

from __future__ import annotations

import fcntl
import logging
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from rcm_nddr.files import atomic_write, atomic_write_text, file_sha256
from rcm_nddr.nn.filter_bank import filter_bank_sha256

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STORE_FILE = "store.yaml"
LOCK_FILE = "store.yaml.lock"
#: the journal of a registration that replaces files: its new store.yaml and the renames still to do
PENDING_FILE = "store.yaml.pending"
#: suffix of a replacing file written beside the one it replaces, until the journal renames it
STAGED_SUFFIX = ".staged"
BANK_FILE = "filter_bank.safetensors"
DECOMPOSITION_FILE = "ri.safetensors"
TASKS_DIR = "tasks"

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
#: relative tolerance of ``verify``'s probe check for outputs that are not bit-identical (another CPU or
#: BLAS may round differently); any change to a stored file is caught by its sha256 first
PROBE_RTOL = 1e-4


class StoreError(Exception):
    """A model store that is missing, malformed, inconsistent, or asked for something it refuses."""


@dataclass
class TaskRecord:
    """One registered task as listed in ``store.yaml``.

    ``group`` is the 1-based number of the registration that added the task (tasks trained together
    share it), ``sources`` the tasks whose features it reads through NDDR, ``files`` maps paths
    relative to the store to their sha256, ``parameters`` is the task's parameter breakdown by
    category, and ``metrics`` may name its primary metric under ``primary`` (e.g.
    ``{"primary": "mIoU", "mIoU": 33.1}``). ``model`` describes the task's modules (NFF, head, NDDR
    stages, task options, plug-ins) and ``dataset`` its dataset (name, class names), so ``load_model``
    rebuilds it from the store alone. ``environment`` is the provenance of the run that trained it
    (packages, devices, source commit, image, config sha256, seed, command line: its ``env.json``)."""

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


# ----------------------------------------------------------------------------- helpers


def _plain(value: Any, where: str) -> Any:
    """``value`` as YAML/JSON-safe plain data (tuples become lists, paths strings, scalar tensors and
    numpy scalars numbers), so that store.yaml never needs a custom loader."""
    if isinstance(value, str):
        return str(value)  # also str subclasses (e.g. torch.__version__), which YAML cannot represent
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise StoreError(f"{where}: expected plain data (numbers, strings, lists, dicts), got {type(value).__name__}")


def _cpu_tensors(tensors: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise StoreError(f"{where}: expected a non-empty dict of tensors by name")
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise StoreError(f"{where}: expected tensors by string name, got {key!r}: {type(value).__name__}")
        # safetensors refuses tensors that share storage (tied weights, views): store private copies.
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> str:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return file_sha256(path)


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise StoreError(f"{path} could not be read as safetensors: {exc}") from exc


def _expect(doc: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str, optional: bool = False):
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


def _parse_task(doc: Any, where: str) -> TaskRecord:
    if not isinstance(doc, Mapping):
        raise StoreError(f"{where}: expected a mapping, got {doc!r}")
    sources = _expect(doc, "sources", list, where)
    files = _expect(doc, "files", dict, where)
    parameters = _expect(doc, "parameters", dict, where)
    if not all(isinstance(s, str) for s in sources):
        raise StoreError(f"{where}: key 'sources' must be a list of task names, got {sources!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise StoreError(f"{where}: key 'files' must map relative paths to sha256 strings")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in parameters.values()):
        raise StoreError(f"{where}: key 'parameters' must map categories to integer counts")
    return TaskRecord(
        name=_expect(doc, "name", str, where),
        type=_expect(doc, "type", str, where),
        group=_expect(doc, "group", int, where),
        sources=list(sources),
        config=dict(_expect(doc, "config", dict, where)),
        files=dict(files),
        parameters=dict(parameters),
        metrics=dict(_expect(doc, "metrics", dict, where)),
        model=dict(_expect(doc, "model", dict, where, optional=True) or {}),
        dataset=dict(_expect(doc, "dataset", dict, where, optional=True) or {}),
        environment=dict(_expect(doc, "environment", dict, where, optional=True) or {}),
    )


def _parse_store(doc: Any, path: Path) -> dict[str, Any]:
    """Check the structure of a loaded store.yaml; the tasks come back as TaskRecords."""
    if not isinstance(doc, Mapping):
        raise StoreError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    if "schema_version" not in doc:
        raise StoreError(f"{path}: missing key 'schema_version'")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: unknown schema_version {doc['schema_version']!r} (this version reads {SCHEMA_VERSION})"
        )
    backbone = _expect(doc, "backbone", dict, str(path))
    where = f"{path}: backbone"
    _expect(backbone, "arch", str, where)
    _expect(backbone, "reparam", str, where)
    _expect(backbone, "ri", bool, where)
    _expect(backbone, "output_stride", int, where)
    _expect(backbone, "weights", str, where)
    _expect(backbone, "weights_sha256", str, where, optional=True)
    _expect(backbone, "source_bank_sha256", str, where, optional=True)
    _expect(backbone, "filter_bank_sha256", str, where)
    _expect(doc, "decomposition_sha256", str, str(path), optional=True)
    tasks_doc = _expect(doc, "tasks", list, str(path))
    tasks = [_parse_task(t, f"{path}: tasks[{i}]") for i, t in enumerate(tasks_doc)]
    names = [t.name for t in tasks]
    for t in tasks:
        if names.count(t.name) > 1:
            raise StoreError(f"{path}: task '{t.name}' is listed more than once")
        unknown = [s for s in t.sources if s not in names]
        if unknown:
            raise StoreError(f"{path}: task '{t.name}' reads unregistered task(s) {unknown} (key 'sources')")
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": dict(backbone),
        "decomposition_sha256": doc.get("decomposition_sha256"),
        "tasks": tasks,
    }


def _compare_probe(output: Tensor, recorded: Tensor, name: str, path: Path) -> str | None:
    """None when ``output`` equals the recorded probe output (bit for bit, or within rounding)."""
    if output.shape != recorded.shape:
        shapes = f"{tuple(output.shape)} on its probe, {path} records {tuple(recorded.shape)}"
        return f"task '{name}': outputs of shape {shapes}"
    if torch.equal(output, recorded):
        return None
    diff = (output - recorded).abs().max().item()
    scale = recorded.abs().max().item()
    if diff <= PROBE_RTOL * max(scale, 1e-12):
        log.info("task '%s': probe outputs within rounding of %s (max abs diff %.3g)", name, path, diff)
        return None
    return (
        f"task '{name}': its outputs on the probe input differ from {path} (max abs diff {diff:.4g}, scale {scale:.4g})"
    )


def _check_backbone(
    b: Mapping[str, Any],
    store: ModelStore,
    arch: str,
    reparam: str,
    ri: bool,
    output_stride: int,
    weights_source: str,
    source_bank_sha256: str | None,
) -> None:
    """Refuse a backbone other than ``b`` (the store's): ``ModelStore.check_backbone``."""
    asked = {"arch": arch, "reparam": reparam, "ri": ri, "output_stride": output_stride}
    for key, value in asked.items():
        if b.get(key) != value:
            raise StoreError(
                f"{store.store_file} holds a backbone with {key}={b.get(key)!r}, this run asks for {value!r}; "
                "a store holds one filter bank: train into another store, or match the store's backbone"
            )
    recorded = b.get("source_bank_sha256")
    if source_bank_sha256 is not None and recorded is not None and source_bank_sha256 != recorded:
        raise StoreError(
            f"the filter bank from backbone.weights={weights_source} has sha256 {source_bank_sha256}, but the "
            f"store {store.path} was made from a bank with sha256 {recorded} ({b['weights']}); a store holds "
            "one filter bank: train into another store, or use the store's weights"
        )


def _record_from_input(record: TaskRecord | Mapping[str, Any], index: int) -> TaskRecord:
    where = f"register_group: records[{index}]"
    if isinstance(record, TaskRecord):
        record = record.to_dict()
    if not isinstance(record, Mapping):
        raise StoreError(f"{where}: expected a TaskRecord or a dict, got {type(record).__name__}")
    unknown = set(record) - _RECORD_INPUT_KEYS
    if unknown:
        raise StoreError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(_RECORD_INPUT_KEYS)}")
    name = _expect(record, "name", str, where)
    if not _TASK_NAME.match(name):
        raise StoreError(f"{where}: task name {name!r} must be letters, digits, '_' or '-' (it names files)")
    sources = list(record.get("sources") or [])
    if not all(isinstance(s, str) for s in sources):
        raise StoreError(f"{where}: key 'sources' must be a list of task names, got {sources!r}")
    parameters = _plain(dict(record.get("parameters") or {}), f"{where}.parameters")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in parameters.values()):
        raise StoreError(f"{where}: key 'parameters' must map categories to integer counts, got {parameters!r}")
    return TaskRecord(
        name=name,
        type=_expect(record, "type", str, where),
        sources=sources,
        config=_plain(dict(record.get("config") or {}), f"{where}.config"),
        parameters=parameters,
        metrics=_plain(dict(record.get("metrics") or {}), f"{where}.metrics"),
        model=_plain(dict(record.get("model") or {}), f"{where}.model"),
        dataset=_plain(dict(record.get("dataset") or {}), f"{where}.dataset"),
        environment=_plain(dict(record.get("environment") or {}), f"{where}.environment"),
    )


# ----------------------------------------------------------------------------- the store


class ModelStore:
    """A model store directory. Nothing is created until ``create`` or a registration writes.

    Every file is written atomically, and every read-modify-write of store.yaml holds an exclusive
    ``flock`` on ``store.yaml.lock``, so concurrent registrations into one store cannot lose a task."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._held = 0  # depth of _locked() in this object (a nested flock on a new descriptor would block)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.path)!r})"

    @property
    def store_file(self) -> Path:
        return self.path / STORE_FILE

    @property
    def exists(self) -> bool:
        return self.store_file.is_file()

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        path: str | Path,
        arch: str,
        weights_source: str,
        filter_bank: Mapping[str, Tensor],
        decomposition_file: str | Path | None = None,
        weights_sha256: str | None = None,
        reparam: str = "rc",
        ri: bool = False,
        output_stride: int = 16,
        source_bank_sha256: str | None = None,
        exist_ok: bool = False,
    ) -> ModelStore:
        """A new store holding ``filter_bank`` (the bank as the convs use it: rotated by the RI
        eigenvectors when ``ri``), and the RI decomposition, copied in when given.

        ``weights_source`` describes where the bank's weights came from; when it names an existing
        file and ``weights_sha256`` is not given, that file's sha256 is recorded. An existing store is
        an error unless ``exist_ok``: then it must hold the same backbone (arch, ``reparam``, ``ri``,
        output stride) and a bit-identical bank, or it is refused with both sha256s named (a store holds
        one filter bank). Creation happens under the lock, so two runs starting together agree on one
        bank."""
        store = cls(path)
        bank = _cpu_tensors(filter_bank, "filter bank")
        with store._locked():
            if not store.exists:
                if decomposition_file is not None and not Path(decomposition_file).is_file():
                    raise StoreError(f"decomposition file {decomposition_file} does not exist")
                if weights_sha256 is None and Path(weights_source).is_file():
                    weights_sha256 = file_sha256(weights_source)
                _save_tensors(store.path / BANK_FILE, bank)
                decomposition_sha256 = None
                if decomposition_file is not None:
                    decomposition_sha256 = store._copy_decomposition(Path(decomposition_file))
                doc = {
                    "schema_version": SCHEMA_VERSION,
                    "backbone": {
                        "arch": arch,
                        "reparam": reparam,
                        "ri": bool(ri),
                        "output_stride": int(output_stride),
                        "weights": str(weights_source),
                        "weights_sha256": weights_sha256,
                        "source_bank_sha256": source_bank_sha256,
                        "filter_bank_sha256": filter_bank_sha256(bank),
                    },
                    "decomposition_sha256": decomposition_sha256,
                    "tasks": [],
                }
                store._write(doc)
                log.info("model store created at %s (%s, %s, %d bank tensors)", store.path, arch, reparam, len(bank))
                return store
            if not exist_ok:
                raise StoreError(f"a model store already exists at {store.path} ({STORE_FILE} is there)")
            b = store._read()["backbone"]
        _check_backbone(b, store, arch, reparam, ri, output_stride, weights_source, source_bank_sha256)
        actual = filter_bank_sha256(bank)
        if actual != b["filter_bank_sha256"]:
            raise StoreError(
                f"the filter bank from backbone.weights={weights_source} has sha256 {actual}, but the store "
                f"{store.path} holds filter bank sha256 {b['filter_bank_sha256']} (made from {b['weights']}); "
                "a store holds one filter bank: train into another store, or use the store's weights"
            )
        return store

    def check_backbone(
        self,
        arch: str,
        reparam: str,
        ri: bool,
        output_stride: int,
        weights_source: str,
        source_bank_sha256: str | None = None,
    ) -> None:
        """Refuse a backbone other than the store's: arch, ``reparam``, ``ri``, output stride, and the
        sha256 of the pretrained conv weights the bank was made from (both sha256s named)."""
        b = self._read()["backbone"]
        _check_backbone(b, self, arch, reparam, ri, output_stride, weights_source, source_bank_sha256)

    def add_decomposition(self, decomposition_file: str | Path) -> str:
        """Record the RI decomposition (copied to ``ri.safetensors`` unless it is that file already);
        it is written once: a different one is refused. Returns its sha256."""
        source = Path(decomposition_file)
        if not source.is_file():
            raise StoreError(f"decomposition file {source} does not exist")
        with self._locked():
            doc = self._read()
            target = self.path / DECOMPOSITION_FILE
            sha = file_sha256(source)
            if doc["decomposition_sha256"] is not None:
                if doc["decomposition_sha256"] != sha:
                    raise StoreError(
                        f"{self.store_file} already records a different decomposition ({target}); it is written once"
                    )
                return sha
            if source.resolve() != target.resolve():
                sha = self._copy_decomposition(source)
            doc["decomposition_sha256"] = sha
            self._write(doc)
        return sha

    def _copy_decomposition(self, source: Path) -> str:
        target = self.path / DECOMPOSITION_FILE
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
        return file_sha256(target)

    # ------------------------------------------------------------------ reading

    def metadata(self) -> dict[str, Any]:
        """Everything in store.yaml as plain data (tasks as dicts), checked."""
        doc = self._read()
        return {**doc, "tasks": [t.to_dict() for t in doc["tasks"]]}

    @property
    def backbone(self) -> dict[str, Any]:
        return self._read()["backbone"]

    @property
    def tasks(self) -> list[TaskRecord]:
        return self._read()["tasks"]

    def task(self, name: str) -> TaskRecord:
        tasks = self.tasks
        for t in tasks:
            if t.name == name:
                return t
        raise StoreError(f"no task '{name}' in {self.store_file}; registered: {[t.name for t in tasks] or 'none'}")

    def filter_bank(self) -> dict[str, Tensor]:
        """The shared filter bank, checked against its recorded sha256."""
        path = self.path / BANK_FILE
        expected = self._read()["backbone"]["filter_bank_sha256"]
        if not path.is_file():
            raise StoreError(f"filter bank {path} is missing")
        bank = _load_tensors(path)
        actual = filter_bank_sha256(bank)
        if actual != expected:
            raise StoreError(f"sha256 mismatch for {path}: {actual}, {self.store_file} records {expected}")
        return bank

    @property
    def decomposition_path(self) -> Path | None:
        """``ri.safetensors`` after checking its sha256, or None when the store records none."""
        expected = self._read()["decomposition_sha256"]
        if expected is None:
            return None
        path = self.path / DECOMPOSITION_FILE
        self._check_file(path, expected)
        return path

    def load_task_tensors(self, name: str) -> dict[str, Tensor]:
        """Everything task-specific of ``name`` (modulators, BN, downsample, NDDR, head), sha256-checked."""
        record = self.task(name)
        return self._load_checked(record, record.tensors_file)

    def load_probe(self, name: str) -> dict[str, Tensor]:
        """The task's recorded outputs on the fixed probe input, sha256-checked."""
        record = self.task(name)
        if record.probe_file not in record.files:
            raise StoreError(f"task '{name}' in {self.store_file} has no probe")
        return self._load_checked(record, record.probe_file)

    def _load_checked(self, record: TaskRecord, relative: str) -> dict[str, Tensor]:
        if relative not in record.files:
            raise StoreError(f"{self.store_file}: task '{record.name}' lists no file {relative}")
        path = self.path / relative
        self._check_file(path, record.files[relative])
        return _load_tensors(path)

    def _check_file(self, path: Path, expected: str) -> None:
        if not path.is_file():
            raise StoreError(f"{path} is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise StoreError(f"sha256 mismatch for {path}: {actual}, {self.store_file} records {expected}")

    def load_model(
        self,
        tasks: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        deploy: bool = False,
        batched: bool = False,
        check_deploy: bool = True,
    ):
        """A MultiTaskNet computing ``tasks`` (default: every task, in store order): called on a batch of
        ImageNet-normalized images it returns ``{task: prediction}`` post-processed at input resolution
        (``raw=True`` for the heads' outputs). The tasks they read through NDDR are added as sources
        (without heads). Every file is sha256-checked; the module is in eval mode with no parameter
        requiring a gradient, on ``device`` (default CPU; ``"auto"``: CUDA when available).

        ``deploy``: the inference form (``rcm_nddr.nn.deploy``): modulators folded into the filter bank, every
        BatchNorm into its conv, the stem's bank response shared by the tasks; same outputs, up to
        float rounding, at the cost of plain networks.

        ``batched`` (only with ``deploy=True``, else ValueError): the deploy form's batched execution
        (``rcm_nddr.nn.deploy.BatchedMultiTaskNet``): all tasks' features as one stacked tensor, each backbone
        conv of all tasks as one grouped conv and each stage's NDDR fusion as one 1x1 conv; the heads
        still run per task. Same outputs, up to float rounding; the whole stack runs whichever ``tasks``
        a call asks for.

        ``check_deploy`` (default): the deploy form runs, on the CPU in fp32, each of its tasks' recorded
        probe input and must give the recorded outputs within ``PROBE_RTOL``, else StoreError: folding is
        exact for the built-in layers, and this catches a plug-in head it would not be exact for."""
        if batched and not deploy:
            raise ValueError("load_model(batched=True) batches the deploy form: pass deploy=True as well")
        with self._locked(shared=True):
            doc = self._read()
            model = self._assemble(doc, list(tasks) if tasks is not None else None, {}, None)
            if deploy:
                from rcm_nddr.nn.deploy import deploy as deploy_form

                model = deploy_form(model, batched=batched)
                if check_deploy:
                    self._check_deploy_form(model, doc)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return model.to(device or "cpu")

    def _check_deploy_form(self, model, doc: Mapping[str, Any]) -> None:
        """StoreError naming every task of ``model`` (the deploy form, on the CPU) whose outputs on its
        probe input differ from the recorded ones (``doc``'s records) beyond rounding."""
        names = set(model.task_names)
        problems = self._run_probes(model, [r for r in doc["tasks"] if r.name in names and r.probe_file in r.files])
        if problems:
            raise StoreError(
                "the deploy form does not reproduce the stored tasks: "
                + "; ".join(problems)
                + " (load the model without deploy=True, or rcm-nddr predict --form training)"
            )

    def compute_probes(
        self,
        records: Sequence[TaskRecord | Mapping[str, Any]],
        tensors: Mapping[str, Mapping[str, Tensor]],
    ) -> dict[str, dict[str, Tensor]]:
        """The probe of each task of a group about to be registered (``records`` and ``tensors`` as for
        ``register_group``): its raw outputs on the fixed probe input, computed on the CPU exactly as
        ``load_model`` will compute them once the group is registered. ``store verify`` runs them again."""
        from rcm_nddr.nn.assembly import probe_input, probe_outputs

        new = [_record_from_input(r, i) for i, r in enumerate(records)]
        with self._locked(shared=True):
            doc = self._read()
            model = self._assemble(doc, [r.name for r in new], {r.name: (r, tensors[r.name]) for r in new})
        images = probe_input()
        outputs = probe_outputs(model, [r.name for r in new], images)
        return {name: {"input": images, "output": out} for name, out in outputs.items()}

    def _assemble(
        self,
        doc: Mapping[str, Any],
        names: list[str] | None,
        extra: Mapping[str, tuple[TaskRecord, Mapping[str, Tensor]]],
        device: str | torch.device | None = None,
    ):
        """``load_model`` over the store's records plus ``extra`` records and tensors not written yet."""
        from rcm_nddr.nn.assembly import AssemblyError, assemble
        from rcm_nddr.registry import RegistryError

        records = [t for t in doc["tasks"] if t.name not in extra] + [r for r, _ in extra.values()]
        if names is None:
            names = [r.name for r in records]
        if not names:
            raise StoreError(f"{self.store_file} registers no tasks yet")
        known = {r.name: r for r in records}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise StoreError(f"no task(s) {unknown} in {self.store_file}; registered: {list(known) or 'none'}")

        def load(name: str) -> Mapping[str, Tensor]:
            return extra[name][1] if name in extra else self._load_checked(known[name], known[name].tensors_file)

        try:
            model = assemble(doc["backbone"], self.filter_bank(), records, names, load)
        except (AssemblyError, RegistryError) as exc:
            raise StoreError(f"{self.store_file}: {exc}") from exc
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return model.to(device or "cpu")

    def verify(self, probes: bool = True) -> list[str]:
        """Every problem found: files missing, sha256 mismatches (bank, decomposition, task files and
        probes) and, with ``probes``, tasks whose outputs on their probe input differ from the recorded
        ones (beyond rounding: relative tolerance ``PROBE_RTOL``). Empty when the store is intact. A
        store.yaml that cannot be read raises StoreError."""
        with self._locked(shared=True):
            doc = self._read()
            problems = []
            try:
                self.filter_bank()
            except StoreError as exc:
                problems.append(str(exc))
            expected = doc["decomposition_sha256"]
            if expected is not None:
                problems += self._file_problems(self.path / DECOMPOSITION_FILE, expected)
            for record in doc["tasks"]:
                for relative, sha in record.files.items():
                    problems += self._file_problems(self.path / relative, sha)
            # Probes run only on intact files: a changed file is already named by its sha256.
            if probes and not problems:
                problems += self._probe_problems(doc)
        return problems

    def _probe_problems(self, doc: Mapping[str, Any]) -> list[str]:
        """Run every task with a probe on its probe input and compare with the recorded outputs."""
        with_probe = [r for r in doc["tasks"] if r.probe_file in r.files]
        if not with_probe:
            return []
        try:
            model = self._assemble(doc, [r.name for r in with_probe], {})
        except StoreError as exc:
            return [f"the tasks could not be loaded to run their probes: {exc}"]
        return self._run_probes(model, with_probe)

    def _run_probes(self, model, records: Sequence[TaskRecord]) -> list[str]:
        """Run each of ``records``' tasks in ``model`` on its recorded probe input (sha256-checked); what
        differs from the recorded outputs."""
        from rcm_nddr.nn.assembly import probe_outputs

        problems = []
        for record in records:
            probe = self._load_checked(record, record.probe_file)
            if set(probe) != {"input", "output"}:
                problems.append(
                    f"{self.path / record.probe_file}: expected tensors 'input' and 'output', got {sorted(probe)}"
                )
                continue
            output = probe_outputs(model, [record.name], probe["input"])[record.name]
            problem = _compare_probe(output, probe["output"], record.name, self.path / record.probe_file)
            if problem:
                problems.append(problem)
        return problems

    def _file_problems(self, path: Path, expected: str) -> list[str]:
        try:
            self._check_file(path, expected)
        except StoreError as exc:
            return [str(exc)]
        return []

    # ------------------------------------------------------------------ writing

    def register_group(
        self,
        records: Sequence[TaskRecord | Mapping[str, Any]],
        tensors: Mapping[str, Mapping[str, Tensor]],
        probes: Mapping[str, Mapping[str, Tensor]] | None = None,
        replace: bool = False,
    ) -> list[TaskRecord]:
        """Register the tasks trained together as one new group and return their records.

        ``records`` give each task's ``name``, ``type`` and optionally ``sources``, ``config``,
        ``parameters`` and ``metrics`` (``group`` and ``files`` are filled in here); ``tensors`` and
        ``probes`` map task names to their state and probe outputs. A registered name is refused
        unless ``replace``, which is refused in turn while a task outside the group reads it."""
        probes = dict(probes or {})
        new = [_record_from_input(r, i) for i, r in enumerate(records)]
        names = [r.name for r in new]
        if not new:
            raise StoreError("register_group: no task records given")
        if len(set(names)) != len(names):
            raise StoreError(f"register_group: a task name appears twice in {names}")
        if set(tensors) != set(names):
            raise StoreError(f"register_group: tensors are given for {sorted(tensors)}, expected {sorted(names)}")
        if not set(probes) <= set(names):
            raise StoreError(f"register_group: probes for unknown task(s) {sorted(set(probes) - set(names))}")
        state = {n: _cpu_tensors(tensors[n], f"tensors of task '{n}'") for n in names}
        probe_state = {n: _cpu_tensors(p, f"probe of task '{n}'") for n, p in probes.items()}

        with self._locked():
            doc = self._read()
            existing = doc["tasks"]
            self._check_registration(existing, new, replace)
            group = max((t.group for t in existing), default=0) + 1
            replaced = {t.name: t for t in existing if t.name in names}
            # A file that a registered task still owns is not overwritten in place: the new one is staged
            # beside it and renamed by a journal (PENDING_FILE), so a crash at any point leaves either the
            # old store or, once the journal is written, one that the next access completes.
            staged: dict[str, str] = {}

            def save(relative: str, tensors: dict[str, Tensor]) -> str:
                final = self.path / relative
                if not final.exists():
                    return _save_tensors(final, tensors)
                staged[relative + STAGED_SUFFIX] = relative
                return _save_tensors(self.path / (relative + STAGED_SUFFIX), tensors)

            for record in new:
                record.group = group
                record.files[record.tensors_file] = save(record.tensors_file, state[record.name])
                if record.name in probe_state:
                    record.files[record.probe_file] = save(record.probe_file, probe_state[record.name])
            doc["tasks"] = [t for t in existing if t.name not in names] + new
            if staged:
                journal = {"store": self._plain_doc(doc), "renames": staged}
                atomic_write_text(self.path / PENDING_FILE, yaml.safe_dump(journal, sort_keys=False))
                self._finish_pending()
            else:
                self._write(doc)
            for old in replaced.values():  # e.g. a probe the new version no longer has
                new_files = next(r.files for r in new if r.name == old.name)
                for relative in set(old.files) - set(new_files):
                    (self.path / relative).unlink(missing_ok=True)
        log.info("registered group %d in %s: %s", group, self.path, ", ".join(names))
        return new

    def _check_registration(self, existing: list[TaskRecord], new: list[TaskRecord], replace: bool) -> None:
        names = {r.name for r in new}
        taken = [t for t in existing if t.name in names]
        if taken and not replace:
            listed = ", ".join(f"'{t.name}' (group {t.group})" for t in taken)
            raise StoreError(f"{self.store_file} already registers {listed}; pass replace=True to retrain")
        readers = sorted({t.name for t in existing if t.name not in names and set(t.sources) & names})
        if taken and readers:
            raise StoreError(
                f"cannot replace {sorted(t.name for t in taken)} in {self.store_file}: "
                f"task(s) {readers} read them through NDDR (key 'sources')"
            )
        known = {t.name for t in existing} | names
        for r in new:
            unknown = [s for s in r.sources if s not in known]
            if unknown:
                raise StoreError(f"task '{r.name}' reads unregistered task(s) {unknown} (key 'sources')")
            if r.name in r.sources:
                raise StoreError(f"task '{r.name}' lists itself in its 'sources'")

    def remove(self, name: str) -> None:
        """Remove a task's record and files; refused while another task reads it through NDDR."""
        with self._locked():
            doc = self._read()
            tasks = doc["tasks"]
            record = next((t for t in tasks if t.name == name), None)
            if record is None:
                raise StoreError(
                    f"no task '{name}' in {self.store_file}; registered: {[t.name for t in tasks] or 'none'}"
                )
            readers = [t.name for t in tasks if name in t.sources]
            if readers:
                raise StoreError(f"cannot remove '{name}' from {self.store_file}: task(s) {readers} read it")
            doc["tasks"] = [t for t in tasks if t.name != name]
            # store.yaml first: a crash in between leaves stray files, never a record without its files
            self._write(doc)
            for relative in record.files:
                (self.path / relative).unlink(missing_ok=True)
        log.info("removed task '%s' from %s", name, self.path)

    # ------------------------------------------------------------------ store.yaml

    @contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        lock_path = self.path / LOCK_FILE
        if shared and not lock_path.exists():
            yield  # nobody has written yet, so nobody is writing
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self._held += 1
            try:
                if not shared:
                    self._clean_staged()
                if (self.path / PENDING_FILE).exists():
                    if shared:  # completing the journal writes: take the lock exclusively meanwhile
                        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                    self._finish_pending()
                    if shared:
                        fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
                yield
            finally:
                self._held -= 1
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _finish_pending(self) -> None:
        """Complete a journaled registration (under the exclusive lock): rename the staged files that are
        still there over the files they replace, write the journal's store.yaml, drop the journal. Each
        step can be repeated, so a crash during this is completed by the next access."""
        pending = self.path / PENDING_FILE
        if not pending.exists():
            return
        try:
            journal = yaml.safe_load(pending.read_text())
            renames, doc = dict(journal["renames"]), journal["store"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise StoreError(f"{pending}: the journal of an interrupted registration is unreadable: {exc}") from exc
        for staged, final in renames.items():
            if (self.path / staged).exists():
                (self.path / staged).replace(self.path / final)
        atomic_write_text(self.store_file, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        pending.unlink()
        log.info("completed an interrupted registration in %s", self.path)

    def _clean_staged(self) -> None:
        """Delete staged files of a registration that died before writing its journal (the store never
        referred to them); under the exclusive lock, with no journal pending."""
        if (self.path / PENDING_FILE).exists() or not (self.path / TASKS_DIR).is_dir():
            return
        for path in (self.path / TASKS_DIR).glob(f"*{STAGED_SUFFIX}"):
            path.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any]:
        if not self._held and (self.path / PENDING_FILE).exists():
            with self._locked():  # completes the interrupted registration first
                pass
        if not self.store_file.is_file():
            raise StoreError(f"no model store at {self.path} ({STORE_FILE} is missing)")
        try:
            doc = yaml.safe_load(self.store_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise StoreError(f"{self.store_file} could not be read as YAML: {exc}") from exc
        return _parse_store(doc, self.store_file)

    @staticmethod
    def _plain_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
        plain = {**doc, "tasks": [t.to_dict() if isinstance(t, TaskRecord) else t for t in doc["tasks"]]}
        return _plain(plain, STORE_FILE)

    def _write(self, doc: Mapping[str, Any]) -> None:
        text = yaml.safe_dump(self._plain_doc(doc), sort_keys=False, default_flow_style=False)
        atomic_write_text(self.store_file, text)

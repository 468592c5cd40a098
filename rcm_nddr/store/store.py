"""The model store: a directory holding one frozen filter bank and the tasks trained on it, indexed by
``store.yaml`` with the sha256 of every file (DESIGN §6)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcm_nddr.files import atomic_write, file_sha256
from rcm_nddr.nn.filter_bank import filter_bank_sha256
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.precision import PrecisionError, precision_of
from rcm_nddr.store import loading
from rcm_nddr.store.format import (
    BANK_FILE,
    CALIBRATION_FILE,
    DECOMPOSITION_FILE,
    SCHEMA_VERSION,
    STAGED_SUFFIX,
    STORE_FILE,
    StoreError,
    TaskRecord,
    copy_file,
    cpu_tensors,
    inside,
    load_tensors,
    new_store_doc,
    save_tensors,
)
from rcm_nddr.store.index import StoreIndex
from rcm_nddr.store.integrity import (
    check_backbone,
    check_file,
    check_same_bank,
    keeps_bank,
    load_checked,
    run_probes,
    stored_bank,
    stored_file_problems,
)
from rcm_nddr.store.registration import check_registration, checked_group, pin_sources, record_from_input

log = logging.getLogger(__name__)


class ModelStore:
    """A model store directory. Nothing is created until ``create`` or a registration writes.

    Every file is written atomically, and every read-modify-write of store.yaml holds an exclusive
    ``flock`` on ``store.yaml.lock``, so concurrent registrations into one store cannot lose a task."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._index = StoreIndex(self.path)

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
        decomposition_content: bytes | None = None,
    ) -> ModelStore:
        """A new store holding ``filter_bank`` (the bank as the convs use it: rotated by the RI
        eigenvectors when ``ri``; only its sha256 for plain networks, ``reparam: none``, whose task files
        hold every weight), and the RI decomposition: ``decomposition_content`` (the file's bytes) written,
        or ``decomposition_file`` copied in, when given.

        ``weights_source`` describes where the bank's weights came from; when it names an existing
        file and ``weights_sha256`` is not given, that file's sha256 is recorded. An existing store is
        an error unless ``exist_ok``: then it must hold the same backbone (arch, ``reparam``, ``ri``,
        output stride) and a bit-identical bank, or it is refused with both sha256s named (a store holds
        one filter bank). Creation happens under the lock: of runs starting together the first writes
        the bank and the decomposition, the others check that their bank is the same and write
        nothing."""
        store = cls(path)
        bank = cpu_tensors(filter_bank, "filter bank")
        with store._index.locked():
            if not store.exists:
                if (
                    decomposition_content is None
                    and decomposition_file is not None
                    and not Path(decomposition_file).is_file()
                ):
                    raise StoreError(f"decomposition file {decomposition_file} does not exist")
                if weights_sha256 is None and Path(weights_source).is_file():
                    weights_sha256 = file_sha256(weights_source)
                if keeps_bank({"reparam": reparam}):  # plain networks' task files hold every weight
                    save_tensors(store.path / BANK_FILE, bank)
                decomposition_sha256 = None
                if decomposition_content is not None:
                    target = store.path / DECOMPOSITION_FILE
                    atomic_write(target, lambda tmp: tmp.write_bytes(decomposition_content))
                    decomposition_sha256 = file_sha256(target)
                elif decomposition_file is not None:
                    decomposition_sha256 = copy_file(Path(decomposition_file), store.path / DECOMPOSITION_FILE)
                backbone = {
                    "arch": arch,
                    "reparam": reparam,
                    "ri": bool(ri),
                    "output_stride": int(output_stride),
                    "weights": str(weights_source),
                    "weights_sha256": weights_sha256,
                    "source_bank_sha256": source_bank_sha256,
                    "filter_bank_sha256": filter_bank_sha256(bank),
                }
                store._index.write(new_store_doc(backbone, decomposition_sha256))
                log.info("model store created at %s (%s, %s, %d bank tensors)", store.path, arch, reparam, len(bank))
                return store
            if not exist_ok:
                raise StoreError(f"a model store already exists at {store.path} ({STORE_FILE} is there)")
            b = store._index.read()["backbone"]
        check_backbone(b, store.path, arch, reparam, ri, output_stride, weights_source, source_bank_sha256)
        check_same_bank(b, store.path, bank, weights_source)
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
        b = self._index.read()["backbone"]
        check_backbone(b, self.path, arch, reparam, ri, output_stride, weights_source, source_bank_sha256)

    def add_decomposition(self, decomposition_file: str | Path) -> str:
        """Record the RI decomposition (copied to ``ri.safetensors`` unless it is that file already);
        it is written once: a different one is refused. Returns its sha256."""
        source = Path(decomposition_file)
        if not source.is_file():
            raise StoreError(f"decomposition file {source} does not exist")
        with self._index.locked():
            doc = self._index.read()
            target = self.path / DECOMPOSITION_FILE
            sha = file_sha256(source)
            if doc["decomposition_sha256"] is not None:
                if doc["decomposition_sha256"] != sha:
                    raise StoreError(
                        f"{self.store_file} already records a different decomposition ({target}); it is written once"
                    )
                return sha
            if source.resolve() != target.resolve():
                sha = copy_file(source, target)
            doc["decomposition_sha256"] = sha
            self._index.write(doc)
        return sha

    # ------------------------------------------------------------------ reading

    def metadata(self) -> dict[str, Any]:
        """Everything in store.yaml as plain data (tasks as dicts), checked."""
        doc = self._index.read()
        return {**doc, "tasks": [t.to_dict() for t in doc["tasks"]]}

    @property
    def backbone(self) -> dict[str, Any]:
        return self._index.read()["backbone"]

    @property
    def tasks(self) -> list[TaskRecord]:
        return self._index.read()["tasks"]

    def task(self, name: str) -> TaskRecord:
        tasks = self.tasks
        for t in tasks:
            if t.name == name:
                return t
        raise StoreError(f"no task '{name}' in {self.store_file}; registered: {[t.name for t in tasks] or 'none'}")

    def filter_bank(self) -> dict[str, Tensor] | None:
        """The shared filter bank, checked against its recorded sha256; None for a store of plain networks
        (``backbone.reparam: none``), which writes no bank file (only its sha256)."""
        return stored_bank(self.path, self._index.read()["backbone"])

    @property
    def decomposition_path(self) -> Path | None:
        """``ri.safetensors`` after checking its sha256, or None when the store records none."""
        expected = self._index.read()["decomposition_sha256"]
        if expected is None:
            return None
        path = self.path / DECOMPOSITION_FILE
        check_file(self.path, path, expected)
        return path

    def load_task_tensors(self, name: str) -> dict[str, Tensor]:
        """Everything task-specific of ``name`` (modulators, BN, downsample, NDDR, head), sha256-checked."""
        record = self.task(name)
        return load_checked(self.path, record, record.tensors_file)

    def calibration_images(self) -> Tensor | None:
        """The store's int8 calibration set (uint8 RGB, N x 3 x H x W), sha256-checked; None when it keeps
        none (a store registered before calibration sets were kept)."""
        with self._index.locked(shared=True):
            recorded = self._index.read().get("calibration")
            if recorded is None:
                return None
            check_file(self.path, self.path / CALIBRATION_FILE, recorded["sha256"])
            tensors = load_tensors(self.path / CALIBRATION_FILE)
        if "images" not in tensors:
            raise StoreError(f"{self.path / CALIBRATION_FILE}: expected a tensor 'images', got {sorted(tensors)}")
        return tensors["images"]

    def add_calibration(self, images: Tensor, source: str) -> bool:
        """Keep ``images`` (uint8 RGB, N x 3 x H x W: training crops) as the store's int8 calibration set,
        with the sha256 of its file and ``source`` (where the crops came from) in store.yaml. Written once:
        False, writing nothing, when the store keeps one already."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
            raise StoreError(
                f"a calibration set is uint8 N x 3 x H x W with N > 0, got {images.dtype} {tuple(images.shape)}"
            )
        with self._index.locked():
            doc = self._index.read()
            if doc.get("calibration") is not None:
                return False
            sha = save_tensors(self.path / CALIBRATION_FILE, {"images": images.detach().cpu().contiguous()})
            size = [int(images.shape[2]), int(images.shape[3])]
            doc["calibration"] = {"sha256": sha, "images": int(len(images)), "size": size, "source": source}
            self._index.write(doc)
        log.info("calibration set of %d images (%dx%d) kept in %s", len(images), *size, self.path)
        return True

    def load_probe(self, name: str) -> dict[str, Tensor]:
        """The task's recorded outputs on the fixed probe input, sha256-checked."""
        record = self.task(name)
        if record.probe_file not in record.files:
            raise StoreError(f"task '{name}' in {self.store_file} has no probe")
        return load_checked(self.path, record, record.probe_file)

    def load_model(
        self,
        tasks: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        deploy: bool = False,
        batched: bool = False,
        check_deploy: bool = True,
        allow_plugins: Sequence[str] = (),
        precision: str = "fp32",
        calibration: Tensor | Sequence[Tensor] | None = None,
    ) -> MultiTaskNet:
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
        exact for the built-in layers, and this catches a plug-in head it would not be exact for.

        ``allow_plugins``: the plug-ins (module names or ``.py`` paths) that store records name and that
        may be imported to define their task types. A store runs no code of its own accord: a type that
        is not built in, installed or already imported needs its plug-in listed here, else StoreError.

        ``precision`` (only with ``deploy=True``; ``rcm_nddr.nn.precision``): ``fp32``; ``bf16`` (weights and
        activations in bfloat16; on a CPU without bf16 matrix instructions it runs slower than fp32, which
        is logged); ``int8`` (post-training static quantization with PyTorch's FX graph mode on the x86
        engine, CPU only, not batched), calibrated on ``calibration`` (ImageNet-normalized float images:
        one N x 3 x H x W tensor or a sequence of batches) or by default on the calibration set the store
        keeps (training crops recorded at registration); on a machine whose PyTorch or CPU cannot run int8
        it logs why and stays fp32. With ``check_deploy`` the reduced-precision form must reproduce each
        task's recorded probe outputs within the precision's tolerance (``PRECISION_RTOL``), else
        StoreError naming the tasks."""
        precision = precision_of(precision)
        if batched and not deploy:
            raise ValueError("load_model(batched=True) batches the deploy form: pass deploy=True as well")
        if precision != "fp32" and not deploy:
            raise ValueError(f"load_model(precision={precision!r}) applies to the deploy form: pass deploy=True")
        if precision == "int8" and batched:
            raise PrecisionError("int8 quantizes the deploy form that runs the tasks one by one, not the batched one")
        if precision == "int8" and loading.on_device_type(device) != "cpu":
            raise PrecisionError(f"int8 runs on the CPU (x86), not on {device}: use bf16 on a GPU")

        def batches() -> list[Tensor]:
            if calibration is None:
                images = self.calibration_images()
                if images is None:
                    raise StoreError(
                        f"{self.store_file} keeps no calibration set (it was registered before calibration sets "
                        "were kept): give int8 calibration images (rcm-nddr predict --calibration DIR; Python: "
                        "load_model(calibration=...))"
                    )
                return loading.calibration_batches(images)
            if isinstance(calibration, Tensor):
                return list(calibration.split(loading.CALIBRATION_BATCH))
            return list(calibration)

        with self._index.locked(shared=True):
            doc = self._index.read()
            model = loading.load_model(
                self.path, doc, tasks, deploy, batched, check_deploy, allow_plugins, precision, batches
            )
        return loading.on_device(model, device)

    def compute_probes(
        self,
        records: Sequence[TaskRecord | Mapping[str, Any]],
        tensors: Mapping[str, Mapping[str, Tensor]],
    ) -> dict[str, dict[str, Tensor]]:
        """The probe of each task of a group about to be registered (``records`` and ``tensors`` as for
        ``register_group``): its raw outputs on the fixed probe input, computed on the CPU exactly as
        ``load_model`` will compute them once the group is registered. ``store verify`` runs them again."""
        new = [record_from_input(r, i) for i, r in enumerate(records)]
        names = [r.name for r in new]
        with self._index.locked(shared=True):
            extra = {r.name: (r, tensors[r.name]) for r in new}
            model = loading.assemble_tasks(self.path, self._index.read(), names, extra)
        return loading.compute_probes(model, names)

    def verify(self, probes: bool = True, allow_plugins: Sequence[str] = ()) -> list[str]:
        """Every problem found: files missing, sha256 mismatches (bank, decomposition, task files and
        probes) and, with ``probes``, tasks whose outputs on their probe input differ from the recorded
        ones (beyond rounding: relative tolerance ``PROBE_RTOL``). Empty when the store is intact. A
        store.yaml that does not match its digests, or names a plug-in not in ``allow_plugins`` (see
        ``load_model``), raises StoreError."""
        with self._index.locked(shared=True):
            doc = self._index.read()
            problems = stored_file_problems(self.path, doc)
            # Probes run only on intact files: a changed file is already named by its sha256.
            if probes and not problems:
                problems += loading.probe_problems(self.path, doc, allow_plugins)
        return problems

    # ------------------------------------------------------------------ writing

    def register_group(
        self,
        records: Sequence[TaskRecord | Mapping[str, Any]],
        tensors: Mapping[str, Mapping[str, Tensor]],
        probes: Mapping[str, Mapping[str, Tensor]],
        replace: bool = False,
    ) -> list[TaskRecord]:
        """Register the tasks trained together as one new group and return their records.

        ``records`` give each task's ``name``, ``type`` and optionally ``sources``, ``config``,
        ``parameters``, ``metrics`` and ``source_pins`` (``group`` and ``files`` are filled in here);
        ``tensors`` and ``probes`` map every task name to its state and its probe (``compute_probes``).
        A registered name is refused unless ``replace``, which is refused in turn while a task outside
        the group reads it; so is a tensor with NaN or infinite values, and a source whose tensors file
        is no longer the one ``source_pins`` names (it was replaced while this group trained)."""
        new, state, probe_state = checked_group(records, tensors, dict(probes))
        names = [r.name for r in new]
        with self._index.locked():
            doc = self._index.read()
            existing = doc["tasks"]
            check_registration(self.store_file, existing, new, replace)
            group = max((t.group for t in existing), default=0) + 1
            # A file that a registered task still owns is not overwritten in place: the new one is staged
            # beside it and renamed by a journal (PENDING_FILE), so a crash at any point leaves either the
            # old store or, once the journal is written, one that the next access completes.
            staged: dict[str, str] = {}

            def save(relative: str, tensors: dict[str, Tensor]) -> str:
                final = inside(self.path, relative)
                if not final.exists():
                    return save_tensors(final, tensors)
                staged[relative + STAGED_SUFFIX] = relative
                return save_tensors(self.path / (relative + STAGED_SUFFIX), tensors)

            for record in new:
                record.group = group
                record.files[record.tensors_file] = save(record.tensors_file, state[record.name])
                record.files[record.probe_file] = save(record.probe_file, probe_state[record.name])
            pin_sources(new, existing)
            doc["tasks"] = [t for t in existing if t.name not in names] + new
            if staged:
                self._index.write_journal(doc, staged)
                self._finish_pending()
            else:
                self._index.write(doc)
        log.info("registered group %d in %s: %s", group, self.path, ", ".join(names))
        return new

    def _finish_pending(self) -> None:
        # Its own method so that a test can crash a registration between its journal and its renames.
        self._index.finish_pending()

    def migrate(self, allow_plugins: Sequence[str] = ()) -> list[str]:
        """Rewrite a store.yaml of schema_version 1 as the current one, under the lock: every file is
        checked against its sha256 and every recorded probe re-run first (any problem refuses the
        migration and changes nothing); a task without a probe gets one, each task's sources are pinned,
        and store.yaml is sealed by its digests. No tensor file is touched. Returns what it did (empty:
        the store is current)."""
        with self._index.locked():
            if self._index.schema_version() != 1:
                self._index.read()  # current (checked), or refused naming why
                return []
            doc = self._index.read(legacy=True)
            problems = stored_file_problems(self.path, doc)
            records = doc["tasks"]
            model = None
            if records and not problems:
                model = loading.assemble_tasks(self.path, doc, None, {}, allow_plugins)
                problems = run_probes(self.path, model, [r for r in records if r.probe_file in r.files])
            if problems:
                raise StoreError(f"{self.store_file} was not migrated: " + "; ".join(problems))
            done = []
            missing = [r.name for r in records if r.probe_file not in r.files]
            probes = loading.compute_probes(model, missing) if missing else {}
            for record in records:
                if record.name in probes:
                    tensors = cpu_tensors(probes[record.name], f"probe of task '{record.name}'")
                    record.files[record.probe_file] = save_tensors(inside(self.path, record.probe_file), tensors)
                    done.append(f"recorded the probe of task '{record.name}'")
            pin_sources(records, [])
            done += [f"pinned the sources of task '{r.name}': {r.sources}" for r in records if r.sources]
            self._index.write(doc)
            done.append(f"sealed {self.store_file} as schema_version {SCHEMA_VERSION}")
        log.info("migrated %s: %s", self.path, "; ".join(done))
        return done

    def remove(self, name: str) -> None:
        """Remove a task's record and files; refused while another task reads it through NDDR."""
        with self._index.locked():
            doc = self._index.read()
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
            doomed = [inside(self.path, relative) for relative in record.files]  # refused before any change
            # store.yaml first: a crash in between leaves stray files, never a record without its files
            self._index.write(doc)
            for path in doomed:
                path.unlink(missing_ok=True)
        log.info("removed task '%s' from %s", name, self.path)

"""Networks built from a model store: the tasks' records and sha256-checked tensors assembled on the
shared filter bank, in the training or the deploy form, and run on their probe inputs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD
from rcm_nddr.nn.assembly import AssemblyError, assemble, plugin_paths, probe_input, probe_outputs
from rcm_nddr.nn.deploy import deploy as deploy_form
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.precision import BF16_CPU_FLAGS, bf16_is_native, int8_unsupported, quantize_int8, to_bf16
from rcm_nddr.registry import TASKS, RegistryError, discover
from rcm_nddr.store.format import STORE_FILE, StoreError, TaskRecord, inside
from rcm_nddr.store.integrity import check_file, load_checked, run_probes, stored_bank

log = logging.getLogger(__name__)

#: the records and tensors of tasks about to be registered, by name
Extra = Mapping[str, tuple[TaskRecord, Mapping[str, Tensor]]]
#: images per batch of int8 calibration
CALIBRATION_BATCH = 16


def import_plugins(store_file: Path, records: Sequence[TaskRecord], allow_plugins: Sequence[str]) -> None:
    """Make the task types of ``records`` known. A type that is not built in, installed (entry point
    ``rcm_nddr.tasks``) or already imported needs the plug-ins its record names, and those are imported
    only when ``allow_plugins`` lists them (as a module name or a ``.py`` path): a store never runs code
    it names on its own. StoreError names each plug-in and how to allow it."""
    discover()
    allowed = set(plugin_paths(allow_plugins))
    for record in records:
        if record.type in TASKS:
            continue
        named = [p for p in record.model.get("plugins") or [] if isinstance(p, str)]
        if not named:
            raise StoreError(
                f"{store_file}: task '{record.name}' has type '{record.type}', which no installed plug-in "
                f"registers (known: {', '.join(TASKS.names())}); install or import the plug-in that defines it"
            )
        refused = [p for p in plugin_paths(named) if p not in allowed]
        if refused:
            flags = " ".join(f"--allow-plugins {p}" for p in refused)
            raise StoreError(
                f"{store_file}: task '{record.name}' has type '{record.type}', registered by plug-in(s) {refused} "
                f"that the store names; a store runs no code unless you allow it: if you trust that code, pass "
                f"{flags} (Python: allow_plugins=[...]), or install the plug-in as an entry point"
            )
        try:
            discover(plugin_paths(named))
        except Exception as exc:
            raise StoreError(f"{store_file}: task '{record.name}': plug-in(s) {named} failed to load: {exc}") from exc


def assemble_tasks(
    root: Path,
    doc: Mapping[str, Any],
    names: Sequence[str] | None,
    extra: Extra,
    allow_plugins: Sequence[str] = (),
) -> MultiTaskNet:
    """The MultiTaskNet (training form, CPU) of the tasks ``names`` (default: all) of the store ``root``
    whose store.yaml is ``doc``, plus ``extra`` records and tensors not written yet; the plug-ins the
    records name are imported only where ``allow_plugins`` lists them (``import_plugins``)."""
    store_file = root / STORE_FILE
    records = [t for t in doc["tasks"] if t.name not in extra] + [r for r, _ in extra.values()]
    if names is None:
        names = [r.name for r in records]
    if not names:
        raise StoreError(f"{store_file} registers no tasks yet")
    known = {r.name: r for r in records}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StoreError(f"no task(s) {unknown} in {store_file}; registered: {list(known) or 'none'}")

    def load(name: str) -> Mapping[str, Tensor]:
        return extra[name][1] if name in extra else load_checked(root, known[name], known[name].tensors_file)

    import_plugins(store_file, [known[n] for n in names], allow_plugins)
    bank = stored_bank(root, doc["backbone"])
    try:
        model = assemble(doc["backbone"], bank, records, list(names), load)
    except (AssemblyError, RegistryError) as exc:
        raise StoreError(f"{store_file}: {exc}") from exc
    return model.to("cpu")


def load_model(
    root: Path,
    doc: Mapping[str, Any],
    tasks: Sequence[str] | None,
    deploy: bool,
    batched: bool,
    check_deploy: bool,
    allow_plugins: Sequence[str] = (),
    precision: str = "fp32",
    calibration: Callable[[], Sequence[Tensor]] | None = None,
) -> MultiTaskNet:
    """``ModelStore.load_model`` on the CPU, over the store ``root`` whose store.yaml is ``doc``;
    ``calibration`` gives the int8 calibration batches when called."""
    names = set(tasks) if tasks is not None else {r.name for r in doc["tasks"]}
    for record in doc["tasks"]:  # their probes too, first: a store is whole or refused
        if record.name in names:
            check_file(root, inside(root, record.probe_file), record.files[record.probe_file])
    model = assemble_tasks(root, doc, list(tasks) if tasks is not None else None, {}, allow_plugins)
    if deploy:
        model = deploy_form(model, batched=batched)
        if check_deploy:
            check_deploy_form(root, model, doc)
        reduced = reduce_precision(model, precision, calibration)
        if check_deploy and reduced is not model:
            check_deploy_form(root, reduced, doc, precision)
        model = reduced
    return model


def reduce_precision(
    model: MultiTaskNet, precision: str, calibration: Callable[[], Sequence[Tensor]] | None
) -> MultiTaskNet:
    """The deploy form ``model`` in ``precision`` (``rcm_nddr.nn.precision``): itself for fp32, and for int8
    on a machine that cannot run it (logged: it falls back to fp32); ``calibration`` gives the int8
    calibration batches when called, to which the probe input is added."""
    if precision == "bf16":
        if not bf16_is_native():
            log.info(
                "bf16 on this CPU: it has no bf16 matrix instructions (%s), so fp32 is faster here; bf16 runs as "
                "asked (rcm-nddr bench measures both: ratios.bf16_vs_fp32_infer)",
                " or ".join(BF16_CPU_FLAGS),
            )
        return to_bf16(copy.deepcopy(model))
    if precision == "int8":
        reason = int8_unsupported()
        if reason is not None:
            log.warning("int8 is not available: %s; the model runs in fp32 instead", reason)
            return model
        if calibration is None:
            raise StoreError("int8 needs calibration images: none were given")
        # the fixed probe input (noise) is calibrated on too: the probe check then measures the quantization,
        # not the clipping of an input unlike any image the calibration saw
        quantized, report = quantize_int8(model, [*calibration(), probe_input()])
        log.info(
            "int8: %d units quantized, %d kept in fp32; output error per task on the first calibration batch "
            "(relative L2): %s",
            len(report.int8_units),
            len(report.fp32_units),
            ", ".join(f"{t} {e:.3f}" for t, e in report.task_errors.items()),
        )
        return quantized
    return model


def calibration_batches(images: Tensor, batch_size: int = CALIBRATION_BATCH) -> list[Tensor]:
    """uint8 RGB images (N x 3 x H x W, a calibration set) as batches of ImageNet-normalized float images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return [(chunk.float() / 255.0 - mean) / std for chunk in images.split(batch_size)]


def on_device_type(device: str | torch.device | None) -> str:
    """The type (``cpu``, ``cuda``) of the device ``on_device`` puts a model on."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device or "cpu").type


def on_device(model: MultiTaskNet, device: str | torch.device | None) -> MultiTaskNet:
    """``model`` on ``device`` (None: the CPU; ``"auto"``: CUDA when available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device or "cpu")


def check_deploy_form(root: Path, model: MultiTaskNet, doc: Mapping[str, Any], precision: str = "fp32") -> None:
    """StoreError naming every task of ``model`` (the deploy form in ``precision``, on the CPU) whose outputs
    on its probe input differ from the recorded ones (``doc``'s records) beyond rounding, or for a reduced
    precision beyond its tolerance (``PRECISION_RTOL``)."""
    names = set(model.task_names)
    records = [r for r in doc["tasks"] if r.name in names]
    problems = run_probes(root, model, records, precision)
    if problems:
        if precision != "fp32":
            raise StoreError(
                f"the {precision} deploy form does not reproduce the stored tasks within its tolerance: "
                + "; ".join(problems)
                + " (load the model in fp32, or rcm-nddr predict --precision fp32)"
            )
        raise StoreError(
            "the deploy form does not reproduce the stored tasks: "
            + "; ".join(problems)
            + " (load the model without deploy=True, or rcm-nddr predict --form training)"
        )


def probe_problems(root: Path, doc: Mapping[str, Any], allow_plugins: Sequence[str] = ()) -> list[str]:
    """Run every task on its probe input and compare with the recorded outputs."""
    records = doc["tasks"]
    if not records:
        return []
    import_plugins(root / STORE_FILE, records, allow_plugins)  # a refused plug-in is an error, not a finding
    try:
        model = assemble_tasks(root, doc, [r.name for r in records], {}, allow_plugins)
    except StoreError as exc:
        return [f"the tasks could not be loaded to run their probes: {exc}"]
    return run_probes(root, model, records)


def compute_probes(model: MultiTaskNet, names: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """The probe of each task ``names`` of ``model``: the fixed probe input and the task's raw outputs on it."""
    images = probe_input()
    outputs = probe_outputs(model, list(names), images)
    return {name: {"input": images, "output": out} for name, out in outputs.items()}

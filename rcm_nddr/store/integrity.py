"""Integrity of a model store: every file read is checked against the sha256 that store.yaml records,
tasks' outputs against their recorded probes, and a backbone or filter bank other than the store's is
refused."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcm_nddr.files import file_sha256
from rcm_nddr.nn.assembly import probe_outputs
from rcm_nddr.nn.filter_bank import filter_bank_sha256
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.store.format import (
    BANK_FILE,
    CALIBRATION_FILE,
    DECOMPOSITION_FILE,
    STORE_FILE,
    StoreError,
    TaskRecord,
    inside,
    load_tensors,
)

log = logging.getLogger(__name__)

#: relative tolerance of ``verify``'s probe check for outputs that are not bit-identical (another CPU or
#: BLAS may round differently); any change to a stored file is caught by its sha256 first
PROBE_RTOL = 1e-4
#: the probe check of a reduced-precision deploy form (``load_model(precision=...)``): the relative L2 error
#: of each task's raw outputs on its probe input against the recorded (fp32) ones
PRECISION_RTOL = {"bf16": 0.03, "int8": 0.2}


def check_file(root: Path, path: Path, expected: str) -> None:
    """StoreError unless ``path`` (a file of the store ``root``) exists with sha256 ``expected``."""
    if not path.is_file():
        raise StoreError(f"{path} is missing")
    actual = file_sha256(path)
    if actual != expected:
        raise StoreError(f"sha256 mismatch for {path}: {actual}, {root / STORE_FILE} records {expected}")


def load_checked(root: Path, record: TaskRecord, relative: str) -> dict[str, Tensor]:
    """The tensors of ``record``'s file ``relative`` (a path inside the store ``root``), sha256-checked."""
    if relative not in record.files:
        raise StoreError(f"{root / STORE_FILE}: task '{record.name}' lists no file {relative}")
    path = inside(root, relative)
    check_file(root, path, record.files[relative])
    return load_tensors(path)


def keeps_bank(backbone: Mapping[str, Any]) -> bool:
    """Whether a store with ``backbone`` (store.yaml's) writes its filter bank: not for plain networks
    (``reparam: none``), whose task files hold every weight; the bank's sha256 is recorded all the same."""
    return backbone["reparam"] != "none"


def stored_bank(root: Path, backbone: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """The filter bank of the store ``root`` (``load_filter_bank``), None when it keeps none (``keeps_bank``;
    a plain store written by an older version has one, which is checked and returned)."""
    if not keeps_bank(backbone) and not (root / BANK_FILE).is_file():
        return None
    return load_filter_bank(root, backbone["filter_bank_sha256"])


def load_filter_bank(root: Path, expected: str) -> dict[str, Tensor]:
    """The store's filter bank, checked against ``expected``, the sha256 of its tensors (not of the file)."""
    path = root / BANK_FILE
    if not path.is_file():
        raise StoreError(f"filter bank {path} is missing")
    bank = load_tensors(path)
    actual = filter_bank_sha256(bank)
    if actual != expected:
        raise StoreError(f"sha256 mismatch for {path}: {actual}, {root / STORE_FILE} records {expected}")
    return bank


def stored_file_problems(root: Path, doc: Mapping[str, Any]) -> list[str]:
    """Every stored file of ``doc`` (store.yaml, parsed) that is missing or differs from its sha256."""
    problems = []
    try:
        stored_bank(root, doc["backbone"])
    except StoreError as exc:
        problems.append(str(exc))
    expected = doc["decomposition_sha256"]
    if expected is not None:
        problems += _file_problems(root, root / DECOMPOSITION_FILE, expected)
    if doc.get("calibration") is not None:
        problems += _file_problems(root, root / CALIBRATION_FILE, doc["calibration"]["sha256"])
    for record in doc["tasks"]:
        for relative, sha in record.files.items():
            problems += _file_problems(root, inside(root, relative), sha)
    return problems


def _file_problems(root: Path, path: Path, expected: str) -> list[str]:
    try:
        check_file(root, path, expected)
    except StoreError as exc:
        return [str(exc)]
    return []


def check_backbone(
    b: Mapping[str, Any],
    root: Path,
    arch: str,
    reparam: str,
    ri: bool,
    output_stride: int,
    weights_source: str,
    source_bank_sha256: str | None,
) -> None:
    """Refuse a backbone other than ``b`` (the backbone of the store ``root``): ``ModelStore.check_backbone``."""
    asked = {"arch": arch, "reparam": reparam, "ri": ri, "output_stride": output_stride}
    for key, value in asked.items():
        if b.get(key) != value:
            raise StoreError(
                f"{root / STORE_FILE} holds a backbone with {key}={b.get(key)!r}, this run asks for {value!r}; "
                "a store holds one filter bank: train into another store, or match the store's backbone"
            )
    recorded = b.get("source_bank_sha256")
    if source_bank_sha256 is not None and recorded is not None and source_bank_sha256 != recorded:
        raise StoreError(
            f"the filter bank from backbone.weights={weights_source} has sha256 {source_bank_sha256}, but the "
            f"store {root} was made from a bank with sha256 {recorded} ({b['weights']}); a store holds "
            "one filter bank: train into another store, or use the store's weights"
        )


def check_same_bank(b: Mapping[str, Any], root: Path, bank: Mapping[str, Tensor], weights_source: str) -> None:
    """Refuse a filter ``bank`` that is not bit-identical to the one of the store ``root`` (backbone ``b``)."""
    actual = filter_bank_sha256(bank)
    if actual != b["filter_bank_sha256"]:
        raise StoreError(
            f"the filter bank from backbone.weights={weights_source} has sha256 {actual}, but the store "
            f"{root} holds filter bank sha256 {b['filter_bank_sha256']} (made from {b['weights']}); "
            "a store holds one filter bank: train into another store, or use the store's weights"
        )


def run_probes(root: Path, model: MultiTaskNet, records: Sequence[TaskRecord], precision: str = "fp32") -> list[str]:
    """Run each of ``records``' tasks in ``model`` on its recorded probe input (sha256-checked, in the
    store ``root``); what differs from the recorded outputs (beyond ``precision``'s tolerance)."""
    problems = []
    for record in records:
        probe = load_checked(root, record, record.probe_file)
        if set(probe) != {"input", "output"}:
            problems.append(f"{root / record.probe_file}: expected tensors 'input' and 'output', got {sorted(probe)}")
            continue
        output = probe_outputs(model, [record.name], probe["input"])[record.name]
        problem = compare_probe(output, probe["output"], record.name, root / record.probe_file, precision)
        if problem:
            problems.append(problem)
    return problems


def compare_probe(output: Tensor, recorded: Tensor, name: str, path: Path, precision: str = "fp32") -> str | None:
    """None when ``output`` equals the recorded probe output (bit for bit, or within rounding; for a reduced
    ``precision``, within its relative L2 tolerance ``PRECISION_RTOL``)."""
    if output.shape != recorded.shape:
        shapes = f"{tuple(output.shape)} on its probe, {path} records {tuple(recorded.shape)}"
        return f"task '{name}': outputs of shape {shapes}"
    if precision != "fp32":
        error = (output.float() - recorded).norm().item() / max(recorded.norm().item(), 1e-12)
        if error <= PRECISION_RTOL[precision]:
            log.info("task '%s': %s probe outputs within %.3g of %s (relative L2)", name, precision, error, path)
            return None
        return (
            f"task '{name}': its {precision} outputs on the probe input differ from {path} by {error:.3g} "
            f"(relative L2; the {precision} tolerance is {PRECISION_RTOL[precision]})"
        )
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

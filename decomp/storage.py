"""The decomposition file: one safetensors file with ``U``, eigenvalues, mean and sample count per layer,
tied by sha256 to the filter bank it was computed for.

Tensors per layer ``L``: ``L.U`` (float64 Co x Co, columns = eigenvectors), ``L.eigenvalues`` (float64
Co, descending), ``L.mean`` (float64 Co), ``L.n`` (int64 scalar). Metadata (strings): ``format``,
``filter_bank_sha256``, ``arch``, ``images``, ``layers`` (comma-joined, forward order) and any extra
keys the writer adds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from rcm_nddr.decomp.statistics import Decomposition
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_write

FORMAT = "rcm-nddr-decomposition/1"
REQUIRED_META = ("format", "filter_bank_sha256", "arch", "images", "layers")
_FIELDS = ("U", "eigenvalues", "mean", "n")


class DecompositionError(UserError):
    """A decomposition file that is missing, unreadable, malformed, or made for another filter bank."""


def save_decomposition(
    path: str | Path, decomposition: Mapping[str, Decomposition], meta: Mapping[str, object]
) -> None:
    """Write ``decomposition`` (layers in forward order) atomically. ``meta`` must hold
    ``filter_bank_sha256``, ``arch`` and ``images``; ``format`` and ``layers`` are filled in."""
    missing = [key for key in ("filter_bank_sha256", "arch", "images") if key not in meta]
    if missing:
        raise ValueError(f"decomposition metadata lacks {', '.join(missing)}")
    bad = [layer for layer in decomposition if not layer or "," in layer]
    if bad:
        raise ValueError(f"layer names must be non-empty and comma-free, got {bad}")
    tensors = {}
    for layer, d in decomposition.items():
        tensors[f"{layer}.U"] = d.U.detach().to("cpu", torch.float64, copy=True).contiguous()
        tensors[f"{layer}.eigenvalues"] = d.eigenvalues.detach().to("cpu", torch.float64, copy=True).contiguous()
        tensors[f"{layer}.mean"] = d.mean.detach().to("cpu", torch.float64, copy=True).contiguous()
        tensors[f"{layer}.n"] = torch.tensor(int(d.n), dtype=torch.int64)
    metadata = {str(k): str(v) for k, v in meta.items()}
    metadata.update(format=FORMAT, layers=",".join(decomposition))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_decomposition(
    path: str | Path, expected_bank_sha256: str | None = None
) -> tuple[dict[str, Decomposition], dict[str, str]]:
    """Read a decomposition file and its metadata; with ``expected_bank_sha256``, refuse a file made for
    another filter bank. Every problem is a ``DecompositionError`` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DecompositionError(f"decomposition file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError, ValueError) as exc:
        raise DecompositionError(f"decomposition file {path} could not be read as safetensors: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise DecompositionError(
            f"{path} is not a decomposition file: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
        )
    missing_meta = [key for key in REQUIRED_META if not meta.get(key)]
    if missing_meta:
        raise DecompositionError(f"decomposition file {path} lacks the metadata {', '.join(missing_meta)}")
    if expected_bank_sha256 is not None and meta["filter_bank_sha256"] != expected_bank_sha256:
        raise DecompositionError(
            f"decomposition file {path} was made for another filter bank: its filter_bank_sha256 is "
            f"{meta['filter_bank_sha256']}, but this backbone's bank has sha256 {expected_bank_sha256}; "
            "decompose this backbone's responses again (python -m decomp) or point to the matching file"
        )
    layers = meta["layers"].split(",")
    missing = [f"{layer}.{field}" for layer in layers for field in _FIELDS if f"{layer}.{field}" not in tensors]
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise DecompositionError(f"decomposition file {path} lacks the tensors {shown}")
    return {layer: _layer(path, layer, tensors) for layer in layers}, meta


def _layer(path: Path, layer: str, tensors: Mapping[str, torch.Tensor]) -> Decomposition:
    U, eigenvalues, mean, n = (tensors[f"{layer}.{field}"] for field in _FIELDS)
    channels = eigenvalues.shape[0] if eigenvalues.ndim == 1 else -1
    expected = f"float64 {layer}.U Co x Co, {layer}.eigenvalues and {layer}.mean Co, int64 scalar {layer}.n"
    shapes_ok = (
        channels > 0
        and tuple(U.shape) == (channels, channels)
        and tuple(mean.shape) == (channels,)
        and n.ndim == 0
        and all(t.dtype == torch.float64 for t in (U, eigenvalues, mean))
        and n.dtype == torch.int64
    )
    if not shapes_ok:
        raise DecompositionError(
            f"decomposition file {path}: layer {layer} has U {tuple(U.shape)} {U.dtype}, eigenvalues "
            f"{tuple(eigenvalues.shape)}, mean {tuple(mean.shape)}, n {tuple(n.shape)} {n.dtype}; expected {expected}"
        )
    return Decomposition(U=U, eigenvalues=eigenvalues, mean=mean, n=int(n))

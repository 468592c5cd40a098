"""Response initialization: stream the pre-BN responses of a pretrained backbone's reparameterized
convs, eigendecompose their covariance per layer, and read/write the decomposition file. Installed as
``rcm_nddr.decomp``; the names below load on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rcm_nddr.lazy import lazy_exports

_MAKE, _STATISTICS, _STORAGE = "rcm_nddr.decomp.make", "rcm_nddr.decomp.statistics", "rcm_nddr.decomp.storage"
_EXPORTS = {
    "decompose_dataset": _MAKE,
    "decompose_folder": _MAKE,
    "limit": _MAKE,
    "Decomposition": _STATISTICS,
    "ResponseStatistics": _STATISTICS,
    "accumulate_responses": _STATISTICS,
    "decompose_responses": _STATISTICS,
    "eigendecompose": _STATISTICS,
    "fix_signs": _STATISTICS,
    "FORMAT": _STORAGE,
    "DecompositionError": _STORAGE,
    "load_decomposition": _STORAGE,
    "save_decomposition": _STORAGE,
}
__all__ = [
    "FORMAT",
    "Decomposition",
    "DecompositionError",
    "ResponseStatistics",
    "accumulate_responses",
    "decompose_dataset",
    "decompose_folder",
    "decompose_responses",
    "eigendecompose",
    "fix_signs",
    "limit",
    "load_decomposition",
    "save_decomposition",
]

if TYPE_CHECKING:
    from rcm_nddr.decomp.make import decompose_dataset, decompose_folder, limit
    from rcm_nddr.decomp.statistics import (
        Decomposition,
        ResponseStatistics,
        accumulate_responses,
        decompose_responses,
        eigendecompose,
        fix_signs,
    )
    from rcm_nddr.decomp.storage import FORMAT, DecompositionError, load_decomposition, save_decomposition

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

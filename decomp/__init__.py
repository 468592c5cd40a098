"""Response initialization: stream the pre-BN responses of a pretrained backbone's reparameterized
convs, eigendecompose their covariance per layer, and read/write the decomposition file."""

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

__all__ = [
    "FORMAT",
    "Decomposition",
    "DecompositionError",
    "ResponseStatistics",
    "accumulate_responses",
    "decompose_dataset",
    "decompose_folder",
    "limit",
    "decompose_responses",
    "eigendecompose",
    "fix_signs",
    "load_decomposition",
    "save_decomposition",
]

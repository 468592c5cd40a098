"""Response initialization: stream the pre-BN responses of a pretrained backbone's reparameterized
convs, eigendecompose their covariance per layer, and read/write the decomposition file."""

from .make import decompose_folder, make_decomposition
from .statistics import (
    Decomposition,
    ResponseStatistics,
    accumulate_responses,
    decompose_responses,
    eigendecompose,
    fix_signs,
)
from .storage import FORMAT, DecompositionError, load_decomposition, save_decomposition

__all__ = [
    "FORMAT",
    "Decomposition",
    "DecompositionError",
    "ResponseStatistics",
    "accumulate_responses",
    "decompose_folder",
    "decompose_responses",
    "eigendecompose",
    "fix_signs",
    "load_decomposition",
    "make_decomposition",
    "save_decomposition",
]

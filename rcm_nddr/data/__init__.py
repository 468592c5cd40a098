"""Datasets, joint transforms and the target-key registry. Importing this package registers the built-in
datasets and target keys."""

from rcm_nddr.data.check import check_target_keys, check_targets
from rcm_nddr.data.cityscapes import Cityscapes
from rcm_nddr.data.folder import DatasetError, MultiTaskFolder
from rcm_nddr.data.nyud import NYUDMT
from rcm_nddr.data.nyuv2_mtan import NYUv2MTAN
from rcm_nddr.data.pascal import PascalMT
from rcm_nddr.data.targets import TARGET_KEYS, register_target
from rcm_nddr.data.transforms import build_transforms

__all__ = [
    "NYUDMT",
    "TARGET_KEYS",
    "Cityscapes",
    "DatasetError",
    "MultiTaskFolder",
    "NYUv2MTAN",
    "PascalMT",
    "build_transforms",
    "check_target_keys",
    "check_targets",
    "register_target",
]

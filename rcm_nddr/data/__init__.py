"""Datasets and joint transforms. Importing this package registers the built-in datasets."""

from rcm_nddr.data.cityscapes import Cityscapes
from rcm_nddr.data.folder import DatasetError, MultiTaskFolder
from rcm_nddr.data.nyud import NYUDMT
from rcm_nddr.data.pascal import PascalMT
from rcm_nddr.data.transforms import build_transforms

__all__ = ["NYUDMT", "Cityscapes", "DatasetError", "MultiTaskFolder", "PascalMT", "build_transforms"]

"""rcm-nddr: incremental multi-task dense prediction with a frozen filter bank, per-task modulators
(RCM) and NDDR fusion.

The public names load on first use, so that ``import rcm_nddr`` and the commands' ``--help`` do not
wait for PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rcm_nddr.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Config": "rcm_nddr.config",
    "ConfigError": "rcm_nddr.config",
    "load_config": "rcm_nddr.config",
    "MultiTaskNet": "rcm_nddr.nn.multitask",
    "DATASETS": "rcm_nddr.registry",
    "TASKS": "rcm_nddr.registry",
    "ModelStore": "rcm_nddr.store",
    "StoreError": "rcm_nddr.store",
    "DatasetInfo": "rcm_nddr.task",
    "Metric": "rcm_nddr.task",
    "Task": "rcm_nddr.task",
    "TrivialPredictor": "rcm_nddr.task",
    "UserError": "rcm_nddr.errors",
}

__all__ = [
    "DATASETS",
    "TASKS",
    "Config",
    "ConfigError",
    "DatasetInfo",
    "Metric",
    "ModelStore",
    "MultiTaskNet",
    "StoreError",
    "Task",
    "TrivialPredictor",
    "UserError",
    "load_config",
]

if TYPE_CHECKING:
    from rcm_nddr.config import Config, ConfigError, load_config
    from rcm_nddr.errors import UserError
    from rcm_nddr.nn.multitask import MultiTaskNet
    from rcm_nddr.registry import DATASETS, TASKS
    from rcm_nddr.store import ModelStore, StoreError
    from rcm_nddr.task import DatasetInfo, Metric, Task, TrivialPredictor


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

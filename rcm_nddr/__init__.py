"""rcm-nddr: incremental multi-task dense prediction with a frozen filter bank, per-task modulators
(RCM) and NDDR fusion."""

from rcm_nddr.config import Config, ConfigError, load_config
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.registry import DATASETS, TASKS
from rcm_nddr.store import ModelStore, StoreError
from rcm_nddr.task import DatasetInfo, Metric, Task, TrivialPredictor

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DATASETS",
    "DatasetInfo",
    "Metric",
    "ModelStore",
    "MultiTaskNet",
    "StoreError",
    "TASKS",
    "Task",
    "TrivialPredictor",
    "load_config",
]

"""rcm-nddr: incremental multi-task dense prediction with a frozen filter bank, per-task modulators
(RCM) and NDDR fusion."""

from .config import Config, ConfigError, load_config
from .model import MultiTaskNet
from .registry import DATASETS, TASKS
from .store import ModelStore, StoreError
from .task import DatasetInfo, Metric, Task, TrivialPredictor

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

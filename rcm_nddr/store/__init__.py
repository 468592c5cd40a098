"""The model store: the on-disk registry of trained tasks on one frozen filter bank (DESIGN §6)."""

from rcm_nddr.store.format import StoreError, TaskRecord
from rcm_nddr.store.integrity import PROBE_RTOL
from rcm_nddr.store.store import ModelStore

__all__ = ["PROBE_RTOL", "ModelStore", "StoreError", "TaskRecord"]

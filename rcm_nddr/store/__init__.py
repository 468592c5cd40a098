"""The model store: the on-disk registry of trained tasks on one frozen filter bank (DESIGN §6)."""

from rcm_nddr.store.store import PROBE_RTOL, ModelStore, StoreError, TaskRecord

__all__ = ["PROBE_RTOL", "ModelStore", "StoreError", "TaskRecord"]

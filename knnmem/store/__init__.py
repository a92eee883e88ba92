"""Persisted memories: the on-disk format (`format.py`) and how a `Memory` is saved to and loaded from it."""

from .format import StoreError, model_fingerprint, read_manifest
from .persist import load_memory, save_memory

__all__ = ["StoreError", "load_memory", "model_fingerprint", "read_manifest", "save_memory"]

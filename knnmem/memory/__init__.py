"""Memory of memory layers: entry stores, the backends that index them, and the manager over both.

Nothing here imports Faiss until a Faiss spec is used, and nothing imports the store until a memory
is saved or loaded, so the model can depend on this package alone.
"""

from .backends import BACKENDS, check_spec
from .cross_batch import CrossBatchMemory
from .entries import EntryStore
from .exact import DenseBackend, TorchTopKBackend, exact_top_k
from .manager import DEFAULT_INDEX, DEFAULT_K, Document, Memory
from .protocol import LayerMemory, MemoryHits
from .sharded import LocalShards, ShardedMemory, ShardSet

__all__ = [
    "BACKENDS", "DEFAULT_INDEX", "DEFAULT_K", "CrossBatchMemory", "DenseBackend", "Document", "EntryStore",
    "LayerMemory", "LocalShards", "Memory", "MemoryHits", "ShardSet", "ShardedMemory", "TorchTopKBackend", "check_spec",
    "exact_top_k",
]

"""The memory of a LongLLaMA model: one backend per memory layer, for every batch row.

The model writes to it explicitly in its window loop (`add`) and reads it inside attention
(`search`). The index spec picks the backend: `"dense"` (LongLLaMA's exact attention to every
entry), `"torch"` (exact top-k by blocked matmul), or any Faiss factory string (approximate top-k).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from .backends import DenseMemory, LayerMemory, MemoryHits, TorchTopKMemory
from .faiss_memory import FaissMemory

if TYPE_CHECKING:
    from .config import LongLlamaConfig

class Document(NamedTuple):
    """A document whose entries are ids `start..end-1` of a single-row memory."""

    id: int
    name: str
    start: int
    end: int


# Index specs served by torch; any other spec is a Faiss factory string.
BACKENDS = {"dense": DenseMemory, "torch": TorchTopKMemory}
DEFAULT_K = 128


class Memory:
    """The memory of every memory layer of a model, for every batch row.

    Create it with `Memory.create(model, index=...)`, pass it to `model(..., memory=memory)` or
    `model.generate(..., memory=memory)`, and inspect it with `len(memory)` (entries per row).

    Args:
        layers: indices of the memory layers.
        num_heads, head_dim: attention geometry of those layers.
        dtype: dtype in which keys and values are stored.
        index: `"dense"`, `"torch"` or a Faiss factory string (inner-product metric).
        k: entries retrieved per query and head (top-k backends).
        train_size: entries a row needs before IVF/PQ indexes are trained (default: 39 per centroid).
        l2_reduction: index Faiss specs by the inner-product-to-L2 reduction (see `FaissMemory`).
        search_params: Faiss search parameters such as `efSearch=128` or `nprobe=64`.
    """

    def __init__(
        self,
        *,
        layers: Sequence[int],
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        index: str = "dense",
        k: int = DEFAULT_K,
        train_size: int | None = None,
        l2_reduction: bool = False,
        **search_params,
    ):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if index in BACKENDS and (search_params or train_size is not None or l2_reduction):
            raise ValueError(f"index {index!r} takes no Faiss options, got {sorted(search_params)}")
        self.layers = tuple(layers)
        self.num_heads, self.head_dim, self.dtype, self.index = num_heads, head_dim, dtype, index
        self.l2_reduction = l2_reduction
        self.batch_size: int | None = None
        if index in BACKENDS:
            factory, options = BACKENDS[index], {}
        else:
            factory = FaissMemory
            options = dict(spec=index, train_size=train_size, search_params=search_params, l2_reduction=l2_reduction)
        self._backends: dict[int, LayerMemory] = {
            layer: factory(num_heads=num_heads, head_dim=head_dim, dtype=dtype, k=k, **options) for layer in self.layers
        }
        self._k = k

    @classmethod
    def create(cls, model_or_config, *, index: str = "dense", **options) -> "Memory":
        """An empty memory matching a LongLLaMA model (or its config); options as in `Memory`."""
        config: LongLlamaConfig = getattr(model_or_config, "config", model_or_config)
        return cls(
            layers=config.mem_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            dtype=config.memory_dtype,
            index=index,
            **options,
        )

    @property
    def k(self) -> int:
        """Entries retrieved per query and head (ignored by the dense backend)."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"k must be a positive integer, got {value!r}")
        self._k = value
        for backend in self._backends.values():
            if hasattr(backend, "k"):
                backend.k = value

    def set_search_params(self, **params) -> None:
        """Change Faiss search parameters (e.g. `efSearch`, `nprobe`) of every layer."""
        if self.index in BACKENDS:
            raise ValueError(f"index {self.index!r} has no Faiss search parameters")
        for backend in self._backends.values():
            backend.set_search_params(**params)

    def layer(self, layer: int) -> LayerMemory:
        """The backend of memory layer `layer` (its `buffer` holds ids, keys and values)."""
        return self._backends[layer]

    def check_compatible(self, config: "LongLlamaConfig") -> None:
        """Raise `ValueError` if this memory cannot serve a model with `config`."""
        expected = (tuple(config.mem_layers), config.num_attention_heads, config.head_dim)
        actual = (self.layers, self.num_heads, self.head_dim)
        if expected != actual:
            raise ValueError(
                "memory does not match the model: memory has (layers, heads, head_dim) = "
                f"{actual}, the model needs {expected}"
            )

    def check_batch(self, batch_size: int) -> None:
        """Raise `ValueError` if entries were written for a different number of batch rows."""
        if self.batch_size is not None and len(self) and self.batch_size != batch_size:
            raise ValueError(
                f"memory holds {self.batch_size} batch rows but the input has {batch_size}; "
                "use a new Memory (or memory.reset()) for a different batch"
            )

    def __len__(self) -> int:
        return len(self._backends[self.layers[0]]) if self.layers else 0

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Append keys/values (B, H, T, D), stored as if at position 0, with padding flags `valid` (B, T)."""
        if keys.shape[2] == 0:
            return
        self.check_batch(keys.shape[0])
        self.batch_size = keys.shape[0]
        self._backends[layer].add(keys, values, valid.bool())

    def extend(self, other: "Memory", *, chunk: int = 1 << 20) -> "Memory":
        """Append every entry of `other` (same layers and geometry), e.g. to re-index it under another spec."""
        if (other.layers, other.num_heads, other.head_dim) != (self.layers, self.num_heads, self.head_dim):
            raise ValueError(
                f"cannot extend a memory of (layers, heads, head_dim) = {(self.layers, self.num_heads, self.head_dim)}"
                f" with one of {(other.layers, other.num_heads, other.head_dim)}"
            )
        for layer in self.layers:
            buffer = other.layer(layer).buffer
            for start in range(0, len(buffer), chunk):
                end = start + chunk
                self.add(layer, buffer.keys[:, :, start:end], buffer.values[:, :, start:end], buffer.valid[:, start:end])
        return self

    def search(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        """Entries of `layer` for queries (B, h, T, D) of heads `heads`; None while the memory is empty."""
        backend = self._backends[layer]
        return backend.search(queries, heads) if len(backend) else None

    def reset(self) -> None:
        for backend in self._backends.values():
            backend.reset()
        self.batch_size = None

    def reorder_rows(self, index: torch.Tensor) -> None:
        for backend in self._backends.values():
            backend.reorder_rows(index)
        if self.batch_size is not None:
            self.batch_size = len(index)

    def __repr__(self) -> str:
        return (
            f"Memory(index={self.index!r}, k={self.k}, layers={list(self.layers)}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, entries_per_row={len(self)})"
        )

"""Memory of the memory layers: stored (key, value) pairs that later queries attend to.

A `Memory` holds one backend per memory layer. Every backend implements the small `LayerMemory`
protocol (add, search, len, reset, reorder_rows); the model writes to it explicitly in its window
loop and reads it through `search` inside attention. Backends are registered by index spec in
`BACKENDS`; `"dense"` is LongLLaMA's exact memory attention over every stored entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from .config import LongLlamaConfig


class MemoryHits(NamedTuple):
    """Memory entries retrieved for a block of queries.

    Either shared by all queries (dense): keys/values (B, H, M, D), valid (B, M);
    or retrieved per query (top-k): keys/values (B, H, T, K, D), valid (B, H, T, K).
    Keys are stored as if at position 0; `valid` is False for entries that must get no attention.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor


class LayerMemory(Protocol):
    """What a memory backend of one layer provides."""

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Append entries: keys/values (B, H, T, D), valid (B, T)."""

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        """Entries for queries (B, h, T, D) of the heads `heads`."""

    def __len__(self) -> int:
        """Entries stored per batch row."""

    def reset(self) -> None:
        """Forget every entry."""

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order), as beam search requires."""


class DenseMemory:
    """Every stored entry is attended to by every query: exact memory attention.

    Entries live in one preallocated buffer per tensor that grows by doubling, so appending a window
    costs amortised O(window), and `search` returns views without copying.
    """

    def __init__(self, *, num_heads: int, head_dim: int, dtype: torch.dtype):
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.reset()

    def reset(self) -> None:
        self._keys = self._values = self._valid = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        batch, _, count, _ = keys.shape
        end = self._size + count
        if keys.requires_grad or values.requires_grad:
            # Training through memory: append out of place so autograd keeps every stored window.
            n = self._size
            self._keys = keys if not n else torch.cat([self._keys[:, :, :n], keys], dim=2)
            self._values = values if not n else torch.cat([self._values[:, :, :n], values], dim=2)
            self._valid = valid if not n else torch.cat([self._valid[:, :n], valid], dim=1)
        else:
            if self._keys is None or end > self._keys.shape[2]:
                self._grow(batch, max(end, 2 * self._size), keys.device)
            self._keys[:, :, self._size : end] = keys
            self._values[:, :, self._size : end] = values
            self._valid[:, self._size : end] = valid
        self._size = end

    def _grow(self, batch: int, capacity: int, device: torch.device) -> None:
        shape = (batch, self.num_heads, capacity, self.head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=device)
        values = torch.empty(shape, dtype=self.dtype, device=device)
        valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        if self._keys is not None:
            keys[:, :, : self._size] = self._keys[:, :, : self._size]
            values[:, :, : self._size] = self._values[:, :, : self._size]
            valid[:, : self._size] = self._valid[:, : self._size]
        self._keys, self._values, self._valid = keys, values, valid

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        n = self._size
        return MemoryHits(self._keys[:, heads, :n], self._values[:, heads, :n], self._valid[:, :n])

    def reorder_rows(self, index: torch.Tensor) -> None:
        if self._keys is not None:
            index = index.to(self._keys.device)
            self._keys, self._values = self._keys[index], self._values[index]
            self._valid = self._valid[index]


BACKENDS = {"dense": DenseMemory}


class Memory:
    """The memory of every memory layer of a model, for every batch row.

    Create it with `Memory.create(model)` (or from a config), pass it to `model(..., memory=memory)`
    or `model.generate(..., memory=memory)`, and inspect it with `len(memory)` (entries per row).

    Args:
        layers: indices of the memory layers.
        num_heads, head_dim: attention geometry of those layers.
        dtype: dtype in which keys and values are stored.
        index: the backend, a key of `BACKENDS`.
    """

    def __init__(
        self, *, layers: Sequence[int], num_heads: int, head_dim: int, dtype: torch.dtype, index: str = "dense"
    ):
        if index not in BACKENDS:
            raise ValueError(f"unknown memory index {index!r}; available: {sorted(BACKENDS)}")
        self.layers = tuple(layers)
        self.num_heads, self.head_dim, self.dtype, self.index = num_heads, head_dim, dtype, index
        self.batch_size: int | None = None
        self._backends = {
            layer: BACKENDS[index](num_heads=num_heads, head_dim=head_dim, dtype=dtype) for layer in self.layers
        }

    @classmethod
    def create(cls, model_or_config, *, index: str = "dense") -> "Memory":
        """An empty memory matching a LongLLaMA model (or its config)."""
        config: LongLlamaConfig = getattr(model_or_config, "config", model_or_config)
        return cls(
            layers=config.mem_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            dtype=config.memory_dtype,
            index=index,
        )

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
            f"Memory(index={self.index!r}, layers={list(self.layers)}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, entries_per_row={len(self)})"
        )

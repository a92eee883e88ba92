"""Memory backends of one layer: exact dense attention, exact top-k in torch, and Faiss indexes.

All implement `memory.LayerMemory` over an `EntryBuffer`, which owns ids and values; backends differ
only in how they pick the entries a query attends to.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from .buffer import EntryBuffer


class MemoryHits(NamedTuple):
    """Memory entries retrieved for a block of queries.

    Either shared by all queries (dense): keys/values (B, H, M, D), valid (B, M), ids None (all);
    or retrieved per query (top-k): keys/values (B, H, T, K, D), valid and ids (B, H, T, K).
    Keys are stored as if at position 0; `valid` is False for entries that must get no attention;
    ids index the layer's `EntryBuffer`.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    ids: torch.Tensor | None = None


class LayerMemory(Protocol):
    """What a memory backend of one layer provides."""

    buffer: EntryBuffer

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
    """Every stored entry is attended to by every query: LongLLaMA's exact memory attention."""

    def __init__(self, *, num_heads: int, head_dim: int, dtype: torch.dtype, **_):
        self.buffer = EntryBuffer(num_heads=num_heads, head_dim=head_dim, dtype=dtype)

    def __len__(self) -> int:
        return len(self.buffer)

    def add(self, keys, values, valid) -> None:
        self.buffer.add(keys, values, valid)

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        return MemoryHits(self.buffer.keys[:, heads], self.buffer.values[:, heads], self.buffer.valid)

    def reset(self) -> None:
        self.buffer.reset()

    def reorder_rows(self, index) -> None:
        self.buffer.reorder_rows(index)


def exact_top_k(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int, block: int = 65536):
    """Ids (B, h, T, k') of the k largest inner products q·key per query, valid entries first.

    queries (B, h, T, D), keys (B, h, M, D), valid (B, M); k' = min(k, M). Scores are computed over
    blocks of `block` keys so the score matrix never exceeds (B, h, T, block).
    """
    k = min(k, keys.shape[2])
    best_scores, best_ids = None, None
    for start in range(0, keys.shape[2], block):
        chunk = keys[:, :, start : start + block].to(queries.dtype)
        scores = torch.matmul(queries, chunk.transpose(-1, -2)).float()  # (B, h, T, block)
        scores = scores.masked_fill(~valid[:, None, None, start : start + block], float("-inf"))
        top_scores, top_ids = scores.topk(min(k, scores.shape[-1]), dim=-1)
        top_ids = top_ids + start
        if best_scores is not None:
            top_scores, order = torch.cat([best_scores, top_scores], -1).topk(k, dim=-1)
            top_ids = torch.cat([best_ids, top_ids], -1).gather(-1, order)
        best_scores, best_ids = top_scores, top_ids
    return best_ids


class TorchTopKMemory:
    """Exact top-k retrieval by blocked matmul in torch: the fast exact choice on GPU."""

    def __init__(self, *, num_heads: int, head_dim: int, dtype: torch.dtype, k: int, **_):
        self.buffer = EntryBuffer(num_heads=num_heads, head_dim=head_dim, dtype=dtype)
        self.k = k

    def __len__(self) -> int:
        return len(self.buffer)

    def add(self, keys, values, valid) -> None:
        self.buffer.add(keys, values, valid)

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        ids = exact_top_k(queries, self.buffer.keys[:, heads], self.buffer.valid, self.k)
        return MemoryHits(*self.buffer.gather(heads, ids), ids=ids)

    def reset(self) -> None:
        self.buffer.reset()

    def reorder_rows(self, index) -> None:
        self.buffer.reorder_rows(index)

"""Exact memory backends of one layer: dense attention to every entry, and exact top-k in torch."""

from __future__ import annotations

from typing import Iterator

import torch

from .entries import EntryStore
from .protocol import MemoryHits


def score_blocks(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                 block: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
    """(first id, float32 scores (B, h, T, block)) of q·key over consecutive blocks of `block` keys, -inf
    for invalid entries, so no score matrix exceeds (B, h, T, block).

    queries (B, h, T, D), keys (B, h, M, D), valid (B, M); products are formed in the queries' dtype, as
    attention forms them.
    """
    for start in range(0, keys.shape[2], block):
        chunk = keys[:, :, start : start + block].to(queries.dtype)
        scores = torch.matmul(queries, chunk.transpose(-1, -2)).float()
        chunk_valid = valid[:, start : start + block]
        # The common case (no padding) skips a pass over the whole score block.
        yield start, scores if bool(chunk_valid.all()) else scores.masked_fill_(~chunk_valid[:, None, None], float("-inf"))


def exact_top_k(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int,
                block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and ids (B, h, T, k') of the k largest inner products q·key per query, valid entries first.

    queries (B, h, T, D), keys (B, h, M, D), valid (B, M); k' = min(k, M). Scores as in `score_blocks`.
    """
    k = min(k, keys.shape[2])
    best_scores, best_ids = None, None
    for start, scores in score_blocks(queries, keys, valid, block):
        top_scores, top_ids = scores.topk(min(k, scores.shape[-1]), dim=-1)
        top_ids = top_ids + start
        if best_scores is not None:
            top_scores, order = torch.cat([best_scores, top_scores], -1).topk(k, dim=-1)
            top_ids = torch.cat([best_ids, top_ids], -1).gather(-1, order)
        best_scores, best_ids = top_scores, top_ids
    return best_scores, best_ids


def top_k_hits(entries: EntryStore, queries: torch.Tensor, heads: slice, k: int, *,
               differentiable: bool = False) -> MemoryHits:
    """Per-query hits holding the exact top k entries of `entries` for queries (B, h, T, D).

    The choice carries no gradient, as retrieval from an index does not. With `differentiable`
    (cross-batch training) the chosen entries are scored again so that scores and values carry
    gradients to queries and keys; otherwise the scores of the search are the hits' scores.
    """
    keys = entries.keys(heads)
    with torch.no_grad():
        scores, ids = exact_top_k(queries, keys, entries.valid, k)
    if not differentiable:
        values, valid = entries.take(ids, heads)
        return MemoryHits(None, values, valid, ids, scores)
    picked_keys, values, valid = entries.take(ids, heads, keys=True)
    scores = torch.einsum("bhtd,bhtkd->bhtk", queries, picked_keys.to(queries.dtype)).float()
    return MemoryHits(None, values, valid, ids, scores)


class _ExactBackend:
    """What both exact backends share: nothing to train, tune or persist beyond the entries."""

    train_size = 0

    def __init__(self, entries: EntryStore, *, k: int):
        self.entries, self.k = entries, k

    def add(self, ids: range) -> None:
        pass  # searched straight from the entry store

    def reset(self) -> None:
        pass

    def reorder_rows(self, rows: torch.Tensor) -> None:
        pass

    def search_params(self) -> dict:
        return {}

    def options(self) -> dict:
        return {}

    def set_search_params(self, **params) -> None:
        if params:
            raise ValueError(f"exact memory has no search parameters, got {sorted(params)}")

    def export_state(self) -> tuple[dict, dict]:
        return {}, {}

    def import_state(self, load, source: str | None = None) -> None:
        pass

    def nbytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class DenseBackend(_ExactBackend):
    """Every stored entry is attended to by every query: LongLLaMA's exact memory attention."""

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        return MemoryHits(self.entries.keys(heads), self.entries.values(heads), self.entries.valid)


class TorchTopKBackend(_ExactBackend):
    """Exact top-k retrieval by blocked matmul in torch: the fast exact choice on GPU."""

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        return top_k_hits(self.entries, queries, heads, self.k)

"""Retrieval quality on the queries a model really produces.

`ProbedMemory` is a `Memory` that, on every search, also computes the exact answer over the same
entries and accumulates recall@k and the share of the exact memory softmax mass captured by the
retrieved entries. Attention queries are distributed differently from keys, so an index is only
judged on such queries, never on keys or synthetic vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends import MemoryHits, exact_top_k
from .memory import Memory


@dataclass
class RetrievalQuality:
    """Averages over every (row, head, query) that searched a non-empty memory."""

    index: str
    k: int
    recall: float  # |retrieved ∩ exact top-k| / min(k, valid entries)
    mass_captured: float  # exact memory-softmax mass on the retrieved entries
    queries: int


class ProbedMemory(Memory):
    """A `Memory` that measures its own retrieval against exact top-k while the model runs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reset_quality()

    def reset_quality(self) -> None:
        """Start measuring afresh (e.g. after changing search parameters)."""
        self.probing = True  # switch off to time the index without the exact search beside it
        self._recall_sum = self._mass_sum = 0.0
        self._queries = 0

    def search(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        hits = super().search(layer, queries, heads)
        if not self.probing:
            return hits
        if hits is None or hits.ids is None:  # dense: retrieval is exact by construction
            if hits is not None:
                self._count(torch.ones(queries.shape[:3]), torch.ones(queries.shape[:3]))
            return hits
        buffer = self.layer(layer).buffer
        keys, valid = buffer.keys[:, heads], buffer.valid  # (B, h, M, D), (B, M)
        exact = exact_top_k(queries, keys, valid, self.k)  # (B, h, T, k')
        retrieved = torch.where(hits.valid, hits.ids, torch.full_like(hits.ids, -2))
        exact_valid = valid.gather(1, exact.flatten(1)).view_as(exact)  # top-k may include padding
        overlap = (exact[..., :, None] == retrieved[..., None, :]).any(-1) & exact_valid  # (B, h, T, k')
        recall = overlap.sum(-1) / exact_valid.sum(-1).clamp_min(1)
        scale = math.sqrt(queries.shape[-1])
        log_norm = _memory_logsumexp(queries.float(), keys, valid, scale)  # (B, h, T)
        retrieved_scores = torch.einsum("bhtd,bhtkd->bhtk", queries.float(), hits.keys.float()) / scale
        mass = (torch.exp(retrieved_scores - log_norm[..., None]) * hits.valid).sum(-1)
        self._count(recall, mass)
        return hits

    def _count(self, recall: torch.Tensor, mass: torch.Tensor) -> None:
        self._recall_sum += float(recall.sum())
        self._mass_sum += float(mass.sum())
        self._queries += recall.numel()

    def quality(self) -> RetrievalQuality:
        n = max(self._queries, 1)
        return RetrievalQuality(self.index, self.k, self._recall_sum / n, self._mass_sum / n, self._queries)


def _memory_logsumexp(queries, keys, valid, scale: float, block: int = 65536) -> torch.Tensor:
    """log Σ exp(q·k/scale) over the valid entries, computed over blocks of keys."""
    total = None
    for start in range(0, keys.shape[2], block):
        scores = torch.matmul(queries, keys[:, :, start : start + block].float().transpose(-1, -2)) / scale
        scores = scores.masked_fill(~valid[:, None, None, start : start + block], float("-inf"))
        part = torch.logsumexp(scores, dim=-1)
        total = part if total is None else torch.logaddexp(total, part)
    return total


@torch.no_grad()
def retrieval_quality(model, input_ids: torch.Tensor, *, index: str, **memory_options) -> RetrievalQuality:
    """Run `model` over `input_ids` with memory `index` and measure retrieval on its real queries.

    The model runs with the approximate index, as it would in use; every search is compared with the
    exact top-k over the entries stored at that moment.
    """
    memory = ProbedMemory.create(model, index=index, **memory_options)
    model(input_ids=input_ids, memory=memory, use_cache=False)
    return memory.quality()

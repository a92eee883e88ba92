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
        self._recall_sum = self._mass_sum = 0.0
        self._queries = 0

    def search(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        hits = super().search(layer, queries, heads)
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
        scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) / math.sqrt(queries.shape[-1])
        probs = torch.softmax(scores.masked_fill(~valid[:, None, None], float("-inf")), dim=-1)  # (B, h, T, M)
        mass = (probs.gather(-1, hits.ids.clamp_min(0)) * hits.valid).sum(-1)
        self._count(recall, mass)
        return hits

    def _count(self, recall: torch.Tensor, mass: torch.Tensor) -> None:
        self._recall_sum += float(recall.sum())
        self._mass_sum += float(mass.sum())
        self._queries += recall.numel()

    def quality(self) -> RetrievalQuality:
        n = max(self._queries, 1)
        return RetrievalQuality(self.index, self.k, self._recall_sum / n, self._mass_sum / n, self._queries)


@torch.no_grad()
def retrieval_quality(model, input_ids: torch.Tensor, *, index: str, **memory_options) -> RetrievalQuality:
    """Run `model` over `input_ids` with memory `index` and measure retrieval on its real queries.

    The model runs with the approximate index, as it would in use; every search is compared with the
    exact top-k over the entries stored at that moment.
    """
    memory = ProbedMemory.create(model, index=index, **memory_options)
    model(input_ids=input_ids, memory=memory, use_cache=False)
    return memory.quality()

"""Retrieval quality on the queries a model really produces.

`RetrievalProbe` observes a `Memory`: on every search it also computes the exact answer over the
same entries and accumulates recall@k and the share of the exact memory softmax mass captured by
the retrieved entries. Attention queries are distributed differently from keys, so an index is only
judged on such queries, never on keys or synthetic vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..memory import Memory, MemoryHits, exact_top_k
from ..memory.exact import score_blocks


@dataclass
class RetrievalQuality:
    """Averages over every (row, head, query) that searched a non-empty memory."""

    index: str
    k: int
    recall: float  # |retrieved ∩ exact top-k| / min(k, valid entries)
    mass_captured: float  # exact memory-softmax mass on the retrieved entries
    queries: int


class RetrievalProbe:
    """Measures a memory's retrieval against exact top-k while the model runs; attach with `RetrievalProbe(memory)`.

    Set `enabled = False` to time the index without the exact search beside it.

    Args:
        reference: a memory receiving the same entries under the same ids, whose keys give the exact answer:
            full-precision keys judge a compressed memory, and serve one keeping none.
    """

    def __init__(self, memory: Memory, *, reference: Memory | None = None):
        self.memory, self.reference = memory, reference
        self.enabled = True
        self.reset()
        memory.observers.append(self)

    def reset(self) -> None:
        """Start measuring afresh (e.g. after changing search parameters)."""
        self._recall_sum = self._mass_sum = 0.0
        self._queries = 0

    def __call__(self, layer: int, queries: torch.Tensor, heads: slice, hits: MemoryHits) -> None:
        if not self.enabled:
            return
        if hits.shared:  # dense: retrieval is exact by construction
            self._count(torch.ones(queries.shape[:3]), torch.ones(queries.shape[:3]))
            return
        # The whole memory, overlay included, in the id space of the hits.
        stores = _entries(self.reference or self.memory, layer)
        keys = torch.cat([e.keys(heads) for e in stores], dim=2)  # (B, h, M, D)
        valid = torch.cat([e.valid for e in stores], dim=1)  # (B, M)
        _, exact = exact_top_k(queries, keys, valid, self.memory.k)  # (B, h, T, k')
        retrieved = torch.where(hits.valid, hits.ids, torch.full_like(hits.ids, -2))
        exact_valid = valid.gather(1, exact.flatten(1)).view_as(exact)  # top-k may include padding
        overlap = (exact[..., :, None] == retrieved[..., None, :]).any(-1) & exact_valid  # (B, h, T, k')
        recall = overlap.sum(-1) / exact_valid.sum(-1).clamp_min(1)
        scale = math.sqrt(queries.shape[-1])
        log_norm = _memory_logsumexp(queries.float(), keys, valid, scale)  # (B, h, T)
        mass = (torch.exp(hits.scores / scale - log_norm[..., None]) * hits.valid).sum(-1)
        self._count(recall, mass)

    def _count(self, recall: torch.Tensor, mass: torch.Tensor) -> None:
        self._recall_sum += float(recall.sum())
        self._mass_sum += float(mass.sum())
        self._queries += recall.numel()

    def quality(self) -> RetrievalQuality:
        n = max(self._queries, 1)
        return RetrievalQuality(self.memory.index, self.memory.k, self._recall_sum / n, self._mass_sum / n,
                                self._queries)


def _entries(memory: Memory, layer: int) -> list:
    """The entry stores searched for `layer`: the memory's, then its overlay's."""
    stores = [memory.entries(layer)] if memory.stored_entries else []
    return stores + (_entries(memory.overlay, layer) if memory.overlay is not None else [])


def _memory_logsumexp(queries, keys, valid, scale: float) -> torch.Tensor:
    """log Σ exp(q·k/scale) over the valid entries, computed over blocks of keys."""
    total = None
    for _, scores in score_blocks(queries, keys, valid):
        part = torch.logsumexp(scores / scale, dim=-1)
        total = part if total is None else torch.logaddexp(total, part)
    return total


@torch.no_grad()
def retrieval_quality(model, input_ids: torch.Tensor, *, index: str, **memory_options) -> RetrievalQuality:
    """Run `model` over `input_ids` with memory `index` and measure retrieval on its real queries.

    The model runs with the approximate index, as it would in use; every search is compared with the
    exact top-k over the entries stored at that moment.
    """
    memory = Memory.create(model, index=index, **memory_options)
    probe = RetrievalProbe(memory)
    model(input_ids=input_ids, memory=memory, use_cache=False)
    return probe.quality()

"""A read-only memory whose stored entries are split over shards, each a memory over a range of documents.

Every search asks each shard for its own top k (one request per shard, holding the queries of every
key/value head the layer searches) and keeps the best k of their union by score (`merge_hits`), which
is exactly the top k of one memory holding every entry: with exact indexes (`Flat`, `torch`) a sharded
memory returns the ids and scores of the unsharded one. Ids are global: shard i's entries follow
shard i-1's, as the documents do (`locate` maps an id back to its shard).

Where the shards live is a `ShardSet`: in this process (`LocalShards`) or in Ray actors
(`knnmem.cluster.actors.RayShards`). To its users a `ShardedMemory` is an ordinary read-only `Memory`:
generation adds to its in-memory overlay, `k` and search parameters apply to every shard.
"""

from __future__ import annotations

import bisect
from itertools import accumulate
from typing import Protocol, Sequence

import torch

from .manager import Memory, merge_hits
from .protocol import MemoryHits


class ShardSet(Protocol):
    """Shards of one memory, in the order of their entries."""

    names: Sequence[str]  # how errors and `locate` name each shard
    sizes: Sequence[int]  # entries of each shard

    def search(self, layer: int, queries: torch.Tensor, heads: slice, *, k: int,
               search_params: dict) -> list[MemoryHits | None]:
        """Each shard's hits for queries (B, h, T, D) of key/value heads `heads`, ids its own; None for an empty one."""

    def nbytes(self) -> int:
        """Bytes of the stored keys, values and indexes of every shard."""

    def provenance(self) -> list[torch.Tensor]:
        """Each shard's provenance (entries, 3): its own document id, token position and token id per entry."""

    def close(self) -> None:
        """Release every shard."""


def search_shard(memory: Memory, layer: int, queries: torch.Tensor, heads: slice, *, k: int,
                 search_params: dict) -> MemoryHits | None:
    """`memory.search` with `k` and `search_params` in force: a shard searches as the sharded memory says, whatever
    it was opened with (a shard restarted from disk included)."""
    if memory.k != k:
        memory.k = k
    if memory.search_params() != search_params:
        memory.set_search_params(**search_params)
    return memory.search(layer, queries, heads)


class LocalShards:
    """Shards opened in this process (read-only memories of ordinary stores), searched one after the other."""

    def __init__(self, memories: Sequence[Memory], names: Sequence[str]):
        self.memories, self.names = list(memories), list(names)
        self.sizes = [memory.stored_entries for memory in self.memories]

    def search(self, layer, queries, heads, *, k, search_params):
        return [search_shard(m, layer, queries, heads, k=k, search_params=search_params) for m in self.memories]

    def nbytes(self) -> int:
        return sum(memory.nbytes for memory in self.memories)

    def provenance(self) -> list[torch.Tensor]:
        return [memory.provenance for memory in self.memories]

    def close(self) -> None:
        for memory in self.memories:
            memory.close()


class ShardedMemory(Memory):
    """A read-only memory over `shards`; the other arguments (geometry, index spec, k, options) are `Memory`'s and
    must be those of every shard. Its own entry stores stay empty: it holds no entries, only the overlay."""

    def __init__(self, *, shards: ShardSet, **memory_args):
        super().__init__(**memory_args)
        self.shards, self.read_only = shards, True
        self._offsets = [0, *accumulate(shards.sizes)]  # shard i holds global ids offsets[i]..offsets[i+1]-1

    @property
    def provenance(self) -> torch.Tensor | None:
        """(entries, 3): document id, token position and token id of every stored entry, gathered from the shards
        on first use (so that opening stays fast), with document ids numbered across shards as `documents` are."""
        if self._provenance is None and self.stored_entries:
            starts = [document.start for document in self.documents]
            parts = []
            for part, offset in zip(self.shards.provenance(), self._offsets):
                first = bisect.bisect_left(starts, offset)  # documents of earlier shards (none is empty)
                parts.append(torch.cat([torch.where(part[:, :1] >= 0, part[:, :1] + first, part[:, :1]), part[:, 1:]], 1))
            self._provenance = torch.cat(parts)
        return self._provenance

    @provenance.setter
    def provenance(self, value: torch.Tensor | None) -> None:
        self._provenance = value

    def _search_stored(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        found = self.shards.search(layer, queries, heads, k=self.k, search_params=self.search_params())
        merged = None
        for hits, offset in zip(found, self._offsets):
            merged = merge_hits(merged, hits, offset=offset, k=self.k)
        return merged

    def locate(self, entry: int) -> tuple[str, int]:
        """The shard holding global entry id `entry`, and the entry's id inside it."""
        if not 0 <= entry < self.stored_entries:
            raise ValueError(f"entry {entry} is not stored in this memory of {self.stored_entries} entries")
        shard = bisect.bisect_right(self._offsets, entry) - 1
        return self.shards.names[shard], entry - self._offsets[shard]

    @property
    def stored_entries(self) -> int:
        return self._offsets[-1]

    @property
    def batch_size(self) -> int | None:
        return 1 if self.stored_entries else super().batch_size  # a store holds one row

    @property
    def nbytes(self) -> int:
        return self.shards.nbytes()

    def entries(self, layer: int):
        raise ValueError(f"a sharded memory keeps its entries in its {len(self.shards.sizes)} shards: search it, or "
                         "load a shard directory as a memory of its own to read them")

    backend = entries

    def close(self) -> None:
        self.shards.close()
        self._offsets = [0]  # empty, as a closed memory is
        super().close()

    def __repr__(self) -> str:
        return f"Sharded{super().__repr__()[:-1]}, shards={len(self.shards.sizes)})"

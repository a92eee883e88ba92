"""What every memory backend of one layer provides, and what a search returns.

A backend owns no keys or values itself: they live in the layer's `EntryStore`, whose ids every
backend's index shares. A backend only decides which entries a query attends to.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class MemoryHits(NamedTuple):
    """Memory entries retrieved for a block of queries.

    Either shared by all queries (dense): keys/values (B, H, M, D), valid (B, M), ids and scores None;
    or retrieved per query (top-k): values (B, H, T, K, D), valid, ids and scores (B, H, T, K), keys
    None. `scores` are the float32 inner products q·k of the retrieved entries (before scaling), so
    attention does not score them again. Keys are stored as if at position 0; `valid` is False for
    entries that must get no attention; ids index the layer's `EntryStore`.
    """

    keys: torch.Tensor | None
    values: torch.Tensor
    valid: torch.Tensor
    ids: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    @property
    def shared(self) -> bool:
        """Whether every query attends to the same entries (dense memory)."""
        return self.scores is None


class LayerMemory(Protocol):
    """A memory backend of one layer: an index over the entries of the layer's `EntryStore`."""

    k: int  # entries retrieved per query (ignored by dense memory)
    train_size: int  # valid entries a row needs before searches stop being exact (0: never approximate)

    def add(self, ids: range) -> None:
        """Index entries `ids`, just appended to the entry store (their padding flags are there)."""

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        """Entries for queries (B, h, T, D) of the key/value heads `heads`."""

    def reset(self) -> None:
        """Forget every indexed entry (the entry store is reset by its owner)."""

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order), as beam search requires."""

    def search_params(self) -> dict:
        """The search parameters in force ({} for backends without any)."""

    def options(self) -> dict:
        """The options that rebuild this backend (recorded in a store's manifest)."""

    def set_search_params(self, **params) -> None:
        """Change search parameters; `ValueError` naming any this backend does not have."""

    def export_state(self) -> tuple[dict, dict]:
        """For persistence: (named binary objects the store writes, JSON-serialisable metadata)."""

    def import_state(self, load, source: str | None = None) -> None:
        """Adopt what `export_state` returned, as `load()` gives it on first use (lazily); `source` names its files."""

    def nbytes(self) -> int:
        """Bytes held by the index beyond the entry store."""

    def close(self) -> None:
        """Release files and memory maps held by the index."""

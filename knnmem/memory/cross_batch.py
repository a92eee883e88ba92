"""FoT's training-time memory: memory layers of batch row b read rows b-1, ..., b-`distance` of the batch.

It implements the memory interface the model uses, so attention has no training-only branch: each
search builds the memory from the window being read (the rows' unrotated keys and values, as if at
position 0), and nothing is ever written.
"""

from __future__ import annotations

import torch

from .entries import EntryStore
from .exact import top_k_hits
from .protocol import MemoryHits


class CrossBatchMemory:
    """Cross-batch attention for FoT training (`distance` 0 is ordinary attention).

    Args:
        distance: how many previous rows of the batch each row attends to.
        top_k: each query attends to only its `top_k` highest-scoring valid entries of those rows, the
            ones a top-k memory would retrieve at inference; None attends to all of them (FoT's training).
    """

    layers = ()  # nothing is written to it

    def __init__(self, distance: int, top_k: int | None = None):
        if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
            raise ValueError(f"cross-batch distance must be an integer >= 0, got {distance!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"cross-batch top_k must be at least 1 (or None), got {top_k!r}")
        self.distance, self.top_k = distance, top_k

    def __len__(self) -> int:
        return 0

    def check_input(self, config, *, batch: int, length: int, use_cache: bool) -> None:
        """Training reads one window per row, without a cache."""
        if length > config.max_position_embeddings or use_cache:
            raise ValueError("cross-batch memory (training) needs inputs of at most one window "
                             f"({config.max_position_embeddings} tokens, got {length}) and no cache")

    def search(self, layer: int, queries: torch.Tensor, heads: slice, *, window=None) -> MemoryHits | None:
        """The previous rows' entries for queries (B, h, T, D); `window` is the (keys, values, valid) being read."""
        if not self.distance:
            return None
        keys, values, valid = window
        shifts = range(1, self.distance + 1)
        rows = EntryStore(num_heads=keys.shape[1], head_dim=keys.shape[-1], codec=keys.dtype)
        rows.attach(torch.cat([_shift(keys, j) for j in shifts], dim=2),  # (B, H, distance*T, D)
                    torch.cat([_shift(values, j) for j in shifts], dim=2),
                    torch.cat([_shift(valid.bool(), j) for j in shifts], dim=1))
        if self.top_k is not None and self.top_k < len(rows):
            return top_k_hits(rows, queries, heads, self.top_k, differentiable=True)
        return MemoryHits(rows.keys(heads), rows.values(heads), rows.valid)

    def add(self, layer: int, keys, values, valid) -> None:
        raise AssertionError("cross-batch memory has no layers to write")

    def reorder_rows(self, rows: torch.Tensor) -> None:
        raise ValueError("cross-batch memory is for training; it cannot be reordered (beam search)")


def _shift(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` moved down by `rows` batch rows; the first rows are zeros (invalid)."""
    if rows >= x.shape[0]:
        return torch.zeros_like(x)
    return torch.cat([torch.zeros_like(x[:rows]), x[: x.shape[0] - rows]])

"""Growable storage of memory entries for one layer: keys, values and padding flags per batch row.

An entry's id is its index in this buffer, shared by every backend's index and by the values, so
ids never drift from the stored values.
"""

from __future__ import annotations

import torch


class EntryBuffer:
    """Keys/values (B, H, capacity, D) and valid flags (B, capacity), filled up to `len(self)`.

    Appending grows the buffers by doubling (amortised O(window) per append); views are returned
    without copying. When the new entries require grad (training through memory), appends are out of
    place so autograd keeps every stored window.
    """

    def __init__(self, *, num_heads: int, head_dim: int, dtype: torch.dtype):
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.reset()

    def reset(self) -> None:
        self._keys = self._values = self._valid = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def keys(self) -> torch.Tensor:
        """(B, H, M, D) stored keys."""
        return self._keys[:, :, : self._size]

    @property
    def values(self) -> torch.Tensor:
        """(B, H, M, D) stored values."""
        return self._values[:, :, : self._size]

    @property
    def valid(self) -> torch.Tensor:
        """(B, M) True for entries that may receive attention."""
        return self._valid[:, : self._size]

    def attach(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Adopt existing (e.g. memory-mapped) keys/values (B, H, M, D) and valid (B, M) without copying."""
        self._keys, self._values, self._valid = keys, values, valid
        self._size = keys.shape[2]

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> range:
        """Append keys/values (B, H, T, D) and valid (B, T); returns the ids given to them."""
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        start, end = self._size, self._size + keys.shape[2]
        if keys.requires_grad or values.requires_grad:
            self._keys = keys if not start else torch.cat([self.keys, keys], dim=2)
            self._values = values if not start else torch.cat([self.values, values], dim=2)
            self._valid = valid if not start else torch.cat([self.valid, valid], dim=1)
        else:
            if self._keys is None or end > self._keys.shape[2]:
                self._grow(keys.shape[0], max(end, 2 * start), keys.device)
            self._keys[:, :, start:end] = keys
            self._values[:, :, start:end] = values
            self._valid[:, start:end] = valid
        self._size = end
        return range(start, end)

    def _grow(self, batch: int, capacity: int, device: torch.device) -> None:
        shape = (batch, self.num_heads, capacity, self.head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=device)
        values = torch.empty(shape, dtype=self.dtype, device=device)
        valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        if self._size:
            keys[:, :, : self._size] = self.keys
            values[:, :, : self._size] = self.values
            valid[:, : self._size] = self.valid
        self._keys, self._values, self._valid = keys, values, valid

    def gather(self, heads: slice, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries `ids` (B, h, T, K) of heads `heads`, -1 for none: keys/values (B, h, T, K, D), valid (B, h, T, K)."""
        batch, num_heads, num_queries, k = ids.shape
        found = ids >= 0
        flat = ids.clamp_min(0).reshape(batch, num_heads, num_queries * k)  # (B, h, T*K)
        index = flat[..., None].expand(-1, -1, -1, self.head_dim)
        keys = self.keys[:, heads].gather(2, index).view(batch, num_heads, num_queries, k, self.head_dim)
        values = self.values[:, heads].gather(2, index).view(batch, num_heads, num_queries, k, self.head_dim)
        valid = self.valid[:, None, :].expand(-1, num_heads, -1).gather(2, flat).view_as(ids) & found
        return keys, values, valid

    def reorder_rows(self, index: torch.Tensor) -> None:
        if self._keys is not None:
            index = index.to(self._keys.device)
            self._keys, self._values, self._valid = self._keys[index], self._values[index], self._valid[index]

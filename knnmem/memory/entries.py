"""The entries of one memory layer: keys, values and padding flags per batch row, behind one interface.

An entry's id is its index here, shared by every backend's index and by the values, so ids never
drift from what they point to. Indexes are filled from this store and only from it, so they index
exactly the (encoded, possibly rounded) keys attention later reads.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .codecs import CastCodec, Codec


class EntryStore:
    """Keys/values (B, H, capacity, D) encoded by `codec`, and valid flags (B, capacity), filled up to `len(self)`.

    Appending grows the arrays by doubling (amortised O(window) per append). When the new entries
    require grad (training through memory), appends are out of place so autograd keeps every window.
    """

    def __init__(self, *, num_heads: int, head_dim: int, codec: Codec | torch.dtype):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.codec = codec if not isinstance(codec, torch.dtype) else CastCodec(codec)
        self.reset()

    @property
    def dtype(self) -> torch.dtype:
        return self.codec.dtype

    def reset(self) -> None:
        self._keys = self._values = self._valid = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def batch_size(self) -> int | None:
        return None if self._keys is None else self._keys.shape[0]

    @property
    def device(self) -> torch.device | None:
        return None if self._keys is None else self._keys.device

    def keys(self, heads: slice = slice(None)) -> torch.Tensor:
        """(B, h, M, D) stored keys of `heads`, decoded."""
        return self.codec.decode(self._keys[:, heads, : self._size])

    def values(self, heads: slice = slice(None)) -> torch.Tensor:
        """(B, h, M, D) stored values of `heads`, decoded."""
        return self.codec.decode(self._values[:, heads, : self._size])

    @property
    def valid(self) -> torch.Tensor:
        """(B, M) True for entries that may receive attention."""
        return self._valid[:, : self._size]

    def encoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, M, ·) keys and values exactly as stored, for persistence."""
        return self._keys[:, :, : self._size], self._values[:, :, : self._size]

    def attach(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Adopt already encoded (e.g. memory-mapped) keys/values (B, H, M, ·) and valid (B, M) without copying."""
        self._keys, self._values, self._valid = keys, values, valid
        self._size = keys.shape[2]

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> range:
        """Append keys/values (B, H, T, D) and valid (B, T); returns the ids given to them."""
        keys, values, valid = self.codec.encode(keys), self.codec.encode(values), valid.bool()
        start, end = self._size, self._size + keys.shape[2]
        if keys.requires_grad or values.requires_grad:
            self._keys = keys if not start else torch.cat([self._keys[:, :, :start], keys], dim=2)
            self._values = values if not start else torch.cat([self._values[:, :, :start], values], dim=2)
            self._valid = valid if not start else torch.cat([self.valid, valid], dim=1)
        else:
            if self._keys is None or end > self._keys.shape[2]:
                self._grow(keys, max(end, 2 * start))
            self._keys[:, :, start:end] = keys
            self._values[:, :, start:end] = values
            self._valid[:, start:end] = valid
        self._size = end
        return range(start, end)

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        shape = (like.shape[0], self.num_heads, capacity, like.shape[-1])  # (B, H, capacity, ·)
        keys = like.new_empty(shape)
        values = like.new_empty(shape)
        valid = torch.zeros((like.shape[0], capacity), dtype=torch.bool, device=like.device)
        if self._size:
            keys[:, :, : self._size], values[:, :, : self._size] = self.encoded()
            valid[:, : self._size] = self.valid
        self._keys, self._values, self._valid = keys, values, valid

    def take(self, ids: torch.Tensor, heads: slice, *, keys: bool = False):
        """Entries `ids` (B, h, T, K) of `heads`, -1 for none: values (B, h, T, K, D) and valid (B, h, T, K),
        plus their keys first when `keys` is set. Only these entries are decoded."""
        batch, num_heads, num_queries, k = ids.shape
        flat = ids.clamp_min(0).reshape(batch, num_heads, num_queries * k)  # (B, h, T*K)
        valid = self.valid[:, None, :].expand(-1, num_heads, -1).gather(2, flat).view_as(ids) & (ids >= 0)

        def gather(stored: torch.Tensor) -> torch.Tensor:
            index = flat[..., None].expand(-1, -1, -1, stored.shape[-1])
            picked = stored[:, heads, : self._size].gather(2, index)
            return self.codec.decode(picked).view(batch, num_heads, num_queries, k, -1)

        values = gather(self._values)
        return (gather(self._keys), values, valid) if keys else (values, valid)

    def chunks(self, size: int = 1 << 20) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(keys, values, valid) of consecutive entries, at most `size` at a time, decoded."""
        for start in range(0, self._size, size):
            end = min(start + size, self._size)
            yield (self.codec.decode(self._keys[:, :, start:end]), self.codec.decode(self._values[:, :, start:end]),
                   self._valid[:, start:end])

    def nbytes(self) -> int:
        if not self._size:
            return 0
        keys, values = self.encoded()
        return keys.nbytes + values.nbytes + self.valid.nbytes

    def reorder_rows(self, index: torch.Tensor) -> None:
        if self._keys is not None:
            index = index.to(self._keys.device)
            self._keys, self._values, self._valid = self._keys[index], self._values[index], self._valid[index]

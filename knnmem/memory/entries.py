"""The entries of one memory layer: keys, values and padding flags per batch row, behind one interface.

An entry's id is its index here, shared by every backend's index and by the values, so ids never
drift from what they point to. Indexes are filled from this store and only from it, so they index
exactly the (encoded, possibly rounded) keys attention later reads.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .codecs import RECONSTRUCTION_SHARE, CastCodec, Codec

# An exactly kept value is found by one int64 key: its row and head above these bits, its id below them.
_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1


class EntryStore:
    """Keys/values (B, H, capacity, ·) encoded by their codecs, and valid flags (B, capacity), filled up to `len(self)`.

    Appending grows the arrays by doubling (amortised O(window) per append). When the new entries
    require grad (training through memory), appends are out of place so autograd keeps every window.
    A value codec that needs training (product quantization) is trained once `train_size` valid
    entries exist, and every value stored so far is encoded then. Values its codes reconstruct worse
    than the codec's `error_bound` are also kept exactly, in the memory's dtype, and read in place of
    their codes.

    Args:
        codec: a dtype (cast codec), one codec for keys and values, or a (keys, values) pair.
        keep_keys: keep every key. Without, keys are held only until the index over them says it holds
            them (`drop_keys`), and afterwards only those of the latest append, for the index to read.
    """

    def __init__(self, *, num_heads: int, head_dim: int, codec: Codec | torch.dtype | tuple[Codec, Codec],
                 keep_keys: bool = True):
        self.num_heads, self.head_dim, self.keep_keys = num_heads, head_dim, keep_keys
        if isinstance(codec, torch.dtype):
            codec = CastCodec(codec)
        self.key_codec, self.value_codec = codec if isinstance(codec, tuple) else (codec, codec)
        self.reset()

    def reset(self) -> None:
        self._keys = self._values = self._valid = None
        # Values kept exactly: sorted keys (row * H + head) << _ID_BITS | id, the vectors (n, D) in that order (None:
        # none) and their code errors (None: not measured yet), by which the worst coded share is kept.
        self._set_exact(torch.zeros(0, dtype=torch.long), None, None)
        self._size = 0
        self._key_start = 0  # ids below it have no key held (see `drop_keys`)

    def __len__(self) -> int:
        return self._size

    @property
    def batch_size(self) -> int | None:
        return None if self._values is None else self._values.shape[0]

    @property
    def device(self) -> torch.device | None:
        return None if self._values is None else self._values.device

    @property
    def has_keys(self) -> bool:
        """Whether every stored key is held (exact search, re-indexing and re-ranking need them)."""
        return self._key_start == 0

    def _check_keys(self) -> None:
        if not self.has_keys:
            raise ValueError("this memory does not keep its keys (keep_keys=False): only its index holds them, so "
                             "it cannot be searched exactly, re-ranked or re-indexed; build it with keep_keys=True")

    def keys(self, heads: slice = slice(None)) -> torch.Tensor:
        """(B, h, M, D) stored keys of `heads`, decoded."""
        self._check_keys()
        return self.key_codec.decode(self._keys[:, heads, : self._size], heads)

    def keys_of(self, ids: range) -> torch.Tensor:
        """(B, H, T, D) keys of consecutive `ids`, decoded: held even without `keep_keys` for the latest append."""
        if ids.start < self._key_start:
            self._check_keys()
        return self.key_codec.decode(self._keys[:, :, ids.start - self._key_start : ids.stop - self._key_start])

    def values(self, heads: slice = slice(None)) -> torch.Tensor:
        """(B, h, M, D) stored values of `heads`, decoded."""
        return self._with_exact(self.value_codec.decode(self._values[:, heads, : self._size], heads), heads, 0)

    @property
    def valid(self) -> torch.Tensor:
        """(B, M) True for entries that may receive attention."""
        return self._valid[:, : self._size]

    def encoded(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, H, M, ·) keys (None when not all are held) and values exactly as stored, for persistence."""
        keys = self._keys[:, :, : self._size] if self.has_keys else None
        return keys, self._values[:, :, : self._size]

    def _key(self, rows: torch.Tensor, heads: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The int64 keys of the exact-value table for entries `ids` of `rows` and `heads`."""
        return (rows * self.num_heads + heads) << _ID_BITS | ids

    def _where(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, heads, ids) of the exact-value table's `keys`."""
        planes = keys >> _ID_BITS
        return planes // self.num_heads, planes % self.num_heads, keys & _ID_MASK

    def exact_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values kept exactly beside their codes: (n, 3) (row, head, id), sorted, and their vectors (n, D)."""
        where = torch.stack(self._where(self._exact_keys), dim=1)
        return where, self._exact if self._exact is not None else torch.zeros(0, self.head_dim)

    def attach(self, keys: torch.Tensor | None, values: torch.Tensor, valid: torch.Tensor,
               exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Adopt already encoded (e.g. memory-mapped) keys (None: not kept), values (B, H, M, ·) and
        valid (B, M) without copying, and the values kept exactly as `exact_values` gave them."""
        self._keys, self._values, self._valid = keys, values, valid
        self._size = values.shape[2]
        self._key_start = 0 if keys is not None else self._size
        where, vectors = exact if exact is not None else (torch.zeros(0, 3, dtype=torch.long), None)
        keys = self._key(*where.unbind(1))
        self._set_exact(keys.to(values.device), vectors.to(values.device) if len(keys) else None, None)

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> range:
        """Append keys/values (B, H, T, D) and valid (B, T); returns the ids given to them."""
        raw, valid = values, valid.bool()
        keys, values = self.key_codec.encode(keys), self.value_codec.encode(values)
        start, end = self._size, self._size + keys.shape[2]
        if keys.requires_grad or values.requires_grad:
            self._keys = keys if not start else torch.cat([self._keys[:, :, :start], keys], dim=2)
            self._values = values if not start else torch.cat([self._values[:, :, :start], values], dim=2)
            self._valid = valid if not start else torch.cat([self.valid, valid], dim=1)
        else:
            if self._values is None or end > self._values.shape[2]:
                self._grow(keys, values, max(end, 2 * start))
            if self.has_keys:
                self._keys[:, :, start:end] = keys
            else:  # the index reads them once, from `keys_of`
                self._keys, self._key_start = keys, start
            self._values[:, :, start:end] = values
            self._valid[:, start:end] = valid
        self._size = end
        self._keep_exact(raw, values, valid, start)
        codec = self.value_codec
        if not codec.trained and int(self.valid.sum()) >= max(codec.train_size, 1):
            self._train_values()
        return range(start, end)

    def _train_values(self) -> None:
        values = self.values()  # (B, H, M, D), staged in the memory's dtype
        self.value_codec.train(values.transpose(0, 1)[:, self.valid])  # (H, valid entries of every row, D)
        self._values = self.value_codec.encode(values)
        self._keep_exact(values, self._values, self.valid, 0)

    def _keep_exact(self, values: torch.Tensor, stored: torch.Tensor, valid: torch.Tensor, start: int) -> None:
        """Keep exactly the valid values (B, H, T, D) of ids `start`... whose codes `stored` reconstruct them worse than
        the codec's bound: of those and the ones kept before, the worst coded `RECONSTRUCTION_SHARE` of each row and
        head; the bound rises past those let go."""
        codec = self.value_codec
        if codec.error_bound is None:
            return
        errors = codec.coding_errors(values, stored)  # (B, H, T), on the device of the values
        device = errors.device
        poor = (errors > codec.error_bound.to(device)[None, :, None]) & valid[:, None, :].to(device)
        rows, heads, offsets = poor.nonzero(as_tuple=True)
        if not len(rows):
            return
        keys = self._key(rows, heads, start + offsets)
        vectors, errors = values.detach()[rows, heads, offsets].to(codec.out_dtype), errors[rows, heads, offsets]
        if self._exact is not None:
            if self._exact_errors is None:  # attached from a store: measured again from the codes
                self._exact_errors = self._exact_coding_errors()
            keys, vectors = torch.cat([self._exact_keys.to(device), keys]), torch.cat([self._exact.to(device), vectors])
            errors = torch.cat([self._exact_errors.to(device), errors])
        # What follows the codec's training values may be coded worse throughout (other text): the share stays that
        # of the training values, and the worst coded are kept.
        planes = keys >> _ID_BITS
        order = errors.argsort(descending=True, stable=True)
        order = order[planes[order].argsort(stable=True)]  # by row and head, the worst coded first in each
        ranked = planes[order]
        rank = torch.arange(len(order), device=device) - torch.searchsorted(ranked, ranked)
        caps = (self.valid.sum(1).to(device) * RECONSTRUCTION_SHARE).ceil().long()  # (B,)
        within = rank < caps[ranked // self.num_heads]
        kept, dropped = order[within], order[~within]
        if len(dropped):  # else a later, better coded value could take the place of one let go
            raised = torch.zeros(self.num_heads).scatter_reduce(
                0, (planes[dropped] % self.num_heads).cpu(), errors[dropped].float().cpu(), "amax")
            codec.error_bound = torch.maximum(codec.error_bound, raised)
        self._set_exact(keys[kept], vectors[kept], errors[kept])

    def _exact_coding_errors(self) -> torch.Tensor:
        """(n,) the squared code errors of the values kept exactly, from their codes."""
        device = self._exact.device
        where, errors = self.exact_values()[0].to(device), torch.empty(len(self._exact), device=device)
        for head in where[:, 1].unique().tolist():
            at = where[:, 1] == head
            codes = self._values[where[at, 0], head, where[at, 2]]  # (m, W)
            errors[at] = self.value_codec.coding_errors(self._exact[at][None, None], codes[None, None],
                                                        slice(head, head + 1))[0, 0]
        return errors

    def _set_exact(self, keys: torch.Tensor, vectors: torch.Tensor | None, errors: torch.Tensor | None) -> None:
        order = keys.argsort()
        self._exact_keys = keys[order]
        self._exact = vectors[order] if len(keys) else None  # `take` and `values` test for None
        self._exact_errors = errors[order] if errors is not None and len(keys) else None

    def _with_exact(self, values: torch.Tensor, heads: slice, start: int) -> torch.Tensor:
        """Decoded values (B, h, N, D) of `heads` and ids `start`..., those kept exactly put in place of their codes."""
        if self._exact is None:
            return values
        rows, local, ids = self._where(self._exact_keys)
        local, ids = local - heads.indices(self.num_heads)[0], ids - start
        inside = (local >= 0) & (local < values.shape[1]) & (ids >= 0) & (ids < values.shape[2])
        if inside.any():  # in place: codecs that keep values exactly decode to new tensors, never to their storage
            values[rows[inside], local[inside], ids[inside]] = self._exact[inside].to(values.dtype)
        return values

    def drop_keys(self) -> None:
        """Release the keys (`keep_keys=False`): the index over them holds them now."""
        if self.keep_keys:
            raise AssertionError("drop_keys on a store that keeps its keys")
        self._keys, self._key_start = None, self._size

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        def grown(like: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
            array = like.new_empty((like.shape[0], self.num_heads, capacity, like.shape[-1]))  # (B, H, capacity, ·)
            if self._size:
                array[:, :, : self._size] = old[:, :, : self._size]
            return array

        valid = torch.zeros((values.shape[0], capacity), dtype=torch.bool, device=values.device)
        if self._size:
            valid[:, : self._size] = self.valid
        if self.has_keys:
            self._keys = grown(keys, self._keys)
        self._values, self._valid = grown(values, self._values), valid

    def take(self, ids: torch.Tensor, heads: slice, *, keys: bool = False):
        """Entries `ids` (B, h, T, K) of `heads`, -1 for none: values (B, h, T, K, D) and valid (B, h, T, K),
        plus their keys first when `keys` is set. Only these entries are decoded."""
        batch, num_heads, num_queries, k = ids.shape
        flat = ids.clamp_min(0).reshape(batch, num_heads, num_queries * k)  # (B, h, T*K)
        valid = self.valid[:, None, :].expand(-1, num_heads, -1).gather(2, flat).view_as(ids) & (ids >= 0)

        first_head = heads.indices(self.num_heads)[0]
        planes = (torch.arange(batch, device=ids.device)[:, None, None] * self.num_heads
                  + torch.arange(first_head, first_head + num_heads, device=ids.device)[None, :, None])

        def gather(stored: torch.Tensor, codec: Codec) -> torch.Tensor:
            # Rows of the (B*H*capacity, D) view picked with index_select: several times faster on CPU
            # than `gather` with an index expanded over D.
            rows = (planes * stored.shape[2] + flat).reshape(-1)
            picked = stored.reshape(-1, stored.shape[-1]).index_select(0, rows)
            return codec.decode(picked.view(batch, num_heads, num_queries * k, -1), heads).view(
                batch, num_heads, num_queries, k, -1)

        values = gather(self._values, self.value_codec)
        if self._exact is not None:  # values kept exactly replace their codes' reconstruction
            wanted = ((planes << _ID_BITS) | flat).reshape(-1)
            at = torch.searchsorted(self._exact_keys, wanted).clamp_max(len(self._exact_keys) - 1)
            hit = self._exact_keys[at] == wanted
            values.view(-1, values.shape[-1])[hit] = self._exact[at[hit]].to(values.dtype)
        if not keys:
            return values, valid
        self._check_keys()
        return gather(self._keys, self.key_codec), values, valid

    def chunks(self, size: int = 1 << 20) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(keys, values, valid) of consecutive entries, at most `size` at a time, decoded."""
        self._check_keys()
        for start in range(0, self._size, size):
            end = min(start + size, self._size)
            values = self._with_exact(self.value_codec.decode(self._values[:, :, start:end]), slice(None), start)
            yield self.key_codec.decode(self._keys[:, :, start:end]), values, self._valid[:, start:end]

    def nbytes(self) -> int:
        if not self._size:
            return 0
        keys, values = self.encoded()
        exact = self._exact.nbytes + self._exact_keys.nbytes if self._exact is not None else 0
        return (keys.nbytes if keys is not None else 0) + values.nbytes + self.valid.nbytes + exact

    def reorder_rows(self, rows: torch.Tensor) -> None:
        if self._values is not None:
            rows = rows.to(self._values.device)
            self._values, self._valid = self._values[rows], self._valid[rows]
            self._keys = self._keys[rows] if self._keys is not None else None
        if self._exact is not None:  # each new row takes the exactly kept values of the row it copies
            old_rows, heads, ids = self._where(self._exact_keys)
            picked = [(new, (old_rows == old).nonzero()[:, 0]) for new, old in enumerate(rows.tolist())]
            keys = [self._key(torch.full_like(at, new), heads[at], ids[at]) for new, at in picked]
            errors = None if self._exact_errors is None else torch.cat([self._exact_errors[at] for _, at in picked])
            self._set_exact(torch.cat(keys), torch.cat([self._exact[at] for _, at in picked]), errors)

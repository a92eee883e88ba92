"""The memory of a LongLLaMA model: per memory layer, an entry store and the backend that indexes it.

The model writes to it explicitly in its window loop (`add`) and reads it inside attention
(`search`). The index spec picks the backend (see `backends.py`): `"dense"` (LongLLaMA's exact
attention to every entry), `"torch"` (exact top-k by blocked matmul), or any Faiss factory string
(approximate top-k). Persistence lives in `knnmem.store`; `load` and `save` here call it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch

from .backends import BACKENDS, make_backend
from .codecs import codec_spec, make_codecs
from .entries import EntryStore
from .protocol import LayerMemory, MemoryHits

if TYPE_CHECKING:
    from ..model.config import LongLlamaConfig

DEFAULT_K = 128
# For stores and the command line: exact search until a row holds 39,936 entries, then IVF with the
# L2 reduction probing 32 of 1,024 lists (recall@128 0.95-0.97 from 64k to 1M tokens; see the README).
DEFAULT_INDEX = "IVF1024,Flat"

# Called after every search with (layer, queries, heads, hits): how retrieval is measured or explained.
SearchObserver = Callable[[int, torch.Tensor, slice, MemoryHits], None]
# Called with every add's (layer, keys, values, valid), before encoding: e.g. to mirror a compressed memory
# in an uncompressed one that judges its retrieval.
AddObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Document(NamedTuple):
    """A document whose entries are ids `start..end-1` of a single-row memory."""

    id: int
    name: str
    start: int
    end: int


class Memory:
    """The memory of every memory layer of a model, for every batch row.

    Create it with `Memory.create(model, index=...)`, pass it to `model(..., memory=memory)` or
    `model.generate(..., memory=memory)`, and inspect it with `len(memory)` (entries per row). It holds
    memory maps when loaded from a store: `close()` it, or use it as a context manager.

    Args:
        layers: indices of the memory layers.
        num_heads, head_dim: key/value heads of those layers and their dimension.
        dtype: dtype of keys and values as attention reads them (and as stored unless `codec` says otherwise).
        codec: how stored keys and values are encoded (see `knnmem.memory.codecs.make_codecs`): "float32",
            "bfloat16", "float16", "int8", or "KEYS/VALUES" such as "int8/pq8" (product-quantized values).
            Default: the cast codec of `dtype`.
        keep_keys: keep every key in the entry store beside the index. Needed by exact search (`dense`,
            `torch`), re-indexing and `rerank`; without (Faiss specs only), the index's copy of the keys
            (its codes) is the only one, and the store is smaller by the keys' bytes.
        index: `"dense"`, `"torch"` or a Faiss factory string (inner-product metric).
        k: entries retrieved per query and head (top-k backends).
        train_size: entries a row needs before IVF/PQ indexes are trained (default: 39 per centroid).
        l2_reduction: index Faiss specs by the inner-product-to-L2 reduction (see `FaissBackend`; default:
            on for IVF specs, off for others).
        search_params: Faiss search parameters such as `efSearch=128` or `nprobe=64` (defaults: see
            `FaissBackend`).
    """

    def __init__(
        self,
        *,
        layers: Sequence[int],
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        index: str = "dense",
        k: int = DEFAULT_K,
        train_size: int | None = None,
        l2_reduction: bool | None = None,
        codec: str | None = None,
        keep_keys: bool = True,
        rerank: int = 1,
        **search_params,
    ):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.layers = tuple(layers)
        self.num_heads, self.head_dim, self.dtype, self.index = num_heads, head_dim, dtype, index
        if not isinstance(keep_keys, bool):
            raise ValueError(f"keep_keys must be true or false, got {keep_keys!r}")
        def codecs():  # each layer trains its own (product quantization)
            return make_codecs(codec, num_heads=num_heads, head_dim=head_dim, dtype=dtype)

        self.codec = codec_spec(*codecs())  # validated even without memory layers
        self._entries = {layer: EntryStore(num_heads=num_heads, head_dim=head_dim, codec=codecs(), keep_keys=keep_keys)
                         for layer in self.layers}
        options = dict(train_size=train_size, l2_reduction=l2_reduction, search_params=search_params,
                       **({"rerank": rerank} if rerank != 1 else {}))
        self._backends: dict[int, LayerMemory] = {
            layer: make_backend(index, self._entries[layer], k=k, **options) for layer in self.layers
        }
        self._k = k
        self.observers: list[SearchObserver] = []
        self.add_observers: list[AddObserver] = []
        self.documents: list[Document] = []  # corpus memories: which ids each document received
        self._provenance_source: Callable[[], torch.Tensor] | None = None  # a store's, worked out on first use
        self.provenance = None  # (entries, 3): document id, position, token id
        self.fingerprint: dict | None = None  # of the model whose keys/values these are (for saving)
        self.path: Path | None = None  # the store this memory was loaded from
        self.read_only = False  # loaded stores: additions go to an in-memory overlay
        self.overlay: Memory | None = None
        self.search_seconds = 0.0  # time spent in `search`, overlay included: what retrieval costs a caller
        self._closers: list[Callable[[], None]] = []  # release what a loaded store holds open
        self._shared = False  # a view: its stored entries belong to another memory, which closes them

    @classmethod
    def create(cls, model_or_config, *, index: str = "dense", **options) -> "Memory":
        """An empty memory matching a LongLLaMA model (or its config); options as in `Memory`.

        With no options this is the model's default memory: exact, dense and in RAM.
        """
        config: LongLlamaConfig = getattr(model_or_config, "config", model_or_config)
        memory = cls(layers=config.mem_layers, num_heads=config.num_key_value_heads, head_dim=config.head_dim,
                     dtype=config.memory_dtype, index=index, **options)
        if model_or_config is not config:
            from ..store.format import model_fingerprint

            memory.fingerprint = model_fingerprint(model_or_config)
        return memory

    def view(self) -> "Memory":
        """A memory reading this read-only memory's stored entries, with an overlay and observers of its own.

        Concurrent generations each read their own view, so none sees what another's generation adds; a
        view's overlay goes when the view does. Closing a view releases nothing of the store. The stored
        entries must not change while views read them, hence read-only memories only.
        """
        if not self.read_only:
            raise ValueError("only a read-only memory (a store opened without writable=True) can be shared by views")
        view = copy.copy(self)
        view.overlay, view.observers, view.add_observers, view._closers = None, [], [], []
        view.search_seconds, view._shared = 0.0, True
        return view

    def empty_like(self, index: str | None = None, **options) -> "Memory":
        """An empty memory of the same geometry, dtype and codec (and spec and options unless `index` is given)."""
        options = {"k": self.k, "codec": self.codec, **(self.options() if index is None else {}), **options}
        return Memory(layers=self.layers, num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype,
                      index=self.index if index is None else index, **options)

    @classmethod
    def load(cls, path: str | Path, *, model, writable: bool = False, verify: bool = False,
             ray: bool | dict = False) -> "Memory":
        """Open the store at `path` for `model` (see `knnmem.store.load_memory`); a sharded store's shards are served
        by Ray actors with `ray=True`."""
        from ..store.persist import load_memory

        return load_memory(path, model=model, writable=writable, verify=verify, ray=ray)

    def save(self, path: str | Path | None = None, *, include_overlay: bool = False) -> None:
        """Write this memory (one batch row) to a store directory (see `knnmem.store.save_memory`)."""
        from ..store.persist import save_memory

        save_memory(self, path, include_overlay=include_overlay)

    def reindex(self, index: str, *, path: str | Path | None = None, **options) -> "Memory":
        """The same entries (without overlay) under another index spec, from stored keys: no model run.

        Saved to `path` when given. Documents and provenance are kept.
        """
        memory = self.empty_like(index, **options)
        memory.extend(self, include_overlay=False)
        memory.documents, memory.provenance, memory.fingerprint = list(self.documents), self.provenance, self.fingerprint
        if path is not None:
            memory.save(path)
        return memory

    def options(self) -> dict:
        """The backend options this memory was made with (train size, reduction, search parameters, keep_keys
        when off)."""
        if not self.layers:
            return {}
        kept = {} if self._entries[self.layers[0]].keep_keys else {"keep_keys": False}
        return {**self._backends[self.layers[0]].options(), **kept}

    @property
    def train_size(self) -> int:
        """Valid entries a row needs before its indexes are trained; searches are exact until then (0: always)."""
        return self._backends[self.layers[0]].train_size if self.layers else 0

    @property
    def k(self) -> int:
        """Entries retrieved per query and head (ignored by the dense backend)."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"k must be a positive integer, got {value!r}")
        self._k = value
        for backend in self._backends.values():
            backend.k = value
        if self.overlay is not None:
            self.overlay.k = value

    def search_params(self) -> dict:
        """The Faiss search parameters in force ({} for exact backends)."""
        return self._backends[self.layers[0]].search_params() if self.layers else {}

    def set_search_params(self, **params) -> None:
        """Change Faiss search parameters (e.g. `efSearch`, `nprobe`) of every layer."""
        if self.index in BACKENDS:
            raise ValueError(f"index {self.index!r} has no Faiss search parameters")
        for backend in self._backends.values():
            backend.set_search_params(**params)

    def entries(self, layer: int) -> EntryStore:
        """The entry store of memory layer `layer` (keys, values and padding flags by id)."""
        return self._entries[layer]

    def backend(self, layer: int) -> LayerMemory:
        """The backend indexing memory layer `layer`."""
        return self._backends[layer]

    def check_compatible(self, config: "LongLlamaConfig") -> None:
        """Raise `ValueError` if this memory cannot serve a model with `config`."""
        expected = (tuple(config.mem_layers), config.num_key_value_heads, config.head_dim)
        actual = (self.layers, self.num_heads, self.head_dim)
        if expected != actual:
            raise ValueError(
                "memory does not match the model: memory has (layers, key/value heads, head_dim) = "
                f"{actual}, the model needs {expected}"
            )

    @property
    def batch_size(self) -> int | None:
        """Batch rows the entries were written for (None while empty)."""
        sizes = [e.batch_size for e in self._entries.values() if len(e)]
        if not sizes and self.overlay is not None:
            return self.overlay.batch_size
        return sizes[0] if sizes else None

    def check_batch(self, batch_size: int) -> None:
        """Raise `ValueError` if entries were written for a different number of batch rows."""
        if self.batch_size is not None and self.batch_size != batch_size:
            raise ValueError(
                f"memory holds {self.batch_size} batch rows but the input has {batch_size}; "
                "use a new Memory (or memory.reset()) for a different batch"
            )

    def __len__(self) -> int:
        return self.stored_entries + (len(self.overlay) if self.overlay is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys, values and indexes of every layer and row (overlay excluded)."""
        return sum(self._entries[layer].nbytes() + self._backends[layer].nbytes() for layer in self.layers
                   if len(self._entries[layer]))

    @property
    def stored_entries(self) -> int:
        """Entries per row, not counting the overlay of a read-only memory."""
        return len(self._entries[self.layers[0]]) if self.layers else 0

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Append keys/values (B, H, T, D), stored as if at position 0, with padding flags `valid` (B, T).

        A read-only memory puts them in its in-memory overlay, searched together with the stored entries.
        """
        if keys.shape[2] == 0:
            return
        self.check_batch(keys.shape[0])
        if self.read_only:
            if self.overlay is None:  # exact search over what generation adds: the overlay stays small
                self.overlay = self.empty_like("dense" if self.index == "dense" else "torch")
            self.overlay.add(layer, keys, values, valid)
            return
        for observe in self.add_observers:
            observe(layer, keys, values, valid)
        ids = self._entries[layer].add(keys, values, valid)
        self._backends[layer].add(ids)

    def extend(self, other: "Memory", *, chunk: int = 1 << 20, include_overlay: bool = True) -> "Memory":
        """Append every entry of `other` (same layers and geometry), e.g. to re-index it under another spec."""
        if (other.layers, other.num_heads, other.head_dim) != (self.layers, self.num_heads, self.head_dim):
            raise ValueError(
                f"cannot extend a memory of (layers, heads, head_dim) = {(self.layers, self.num_heads, self.head_dim)}"
                f" with one of {(other.layers, other.num_heads, other.head_dim)}"
            )
        for layer in self.layers:
            for keys, values, valid in other.entries(layer).chunks(chunk):
                self.add(layer, keys, values, valid)
        if include_overlay and other.overlay is not None:
            self.extend(other.overlay, chunk=chunk)
        return self

    def check_input(self, config: "LongLlamaConfig", *, batch: int, length: int, use_cache: bool) -> None:
        """Raise `ValueError` if the model with `config` cannot read `batch` rows with this memory."""
        self.check_compatible(config)
        self.check_batch(batch)

    def search(self, layer: int, queries: torch.Tensor, heads: slice, *, window=None) -> MemoryHits | None:
        """Entries of `layer` for queries (B, h, T, D) of key/value heads `heads`; None while the memory is empty.

        `window` (the keys and values being read) serves memories built from it, such as cross-batch
        training's; stored memories ignore it.
        """
        started = time.perf_counter()
        hits = self._search_stored(layer, queries, heads)
        extra = self.overlay.search(layer, queries, heads) if self.overlay is not None else None
        hits = merge_hits(hits, extra, offset=self.stored_entries)
        self.search_seconds += time.perf_counter() - started
        if hits is not None:
            for observe in self.observers:
                observe(layer, queries, heads, hits)
        return hits

    def _search_stored(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        """`search` of the stored entries alone (no overlay, no observers); None if there are none."""
        return self._backends[layer].search(queries, heads) if len(self._entries[layer]) else None

    def reset(self) -> None:
        """Forget every entry (a read-only memory forgets its overlay only)."""
        if self.read_only:
            self.overlay = None
            return
        for layer in self.layers:
            self._entries[layer].reset()
            self._backends[layer].reset()
        self.documents, self.provenance = [], None

    def reorder_rows(self, rows: torch.Tensor) -> None:
        if self.read_only:
            raise ValueError("a memory loaded from a store holds one row and cannot be reordered (beam search)")
        for layer in self.layers:
            self._entries[layer].reorder_rows(rows)
            self._backends[layer].reorder_rows(rows)

    @property
    def provenance(self) -> torch.Tensor | None:
        """(entries, 3): document id, position and token id of every stored entry (-1 for entries of no document)."""
        if self._provenance_source is not None:
            self._provenance, self._provenance_source = self._provenance_source(), None
        return self._provenance

    @provenance.setter
    def provenance(self, value: torch.Tensor | None) -> None:
        self._provenance, self._provenance_source = value, None

    def defer_provenance(self, source: Callable[[], torch.Tensor]) -> None:
        """Let `provenance` be `source()`, called on first use (a store's: 12 bytes an entry not spent at open)."""
        self._provenance, self._provenance_source = None, source

    def on_close(self, release: Callable[[], None]) -> None:
        """Call `release` when this memory is closed (the store registers the files it holds open)."""
        self._closers.append(release)

    def close(self) -> None:
        """Release the files and memory maps of a loaded store; the memory is empty afterwards.

        A view forgets its overlay only: the store stays open for the memory it was made from.
        """
        if self._shared:
            self.overlay = None
            return
        for layer in self.layers:
            self._backends[layer].close()
            self._entries[layer].reset()
        for close in self._closers:
            close()
        self._closers, self.overlay, self.provenance = [], None, None

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Memory(index={self.index!r}, k={self.k}, layers={list(self.layers)}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, codec={self.codec!r}, entries_per_row={len(self)})"
        )


def merge_hits(first: MemoryHits | None, second: MemoryHits | None, *, offset: int,
               k: int | None = None) -> MemoryHits | None:
    """Entries of two memories for the same queries; ids of `second` are shifted by `offset`.

    With `k`, retrieved (top-k) hits keep only the best `k` of both per query, by score: merging the top k of
    each part of a memory, part after part, gives exactly the top k of the whole (how shards are merged).
    Shared (dense) hits are always concatenated.
    """
    if second is not None and second.ids is not None:
        second = second._replace(ids=second.ids + offset)
    if first is None or second is None:
        return first if second is None else second
    if first.shared:
        return MemoryHits(torch.cat([first.keys, second.keys.to(first.keys.dtype)], dim=2),
                          torch.cat([first.values, second.values.to(first.values.dtype)], dim=2),
                          torch.cat([first.valid, second.valid], dim=1))
    merged = MemoryHits(None, torch.cat([first.values, second.values.to(first.values.dtype)], dim=3),
                        *(torch.cat([a, b], dim=3) for a, b in zip(first[2:], second[2:])))
    if k is None or merged.ids.shape[-1] <= k:
        return merged
    # Entries that get no attention (padding, or fewer than k found) must not displace any that do.
    scores, order = merged.scores.masked_fill(~merged.valid, float("-inf")).topk(k, dim=-1)  # (B, h, T, k)
    values = merged.values.gather(-2, order[..., None].expand(*order.shape, merged.values.shape[-1]))
    return MemoryHits(None, values, merged.valid.gather(-1, order), merged.ids.gather(-1, order), scores)

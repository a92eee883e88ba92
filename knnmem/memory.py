"""The memory of a LongLLaMA model: one backend per memory layer, for every batch row.

The model writes to it explicitly in its window loop (`add`) and reads it inside attention
(`search`). The index spec picks the backend: `"dense"` (LongLLaMA's exact attention to every
entry), `"torch"` (exact top-k by blocked matmul), or any Faiss factory string (approximate top-k).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from . import store
from .backends import DenseMemory, LayerMemory, MemoryHits, TorchTopKMemory
from .corpus import read_corpus
from .faiss_memory import FaissMemory
from .ingest import Document, encode_documents

if TYPE_CHECKING:
    from .config import LongLlamaConfig

# Index specs served by torch; any other spec is a Faiss factory string.
BACKENDS = {"dense": DenseMemory, "torch": TorchTopKMemory}
DEFAULT_K = 128
# For stores and the command line: exact search until a row holds 39,936 entries, then IVF with the
# L2 reduction probing 32 of 1,024 lists (recall@128 0.95-0.97 from 64k to 1M tokens; see the README).
DEFAULT_INDEX = "IVF1024,Flat"


class Memory:
    """The memory of every memory layer of a model, for every batch row.

    Create it with `Memory.create(model, index=...)`, pass it to `model(..., memory=memory)` or
    `model.generate(..., memory=memory)`, and inspect it with `len(memory)` (entries per row).

    Args:
        layers: indices of the memory layers.
        num_heads, head_dim: attention geometry of those layers.
        dtype: dtype in which keys and values are stored.
        index: `"dense"`, `"torch"` or a Faiss factory string (inner-product metric).
        k: entries retrieved per query and head (top-k backends).
        train_size: entries a row needs before IVF/PQ indexes are trained (default: 39 per centroid).
        l2_reduction: index Faiss specs by the inner-product-to-L2 reduction (see `FaissMemory`; default:
            on for `IVF...,Flat` specs only).
        search_params: Faiss search parameters such as `efSearch=128` or `nprobe=64` (defaults: see
            `FaissMemory`).
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
        **search_params,
    ):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if index in BACKENDS and (search_params or train_size is not None or l2_reduction is not None):
            raise ValueError(f"index {index!r} takes no Faiss options, got {sorted(search_params)}")
        self.layers = tuple(layers)
        self.num_heads, self.head_dim, self.dtype, self.index = num_heads, head_dim, dtype, index
        self.batch_size: int | None = None
        if index in BACKENDS:
            factory, options = BACKENDS[index], {}
        else:
            factory = FaissMemory
            options = dict(spec=index, train_size=train_size, search_params=search_params, l2_reduction=l2_reduction)
        self._backends: dict[int, LayerMemory] = {
            layer: factory(num_heads=num_heads, head_dim=head_dim, dtype=dtype, k=k, **options) for layer in self.layers
        }
        self._k = k
        self.l2_reduction = any(getattr(b, "l2_reduction", False) for b in self._backends.values())
        self.documents: list[Document] = []  # corpus memories: which ids each document received
        self.provenance: torch.Tensor | None = None  # document id, position, token id of document entries
        self.fingerprint: dict | None = None  # of the model whose keys/values these are (for saving)
        self.path: Path | None = None  # the store this memory was loaded from
        self.read_only = False  # loaded stores: additions go to an in-memory overlay
        self.overlay: Memory | None = None

    @classmethod
    def create(cls, model_or_config, *, index: str = "dense", **options) -> "Memory":
        """An empty memory matching a LongLLaMA model (or its config); options as in `Memory`."""
        config: LongLlamaConfig = getattr(model_or_config, "config", model_or_config)
        memory = cls(
            layers=config.mem_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            dtype=config.memory_dtype,
            index=index,
            **options,
        )
        if model_or_config is not config:
            memory.fingerprint = store.model_fingerprint(model_or_config)
        return memory

    def empty_like(self, index: str | None = None, **options) -> "Memory":
        """An empty memory of the same geometry and dtype (and spec and options unless `index` is given)."""
        options = {"k": self.k, **(self._options() if index is None else {}), **options}
        return Memory(layers=self.layers, num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype,
                      index=self.index if index is None else index, **options)

    @classmethod
    def load(cls, path: str | Path, *, model, writable: bool = False, verify: bool = False) -> "Memory":
        """Open the store at `path` for `model`: arrays memory-mapped, Faiss indexes read on first search.

        Read-only by default: entries added later (e.g. overflowing the local cache in generation) go
        to an in-memory overlay searched together with the store. `verify=True` also hashes the large
        arrays. Raises `store.StoreError` naming the file and the mismatch if anything does not fit.
        """
        fingerprint = store.model_fingerprint(model)
        manifest, data = store.open_store(path, fingerprint=fingerprint, verify=verify)
        size, heads, dim = manifest["entries"], manifest["num_heads"], manifest["head_dim"]
        dtype = getattr(torch, manifest["dtype"])
        options = manifest["options"]
        memory = cls(layers=manifest["layers"], num_heads=heads, head_dim=dim, dtype=dtype,
                     index=manifest["index"], k=manifest["k"], **options)
        memory.check_compatible(model.config)
        device = next(model.parameters()).device
        valid = store.map_array(data / "valid.bin", (1, size), torch.uint8, writable).bool().to(device)
        for layer in memory.layers:
            keys, values = (
                store.map_array(data / f"layer{layer}.{kind}.bin", (1, heads, size, dim), dtype, writable).to(device)
                for kind in ("keys", "values")
            )
            backend = memory.layer(layer)
            backend.buffer.attach(keys, values, valid)
            if isinstance(backend, FaissMemory) and size:
                files = [store.DeferredIndex(data / f"layer{layer}.head{h}.faiss") for h in range(heads)]
                bounds = [manifest["l2_bounds"][str(layer)]]
                outliers = [manifest["ivf_outliers"][str(layer)]] if "ivf_outliers" in manifest else None
                # Read on first search; memory-mapped unless the store is opened for writing.
                backend.import_indexes_lazily(
                    lambda files=files, bounds=bounds, outliers=outliers:
                    ([[f.read(mmap=not writable) for f in files]], bounds, outliers)
                )
        memory.batch_size = 1 if size else None
        memory.documents = [Document(**d) for d in manifest["documents"]]
        memory.provenance = store.map_array(data / "provenance.bin", (size, 3), torch.int64, writable)
        memory.fingerprint, memory.path, memory.read_only = fingerprint, Path(path), not writable
        return memory

    def save(self, path: str | Path | None = None, *, include_overlay: bool = False) -> None:
        """Write this memory (one batch row) to a store directory, atomically; default: where it was loaded from.

        Entries in the overlay of a read-only memory are written only with `include_overlay=True`.
        """
        path = path or self.path
        if path is None:
            raise ValueError("this memory was not loaded from a store: pass the path to save to")
        if self.fingerprint is None:
            raise ValueError("unknown model: create the memory with Memory.create(model) to save it")
        if self.batch_size not in (None, 1):
            raise ValueError(f"a store holds one memory row, this memory has {self.batch_size} rows")
        if include_overlay and self.overlay is not None and len(self.overlay):
            merged = self.reindex(self.index, **self._options())
            merged.extend(self.overlay)
            return merged.save(path)
        size = self.stored_entries
        arrays, indexes, bounds, outliers = {}, {}, {}, {}
        for layer in self.layers:
            backend = self._backends[layer]
            arrays[f"layer{layer}.keys.bin"] = backend.buffer.keys[0] if size else torch.zeros(0)
            arrays[f"layer{layer}.values.bin"] = backend.buffer.values[0] if size else torch.zeros(0)
            if isinstance(backend, FaissMemory) and size:
                rows, row_bounds, row_outliers = backend.export_indexes()
                indexes.update({f"layer{layer}.head{h}.faiss": index for h, index in enumerate(rows[0])})
                bounds[str(layer)], outliers[str(layer)] = row_bounds[0], row_outliers[0]
        valid = self._backends[self.layers[0]].buffer.valid[0] if size and self.layers else torch.zeros(0)
        arrays["valid.bin"] = valid.to(torch.uint8)
        known = self.provenance if self.provenance is not None else torch.zeros(0, 3, dtype=torch.long)
        unknown = torch.full((size - len(known), 3), -1)  # entries written by forward passes, not documents
        arrays["provenance.bin"] = torch.cat([known, unknown])
        manifest = dict(
            fingerprint=self.fingerprint, layers=list(self.layers), num_heads=self.num_heads, head_dim=self.head_dim,
            dtype=str(self.dtype).removeprefix("torch."), index=self.index, k=self.k, options=self._options(),
            l2_bounds=bounds, ivf_outliers=outliers, entries=size, documents=[d._asdict() for d in self.documents],
        )
        store.write_store(path, manifest=manifest, arrays=arrays, indexes=indexes)

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

    def add_documents(self, model, tokenizer, sources, *, progress: bool = True, **read_options) -> list[Document]:
        """Encode more documents into this memory and, if it came from a writable store, save it there."""
        if self.read_only:
            raise ValueError(f"memory loaded read-only from {self.path}; load it with writable=True to add documents")
        texts = read_corpus(sources, **read_options)
        tokens = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in texts]
        added = encode_documents(model, tokens, self, names=[d.name for d in texts], progress=progress)
        if self.path is not None:
            self.save(self.path)
        return added

    def _options(self) -> dict:
        first = self._backends[self.layers[0]] if self.layers else None
        if self.index in BACKENDS or first is None:
            return {}
        return dict(train_size=first.train_size, l2_reduction=self.l2_reduction, **first.search_params)

    @property
    def k(self) -> int:
        """Entries retrieved per query and head (ignored by the dense backend)."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"k must be a positive integer, got {value!r}")
        self._k = value
        for backend in self._backends.values():
            if hasattr(backend, "k"):
                backend.k = value
        if self.overlay is not None:
            self.overlay.k = value

    def set_search_params(self, **params) -> None:
        """Change Faiss search parameters (e.g. `efSearch`, `nprobe`) of every layer."""
        if self.index in BACKENDS:
            raise ValueError(f"index {self.index!r} has no Faiss search parameters")
        for backend in self._backends.values():
            backend.set_search_params(**params)

    def layer(self, layer: int) -> LayerMemory:
        """The backend of memory layer `layer` (its `buffer` holds ids, keys and values)."""
        return self._backends[layer]

    def check_compatible(self, config: "LongLlamaConfig") -> None:
        """Raise `ValueError` if this memory cannot serve a model with `config`."""
        expected = (tuple(config.mem_layers), config.num_attention_heads, config.head_dim)
        actual = (self.layers, self.num_heads, self.head_dim)
        if expected != actual:
            raise ValueError(
                "memory does not match the model: memory has (layers, heads, head_dim) = "
                f"{actual}, the model needs {expected}"
            )

    def check_batch(self, batch_size: int) -> None:
        """Raise `ValueError` if entries were written for a different number of batch rows."""
        if self.batch_size is not None and len(self) and self.batch_size != batch_size:
            raise ValueError(
                f"memory holds {self.batch_size} batch rows but the input has {batch_size}; "
                "use a new Memory (or memory.reset()) for a different batch"
            )

    def __len__(self) -> int:
        return self.stored_entries + (len(self.overlay) if self.overlay is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys, values and indexes of every layer and row (overlay excluded)."""
        total = 0
        for backend in self._backends.values():
            buffer = backend.buffer
            if not len(buffer):
                continue
            total += buffer.keys.nbytes + buffer.values.nbytes + buffer.valid.nbytes
            if isinstance(backend, FaissMemory):
                total += backend.index_bytes()
        return total

    @property
    def stored_entries(self) -> int:
        """Entries per row, not counting the overlay of a read-only memory."""
        return len(self._backends[self.layers[0]]) if self.layers else 0

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Append keys/values (B, H, T, D), stored as if at position 0, with padding flags `valid` (B, T).

        A read-only memory puts them in its in-memory overlay, searched together with the stored entries.
        """
        if keys.shape[2] == 0:
            return
        self.check_batch(keys.shape[0])
        if self.read_only:
            if self.overlay is None:  # exact search over what generation adds: the overlay stays small
                self.overlay = Memory(layers=self.layers, num_heads=self.num_heads, head_dim=self.head_dim,
                                      dtype=self.dtype, index="dense" if self.index == "dense" else "torch", k=self.k)
            self.overlay.add(layer, keys, values, valid)
            return
        self.batch_size = keys.shape[0]
        self._backends[layer].add(keys, values, valid.bool())

    def extend(self, other: "Memory", *, chunk: int = 1 << 20, include_overlay: bool = True) -> "Memory":
        """Append every entry of `other` (same layers and geometry), e.g. to re-index it under another spec."""
        if (other.layers, other.num_heads, other.head_dim) != (self.layers, self.num_heads, self.head_dim):
            raise ValueError(
                f"cannot extend a memory of (layers, heads, head_dim) = {(self.layers, self.num_heads, self.head_dim)}"
                f" with one of {(other.layers, other.num_heads, other.head_dim)}"
            )
        for layer in self.layers:
            buffer = other.layer(layer).buffer
            for start in range(0, len(buffer), chunk):
                end = start + chunk
                self.add(layer, buffer.keys[:, :, start:end], buffer.values[:, :, start:end], buffer.valid[:, start:end])
        if include_overlay and other.overlay is not None:
            self.extend(other.overlay, chunk=chunk)
        return self

    def search(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        """Entries of `layer` for queries (B, h, T, D) of heads `heads`; None while the memory is empty."""
        backend = self._backends[layer]
        hits = backend.search(queries, heads) if len(backend) else None
        extra = self.overlay.search(layer, queries, heads) if self.overlay is not None else None
        return merge_hits(hits, extra, offset=len(backend))

    def reset(self) -> None:
        """Forget every entry (a read-only memory forgets its overlay only)."""
        if self.read_only:
            self.overlay = None
            return
        for backend in self._backends.values():
            backend.reset()
        self.batch_size = None
        self.documents, self.provenance = [], None

    def reorder_rows(self, index: torch.Tensor) -> None:
        if self.read_only:
            raise ValueError("a memory loaded from a store holds one row and cannot be reordered (beam search)")
        for backend in self._backends.values():
            backend.reorder_rows(index)
        if self.batch_size is not None:
            self.batch_size = len(index)

    def __repr__(self) -> str:
        return (
            f"Memory(index={self.index!r}, k={self.k}, layers={list(self.layers)}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, entries_per_row={len(self)})"
        )


def merge_hits(first: MemoryHits | None, second: MemoryHits | None, *, offset: int) -> MemoryHits | None:
    """Entries of two memories for the same queries; ids of `second` are shifted by `offset`."""
    if second is not None and second.ids is not None:
        second = second._replace(ids=second.ids + offset)
    if first is None or second is None:
        return first if second is None else second
    shared = first.keys.dim() == 4
    dim = 2 if shared else 3
    cat = lambda a, b, d=dim: torch.cat([a, b.to(a.dtype)], dim=d)  # noqa: E731
    ids = None if shared else cat(first.ids, second.ids)
    return MemoryHits(cat(first.keys, second.keys), cat(first.values, second.values),
                      cat(first.valid, second.valid, 1 if shared else dim), ids)


def index_corpus(
    model, tokenizer, sources, *, path: str | Path, index: str = "dense", progress: bool = True,
    include: str = "*.txt", text_field: str = "text", **options,
) -> Memory:
    """Encode a corpus (files, folders, JSONL) into a memory under `index` and save it as a store at `path`.

    Documents are encoded independently (see `encode_documents`); `options` are those of `Memory`.
    """
    memory = Memory.create(model, index=index, **options)
    memory.add_documents(model, tokenizer, sources, progress=progress, include=include, text_field=text_field)
    memory.save(path)
    memory.path = Path(path)
    return memory

"""Saving a `Memory` as a store and opening it again: what of a memory goes into which file.

Arrays are written raw and reopened as copy-on-write memory maps; each backend's own state (Faiss
indexes, their metadata) goes through its `export_state` / `import_state`, so the store needs to
know no backend. The directory format itself is `format.py`'s; a sharded store (`shards.py`) opens as
a `ShardedMemory` over its shards, each opened here as a store of its own or in a Ray actor.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from ..memory.faiss_index import holds_ids, index_dimensions
from ..memory.manager import Document, Memory
from ..memory.sharded import LocalShards, ShardedMemory
from . import format as fmt
from . import shards as sharding
from .manifest import NO_TOKEN16


def save_memory(memory: Memory, path: str | Path | None = None, *, include_overlay: bool = False) -> None:
    """Write `memory` (one batch row) to a store directory, atomically; default: where it was loaded from.

    Entries in the overlay of a read-only memory are written only with `include_overlay=True`.
    """
    path = path or memory.path
    if path is None:
        raise ValueError("this memory was not loaded from a store: pass the path to save to")
    if memory.fingerprint is None:
        raise ValueError("unknown model: create the memory with Memory.create(model) to save it")
    if memory.batch_size not in (None, 1):
        raise ValueError(f"a store holds one memory row, this memory has {memory.batch_size} rows")
    if include_overlay and memory.overlay is not None and len(memory.overlay):
        merged = memory.reindex(memory.index, **memory.options())
        merged.extend(memory.overlay)
        return save_memory(merged, path)
    size = memory.stored_entries
    arrays, indexes, bounds, outliers, codec_arrays, exact_values = {}, {}, {}, {}, {}, {}
    for layer in memory.layers:
        entries = memory.entries(layer)
        keys, values = entries.encoded() if size else (torch.zeros(0), torch.zeros(0))
        if keys is not None:  # else only the index holds them (keep_keys=False)
            arrays[f"layer{layer}.keys.bin"] = keys[0] if size else keys
        arrays[f"layer{layer}.values.bin"] = values[0] if size else values
        for kind, codec in (("keys", entries.key_codec), ("values", entries.value_codec)):
            for name, tensor in codec.state().items():
                arrays[f"layer{layer}.{kind}-{name}.bin"] = tensor
                codec_arrays[f"layer{layer}.{kind}-{name}.bin"] = list(tensor.shape)
        where, vectors = entries.exact_values()
        if len(where):  # of the one row: (head, id) of each
            arrays[f"layer{layer}.exact-values.bin"] = vectors
            arrays[f"layer{layer}.exact-value-ids.bin"] = where[:, 1:].contiguous()
            exact_values[str(layer)] = len(where)
        objects, metadata = memory.backend(layer).export_state()
        indexes.update({f"layer{layer}.{name}": index for name, index in objects.items()})
        if metadata:
            bounds[str(layer)], outliers[str(layer)] = metadata["l2_bounds"], metadata["ivf_outliers"]
    valid = memory.entries(memory.layers[0]).valid[0] if size and memory.layers else torch.zeros(0)
    arrays["valid.bin"] = valid.to(torch.uint8)
    known = memory.provenance if memory.provenance is not None else torch.zeros(0, 3, dtype=torch.long)
    unknown = torch.full((size - len(known), 3), -1)  # entries written by forward passes, not documents
    provenance = torch.cat([known.long(), unknown])
    # Document ids and positions follow from the documents' entry ranges; stored only if they do not (4 bytes an
    # entry instead of 24).
    tokens_only = torch.equal(provenance[:, :2], _document_positions(memory.documents, size, torch.long)) and (
        not size or int(provenance[:, 2].max()) <= torch.iinfo(torch.int32).max)
    # Most vocabularies fit 16 bits: token ids as uint16, NO_TOKEN16 for entries of no document (-1).
    narrow = tokens_only and (not size or -1 <= int(provenance[:, 2].min()) <= int(provenance[:, 2].max()) < NO_TOKEN16)
    if narrow:
        arrays["provenance.bin"] = provenance[:, 2].int().where(provenance[:, 2] >= 0, NO_TOKEN16).to(torch.uint16)
    else:
        arrays["provenance.bin"] = provenance[:, 2].int().contiguous() if tokens_only else provenance
    manifest = dict(
        fingerprint=memory.fingerprint, layers=list(memory.layers), num_heads=memory.num_heads,
        head_dim=memory.head_dim, dtype=str(memory.dtype).removeprefix("torch."), codec=memory.codec,
        codec_arrays=codec_arrays, exact_values=exact_values,
        index=memory.index, k=memory.k, **({"provenance": "token_ids16" if narrow else "token_ids"} if tokens_only else {}),
        options=memory.options(), l2_bounds=bounds, ivf_outliers=outliers, entries=size,
        documents=[d._asdict() for d in memory.documents],
    )
    fmt.write_store(path, manifest=manifest, arrays=arrays, indexes=indexes)


def load_memory(path: str | Path, *, model, writable: bool = False, verify: bool = False,
                ray: bool | dict = False) -> Memory:
    """Open the store at `path` for `model`: arrays memory-mapped, Faiss indexes read on first search.

    Read-only by default: entries added later (e.g. overflowing the local cache in generation) go
    to an in-memory overlay searched together with the store. `verify=True` also hashes the large
    arrays. Raises `StoreError` naming the file and the mismatch if anything does not fit.

    A sharded store opens as a `ShardedMemory` (read-only): its shards opened here, or with `ray` each in a Ray
    actor (`ray` may be a dict of actor options such as `num_cpus`; see `knnmem.cluster.actors.RayShards`).
    """
    fingerprint = fmt.model_fingerprint(model)
    if fmt.is_sharded(fmt.read_manifest(path)):
        return _load_sharded(Path(path), model=model, fingerprint=fingerprint, writable=writable, verify=verify,
                             ray=ray)
    if ray:
        raise ValueError(f"{path}: ray=True serves the shards of a sharded store, and this store has none "
                         "(write one with `knnmem index ... --shards N`)")
    return open_memory(path, config=model.config, fingerprint=fingerprint, device=next(model.parameters()).device,
                       writable=writable, verify=verify)


def open_memory(path: str | Path, *, config, fingerprint: dict, device: torch.device, writable: bool = False,
                verify: bool = False) -> Memory:
    """`load_memory` of a store without shards, given what it needs of the model: its config, fingerprint and device
    (how a process without the model, such as a shard's actor, opens a store)."""
    manifest, handles = fmt.open_store(path, fingerprint=fingerprint, verify=verify)
    try:
        memory = _open_memory(Path(path), manifest, handles, config, device, writable)
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    for name, handle in handles.items():
        if not name.endswith(".faiss"):
            handle.close()  # mapped: the maps outlive the handles
    memory.fingerprint, memory.path, memory.read_only = fingerprint, Path(path), not writable
    return memory


def _memory_of(manifest: dict, file: Path, config, cls=Memory, **extra) -> Memory:
    """An empty `cls` of the manifest's geometry, codec, index and options, checked against the model's `config`."""
    try:  # stores written before codecs existed hold the cast codec of their dtype
        memory = cls(layers=manifest["layers"], num_heads=manifest["num_heads"], head_dim=manifest["head_dim"],
                     dtype=getattr(torch, manifest["dtype"]), codec=manifest.get("codec"), index=manifest["index"],
                     k=manifest["k"], **extra, **manifest["options"])
        memory.check_compatible(config)
    except (ValueError, TypeError) as error:
        raise fmt.StoreError(f"{file}: {error}") from None
    return memory


def _load_sharded(path: Path, *, model, fingerprint: dict, writable: bool, verify: bool, ray) -> ShardedMemory:
    if writable:
        raise ValueError(f"{path}: a sharded store opens read-only; add documents by indexing the corpus again")
    manifest, manifests, shards = sharding.open_shards(path, fingerprint=fingerprint)
    names = [shard.name for shard in shards]
    if ray and manifest["index"] == "dense":
        raise ValueError(f"{path}: a dense memory attends to every entry, so its actors would send all of it with every "
                         "token; index it with torch or a Faiss spec to serve it from Ray")
    if ray:
        from ..cluster.actors import RayShards

        shard_set = RayShards(shards, config=model.config, fingerprint=fingerprint, verify=verify,
                              **(ray if isinstance(ray, dict) else {}))
    else:
        shard_set = LocalShards(_open_each(shards, config=model.config, fingerprint=fingerprint,
                                           device=next(model.parameters()).device, verify=verify), names)
    try:
        memory = _memory_of(manifests[0], path / fmt.MANIFEST, model.config, ShardedMemory, shards=shard_set)
    except BaseException:
        shard_set.close()
        raise
    offset, documents = 0, []
    for shard in manifests:  # document ids and entry ranges numbered across shards, in shard order
        first = len(documents)
        documents += [Document(first + d["id"], d["name"], offset + d["start"], offset + d["end"])
                      for d in shard["documents"]]
        offset += shard["entries"]
    memory.documents, memory.fingerprint, memory.path = documents, fingerprint, path
    return memory


def _open_each(shards: list[Path], **options) -> list[Memory]:
    """Every shard opened with `open_memory(**options)`, or `StoreError` naming the first that cannot be (the others
    closed again)."""
    opened = []
    try:
        for number, shard in enumerate(shards):
            try:
                opened.append(open_memory(shard, **options))
            except fmt.StoreError as error:
                raise sharding.shard_error(shard, number, len(shards), error) from None
    except BaseException:
        for memory in opened:
            memory.close()
        raise
    return opened


def _open_memory(path: Path, manifest: dict, handles: dict, config, device: torch.device, writable: bool) -> Memory:
    size, heads, dim = manifest["entries"], manifest["num_heads"], manifest["head_dim"]
    memory = _memory_of(manifest, path / fmt.MANIFEST, config)
    valid = fmt.map_array(handles["valid.bin"], (1, size), torch.uint8, writable).bool().to(device)
    for layer in memory.layers:
        entries = memory.entries(layer)
        data = path / manifest["generation"]
        arrays = {}
        for kind, codec in (("keys", entries.key_codec), ("values", entries.value_codec)):
            _load_codec_state(codec, data, handles, f"layer{layer}.{kind}-", manifest.get("codec_arrays", {}))
            name = f"layer{layer}.{kind}.bin"
            if name in handles:  # the keys are absent when only the index holds them (keep_keys: false)
                shape = (1, heads, size, codec.width(dim))
                _check_codes(data / name, manifest["files"][name]["bytes"], shape, codec)
                arrays[kind] = fmt.map_array(handles[name], shape, codec.dtype, writable).to(device)
        count = manifest.get("exact_values", {}).get(str(layer), 0)  # absent in stores written before them
        if count and entries.value_codec.error_bound is None:
            raise fmt.StoreError(f"{data / f'layer{layer}.exact-values.bin'}: values kept exactly beside their codes, "
                                 f"but the value codec {entries.value_codec.name} has no error bound to keep them by")
        exact = _exact_values(data, handles, layer, count, manifest, writable) if count else None
        entries.attach(arrays.get("keys"), arrays["values"], valid, exact)
        names = {f"head{h}.{kind}": f"layer{layer}.head{h}.{kind}" for h in range(heads)
                 for kind in ("faiss", "outliers.faiss") if f"layer{layer}.head{h}.{kind}" in handles}
        if size and all(f"layer{layer}.head{h}.faiss" in handles for h in range(heads)):  # a Faiss memory
            opened = {own: fmt.DeferredIndex(data / name, handles[name]) for own, name in names.items()}
            metadata = {"l2_bounds": manifest["l2_bounds"][str(layer)],
                        "ivf_outliers": manifest["ivf_outliers"][str(layer)]}
            for h, head in enumerate(metadata["ivf_outliers"]):
                # Without stored keys, outliers are scored from their keys in this file alone.
                if "keys" not in arrays and head["ids"] and f"head{h}.outliers.faiss" not in opened:
                    raise fmt.StoreError(f"{data / f'layer{layer}.head{h}.outliers.faiss'}: missing, but {fmt.MANIFEST} "
                                         f"lists {len(head['ids'])} outliers of head {h} and the store keeps no keys")
            widths = index_dimensions(manifest["index"], dim, manifest["options"]["l2_reduction"])
            # Read on first search; memory-mapped unless the store is opened for writing.
            memory.backend(layer).import_state(
                lambda opened=opened, metadata=metadata, widths=widths:
                (_checked_indexes(opened, metadata, mmap=not writable, dims=widths, entries=size), metadata),
                source=str(data / f"layer{layer}"))
            for f in opened.values():
                memory.on_close(f.close)
    memory.documents = [Document(**d) for d in manifest["documents"]]
    if manifest.get("provenance") in ("token_ids", "token_ids16"):  # else (entries, 3) int64, as older stores hold
        narrow = manifest["provenance"] == "token_ids16"
        tokens = fmt.map_array(handles["provenance.bin"], (size, 1), torch.uint16 if narrow else torch.int32, writable)
        documents = list(memory.documents)  # as stored: documents added later have provenance of their own

        def provenance() -> torch.Tensor:
            ids = tokens.int()
            ids = ids.where(ids != NO_TOKEN16, -1) if narrow else ids
            return torch.cat([_document_positions(documents, size, torch.int32), ids], dim=1)

        memory.defer_provenance(provenance)
    else:
        memory.provenance = fmt.map_array(handles["provenance.bin"], (size, 3), torch.int64, writable)
    return memory


def _document_positions(documents: list[Document], size: int, dtype: torch.dtype) -> torch.Tensor:
    """(size, 2): the document id and position of every entry a document covers, -1 for the others."""
    columns = torch.full((size, 2), -1, dtype=dtype)
    for document in documents:
        columns[document.start : document.end, 0] = document.id
        columns[document.start : document.end, 1] = torch.arange(document.end - document.start, dtype=dtype)
    return columns


def _exact_values(data: Path, handles: dict, layer: int, count: int, manifest: dict,
                  writable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The values layer `layer` keeps exactly beside their codes, as `EntryStore.attach` takes them, after checking
    that they are entries of the store in the order it writes them."""
    name = f"layer{layer}.exact-value-ids.bin"
    heads, entries = manifest["num_heads"], manifest["entries"]
    where = fmt.map_array(handles[name], (count, 2), torch.int64, writable)
    keys = where[:, 0] * entries + where[:, 1]
    problem = None
    if ((where[:, 0] < 0) | (where[:, 0] >= heads) | (where[:, 1] < 0) | (where[:, 1] >= entries)).any():
        problem = f"holds (head, id) pairs outside the {heads} heads and {entries} entries"
    elif count > 1 and not (keys[1:] > keys[:-1]).all():
        problem = "holds (head, id) pairs out of order or repeated"
    if problem:
        raise fmt.StoreError(f"{data / name}: {problem} (corrupted)")
    name = f"layer{layer}.exact-values.bin"
    vectors = fmt.map_array(handles[name], (count, manifest["head_dim"]), getattr(torch, manifest["dtype"]), writable)
    if not vectors.isfinite().all():
        raise fmt.StoreError(f"{data / name}: holds non-finite numbers (corrupted)")
    return torch.cat([torch.zeros(count, 1, dtype=torch.int64), where], dim=1), vectors


def _load_codec_state(codec, data: Path, handles: dict, prefix: str, shapes: dict) -> None:
    """Give `codec` its trained parameters: the float32 files `<prefix><name>.bin` of the manifest's `codec_arrays`
    (name -> shape), read from their open handles."""
    files = {name[len(prefix):-len(".bin")]: (name, shape) for name, shape in shapes.items() if name.startswith(prefix)}
    if not files:
        return
    arrays = {}
    try:
        for key, (name, shape) in files.items():
            if name not in handles:
                raise ValueError("missing, yet the manifest lists it as the codec's parameters")
            handles[name].seek(0)
            numbers = np.frombuffer(handles[name].read(), dtype=np.float32)
            if not isinstance(shape, list) or numbers.size != int(np.prod(shape)):
                raise ValueError(f"holds {numbers.size:,} float32 numbers, the manifest gives it shape {shape!r}")
            arrays[key] = torch.from_numpy(numbers.reshape(shape).copy())
        codec.load_state(arrays)
    except ValueError as error:
        raise fmt.StoreError(f"{', '.join(str(data / name) for name, _ in files.values())}: {error}") from None


def _check_codes(file: Path, size: int, shape: tuple, codec) -> None:
    """`StoreError` unless `file` (of `size` bytes) holds `shape` codes of `codec`: a codebook must fit its codes."""
    expected = int(np.prod(shape)) * torch.empty(0, dtype=codec.dtype).element_size()
    if size != expected:
        raise fmt.StoreError(
            f"{file}: {size:,} bytes, but codec {codec.name} ({'trained' if codec.trained else 'not trained yet'}) "
            f"stores (heads, entries, width) = {shape[1:]} as {codec.dtype}: {expected:,} bytes; its codes do not match "
            "the codec or codebook the manifest names")


def _checked_indexes(opened: dict[str, fmt.DeferredIndex], metadata: dict, *, mmap: bool, dims: tuple[int, ...],
                     entries: int) -> dict[str, faiss.Index]:
    """The indexes of one layer (`head<h>.faiss`, and `head<h>.outliers.faiss` where written), each checked
    (`_checked_index`), all over vectors of one layout, and each head's outlier keys as many as its outlier ids."""
    indexes = {own: _checked_index(f, mmap=mmap, dims=dims, entries=entries)
               for own, f in opened.items() if not own.endswith(".outliers.faiss")}
    dim = indexes["head0.faiss"].d
    for own, index in indexes.items():
        if index.d != dim:
            raise fmt.StoreError(f"{opened[own].file}: indexes vectors of {index.d} dimensions, head 0 of its layer "
                                 f"{dim}: one layout holds all (corrupted)")
    for h, head in enumerate(metadata["ivf_outliers"]):
        own = f"head{h}.outliers.faiss"
        if own not in opened:
            continue
        keys = indexes[own] = opened[own].read(mmap=mmap)
        if not isinstance(keys, faiss.IndexFlat) or keys.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise fmt.StoreError(f"{opened[own].file}: a {type(keys).__name__}, not the flat inner-product index of "
                                 "outlier keys the store writes (corrupted)")
        if keys.d != dim or keys.ntotal != len(head["ids"]):
            raise fmt.StoreError(f"{opened[own].file}: holds {keys.ntotal} keys of {keys.d} dimensions for the "
                                 f"{len(head['ids'])} outliers {fmt.MANIFEST} lists for head {h}, of {dim} (corrupted)")
    return indexes


def _checked_index(index_file: fmt.DeferredIndex, *, mmap: bool, dims: tuple[int, ...], entries: int) -> faiss.Index:
    """The index in `index_file`, after checking that it is what the store wrote: an IVF index or an id-mapped one,
    over vectors of one of `dims` dimensions, whose ids are entries of the store (they index the value arrays). The
    ids in IVF lists are checked as searches return them (`FaissBackend`): reading them all here would read every
    list."""
    index = index_file.read(mmap=mmap)
    problem = None
    if not isinstance(index, faiss.IndexIDMap2) and not holds_ids(index):
        problem = f"a {type(index).__name__}, not an IVF or id-mapped index as the store writes"
    elif index.d not in dims:
        problem = f"indexes vectors of {index.d} dimensions, the store's keys need {' or '.join(map(str, dims))}"
    elif index.ntotal > entries:
        problem = f"holds {index.ntotal} vectors for {entries} entries"
    elif isinstance(index, faiss.IndexIDMap2):
        ids = faiss.vector_to_array(index.id_map)
        if len(ids) != index.ntotal:
            problem = f"holds {index.ntotal} vectors and {len(ids)} ids"
        elif len(ids) and (ids.min() < 0 or ids.max() >= entries):
            problem = f"maps vectors to ids {ids.min()}..{ids.max()}, outside the {entries} entries"
    if problem:
        raise fmt.StoreError(f"{index_file.file}: {problem} (corrupted)")
    return index

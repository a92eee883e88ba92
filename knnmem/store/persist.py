"""Saving a `Memory` as a store and opening it again: what of a memory goes into which file.

Arrays are written raw and reopened as copy-on-write memory maps; each backend's own state (Faiss
indexes, their metadata) goes through its `export_state` / `import_state`, so the store needs to
know no backend. The directory format itself is `format.py`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..memory.manager import Document, Memory
from . import format as fmt


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
    arrays, indexes, bounds, outliers, codec_arrays = {}, {}, {}, {}, {}
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
        objects, metadata = memory.backend(layer).export_state()
        indexes.update({f"layer{layer}.{name}": index for name, index in objects.items()})
        if metadata:
            bounds[str(layer)], outliers[str(layer)] = metadata["l2_bounds"], metadata["ivf_outliers"]
    valid = memory.entries(memory.layers[0]).valid[0] if size and memory.layers else torch.zeros(0)
    arrays["valid.bin"] = valid.to(torch.uint8)
    known = memory.provenance if memory.provenance is not None else torch.zeros(0, 3, dtype=torch.long)
    unknown = torch.full((size - len(known), 3), -1)  # entries written by forward passes, not documents
    arrays["provenance.bin"] = torch.cat([known, unknown])
    manifest = dict(
        fingerprint=memory.fingerprint, layers=list(memory.layers), num_heads=memory.num_heads,
        head_dim=memory.head_dim, dtype=str(memory.dtype).removeprefix("torch."), codec=memory.codec,
        codec_arrays=codec_arrays,
        index=memory.index, k=memory.k,
        options=memory.options(), l2_bounds=bounds, ivf_outliers=outliers, entries=size,
        documents=[d._asdict() for d in memory.documents],
    )
    fmt.write_store(path, manifest=manifest, arrays=arrays, indexes=indexes)


def load_memory(path: str | Path, *, model, writable: bool = False, verify: bool = False) -> Memory:
    """Open the store at `path` for `model`: arrays memory-mapped, Faiss indexes read on first search.

    Read-only by default: entries added later (e.g. overflowing the local cache in generation) go
    to an in-memory overlay searched together with the store. `verify=True` also hashes the large
    arrays. Raises `StoreError` naming the file and the mismatch if anything does not fit.
    """
    fingerprint = fmt.model_fingerprint(model)
    manifest, data = fmt.open_store(path, fingerprint=fingerprint, verify=verify)
    size, heads, dim = manifest["entries"], manifest["num_heads"], manifest["head_dim"]
    dtype = getattr(torch, manifest["dtype"])
    try:  # stores written before codecs existed hold the cast codec of their dtype
        memory = Memory(layers=manifest["layers"], num_heads=heads, head_dim=dim, dtype=dtype, codec=manifest.get("codec"),
                        index=manifest["index"], k=manifest["k"], **manifest["options"])
    except ValueError as error:
        raise fmt.StoreError(f"{Path(path) / fmt.MANIFEST}: {error}") from None
    memory.check_compatible(model.config)
    device = next(model.parameters()).device
    valid = fmt.map_array(data / "valid.bin", (1, size), torch.uint8, writable).bool().to(device)
    for layer in memory.layers:
        entries = memory.entries(layer)
        arrays = {}
        for kind, codec in (("keys", entries.key_codec), ("values", entries.value_codec)):
            _load_codec_state(codec, data, f"layer{layer}.{kind}-", manifest.get("codec_arrays", {}))
            name = f"layer{layer}.{kind}.bin"
            if name not in manifest["files"] and not (kind == "keys" and manifest["options"].get("keep_keys") is False):
                raise fmt.StoreError(f"{data / name}: not listed in {fmt.MANIFEST}, yet the store keeps its {kind}")
            if name in manifest["files"]:
                shape = (1, heads, size, codec.width(dim))
                _check_codes(data / name, manifest["files"][name]["bytes"], shape, codec)
                arrays[kind] = fmt.map_array(data / name, shape, codec.dtype, writable).to(device)
        entries.attach(arrays.get("keys"), arrays["values"], valid)
        files = {f"head{h}.{kind}": data / f"layer{layer}.head{h}.{kind}" for h in range(heads)
                 for kind in ("faiss", "outliers.faiss") if f"layer{layer}.head{h}.{kind}" in manifest["files"]}
        if size and all(f"layer{layer}.head{h}.faiss" in manifest["files"] for h in range(heads)):
            opened = {name: fmt.DeferredIndex(file) for name, file in files.items()}
            metadata = {"l2_bounds": manifest["l2_bounds"][str(layer)],
                        "ivf_outliers": manifest.get("ivf_outliers", {}).get(str(layer))}
            # Read on first search; memory-mapped unless the store is opened for writing.
            memory.backend(layer).import_state(
                lambda opened=opened, metadata=metadata:
                ({name: f.read(mmap=not writable) for name, f in opened.items()}, metadata))
            for f in opened.values():
                memory.on_close(f.close)
    memory.documents = [Document(**d) for d in manifest["documents"]]
    memory.provenance = fmt.map_array(data / "provenance.bin", (size, 3), torch.int64, writable)
    memory.fingerprint, memory.path, memory.read_only = fingerprint, Path(path), not writable
    return memory


def _load_codec_state(codec, data: Path, prefix: str, shapes: dict) -> None:
    """Give `codec` its trained parameters: the float32 files `<prefix><name>.bin` of the manifest's `codec_arrays`
    (name -> shape)."""
    files = {name[len(prefix):-len(".bin")]: (data / name, shape) for name, shape in shapes.items()
             if name.startswith(prefix)}
    if not files:
        return
    arrays = {}
    try:
        for name, (file, shape) in files.items():
            if not file.exists():
                raise ValueError("missing, yet the manifest lists it as the codec's parameters")
            numbers = np.fromfile(file, dtype=np.float32)
            if not isinstance(shape, list) or numbers.size != int(np.prod(shape)):
                raise ValueError(f"holds {numbers.size:,} float32 numbers, the manifest gives it shape {shape!r}")
            arrays[name] = torch.from_numpy(numbers.reshape(shape))
        codec.load_state(arrays)
    except ValueError as error:
        raise fmt.StoreError(f"{', '.join(str(file) for file, _ in files.values())}: {error}") from None


def _check_codes(file: Path, size: int, shape: tuple, codec) -> None:
    """`StoreError` unless `file` (of `size` bytes) holds `shape` codes of `codec`: a codebook must fit its codes."""
    expected = int(np.prod(shape)) * torch.empty(0, dtype=codec.dtype).element_size()
    if size != expected:
        raise fmt.StoreError(
            f"{file}: {size:,} bytes, but codec {codec.name} ({'trained' if codec.trained else 'not trained yet'}) "
            f"stores (heads, entries, width) = {shape[1:]} as {codec.dtype}: {expected:,} bytes; its codes do not match "
            "the codec or codebook the manifest names")

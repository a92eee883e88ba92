"""Persisting a memory: a directory that any process reopens in milliseconds.

Layout of a store directory (documented for users in `indexes/README.md`):

    manifest.json              the commit point: format, model fingerprint, geometry, index, documents, files
    data-<generation>/         one complete generation of data files
        layer<L>.keys.bin      (H, M, D) raw little-endian, stored dtype (bfloat16/float16/float32, int8);
                               absent when only the index holds the keys (option keep_keys false)
        layer<L>.values.bin    (H, M, D), or (H, M, W) codes of the manifest's `codec` (int8: D + 2, pq<M>: M)
        layer<L>.values-codebook.bin  (H, M, 2**bits, D / M) float32: the PQ codebook, once trained
        layer<L>.head<h>.faiss one Faiss index per head (Faiss specs only)
        layer<L>.head<h>.outliers.faiss  keys of the IVF outliers, when keys are not kept
        valid.bin              (M,) uint8: 1 for entries that may receive attention
        provenance.bin         (M, 3) int64: document id, token position, token id

`write_store` writes a new generation directory, then atomically replaces `manifest.json`, then deletes
older generations. A process killed at any point leaves the previous manifest (and its generation)
or the new one: never a store that loads half-written. Readers memory-map the arrays of the
generation they opened and hold its index files open; deleting an old generation does not disturb
them (POSIX keeps mapped and open files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import faiss
import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Files hashed on every load; the large arrays are checked by size (hash them with verify=True).
_ALWAYS_HASHED = ("valid.bin", "provenance.bin", "codebook.bin")
_FINGERPRINT_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mem_layers",
    "mem_positionals", "rope_theta", "max_position_embeddings", "num_key_value_heads", "head_dim",
    "mem_position_scheme",
)


class StoreError(ValueError):
    """A store cannot be read or does not fit the model; the message names the file and the mismatch."""


def model_fingerprint(model) -> dict:
    """What a store's entries depend on: config fields and a digest of the memory layers' k/v projections."""
    config = model.config
    digest = hashlib.sha256()
    for layer in config.mem_layers:
        attention = model.get_decoder().layers[layer].self_attn
        for projection in (attention.k_proj, attention.v_proj):
            digest.update(projection.weight.detach().float().cpu().numpy().tobytes())
    return {"config": {f: getattr(config, f) for f in _FINGERPRINT_FIELDS}, "kv_projections_sha256": digest.hexdigest()}


def write_store(path: str | Path, *, manifest: dict, arrays: dict[str, torch.Tensor], indexes: dict) -> None:
    """Write a new generation of `arrays` (raw) and Faiss `indexes` under `path`, then commit `manifest`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generation = f"data-{uuid.uuid4().hex[:12]}"
    data = path / generation
    data.mkdir()
    files = {name: _write_tensor(data / name, tensor) for name, tensor in arrays.items()}
    for name, index in indexes.items():
        faiss.write_index(index, str(data / name))
        files[name] = _file_record(data / name)
    _fsync_dir(data)
    from .. import __version__

    manifest = {"format_version": FORMAT_VERSION, "knnmem_version": __version__, **manifest,
                "generation": generation, "files": files}
    tmp = path / f"{MANIFEST}.{generation}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, path / MANIFEST)  # the commit
    _fsync_dir(path)
    for stale in path.iterdir():
        if stale.name != generation and (stale.name.startswith("data-") or stale.name.endswith(".tmp")):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def read_manifest(path: str | Path) -> dict:
    """The manifest of store `path`; `StoreError` if missing, unreadable or of an unknown format."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise StoreError(f"{file}: missing; {path} is not a knnmem store (or its first save never completed)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{file}: not valid JSON ({error})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise StoreError(f"{file}: format version {version!r} is not supported (this knnmem reads {FORMAT_VERSION})")
    return manifest


def open_store(path: str | Path, *, fingerprint: dict, verify: bool = False) -> tuple[dict, Path]:
    """Manifest and data directory of store `path`, after checking the model and every listed file.

    The large arrays are checked by size; `verify=True` also hashes them (small files always are).
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_fingerprint(path / MANIFEST, manifest["fingerprint"], fingerprint)
    data = path / manifest["generation"]
    for name, record in manifest["files"].items():
        _check_file(data / name, record, hash_it=verify or name.endswith(_ALWAYS_HASHED))
    return manifest, data


def _check_fingerprint(file: Path, stored: dict, actual: dict) -> None:
    for field, value in stored["config"].items():
        if actual["config"].get(field) != value:
            raise StoreError(
                f"{file}: built by a different model: {field} is {value!r} in the store, "
                f"{actual['config'].get(field)!r} in the model"
            )
    if stored["kv_projections_sha256"] != actual["kv_projections_sha256"]:
        raise StoreError(
            f"{file}: built by a different model: the memory layers' key/value projection weights differ "
            "(re-index the corpus with this model)"
        )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_record(file: Path) -> dict:
    _fsync(file)
    return {"bytes": file.stat().st_size, "sha256": _sha256(file)}


def _write_tensor(file: Path, tensor: torch.Tensor) -> dict:
    array = tensor.detach().cpu().contiguous()
    if array.dtype == torch.bfloat16:
        array = array.view(torch.int16)  # numpy has no bfloat16: store the raw bits
    array.numpy().tofile(file)
    return _file_record(file)


def _check_file(file: Path, record: dict, *, hash_it: bool) -> None:
    if not file.exists():
        raise StoreError(f"{file}: missing (the store lists it in {MANIFEST})")
    size = file.stat().st_size
    if size != record["bytes"]:
        raise StoreError(f"{file}: {size} bytes, expected {record['bytes']} (truncated or overwritten)")
    if hash_it and _sha256(file) != record["sha256"]:
        raise StoreError(f"{file}: contents do not match the checksum in {MANIFEST} (corrupted)")


def map_array(file: Path, shape: tuple, dtype: torch.dtype, writable: bool) -> torch.Tensor:
    """A tensor over `file` without reading it: copy-on-write memory map, so writes never reach the file."""
    count = int(np.prod(shape))
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    array = np.memmap(file, dtype=torch.empty(0, dtype=storage_dtype).numpy().dtype, mode="c", shape=shape)
    tensor = torch.from_numpy(array)
    tensor = tensor.view(dtype) if dtype == torch.bfloat16 else tensor
    return tensor.clone() if writable else tensor


class DeferredIndex:
    """A Faiss index file opened now and read on first use.

    The open handle keeps the file readable even if a writer deletes its generation in between.
    """

    def __init__(self, file: Path):
        self.file = file
        self._handle = open(file, "rb")

    def read(self, *, mmap: bool = False) -> faiss.Index:
        """The index; with `mmap`, its large arrays are mapped read-only instead of read."""
        if self._handle.closed:
            raise StoreError(f"{self.file}: already read or closed")
        by_handle = Path(f"/proc/self/fd/{self._handle.fileno()}")
        try:
            return faiss.read_index(str(by_handle if by_handle.exists() else self.file),
                                    faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except RuntimeError as error:
            raise StoreError(f"{self.file}: cannot be read by Faiss ({str(error).strip().splitlines()[-1]})") from None
        finally:
            self.close()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "DeferredIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

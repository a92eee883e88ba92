"""Persisting a memory: a directory that any process reopens in milliseconds.

Layout of a store directory (documented for users in `indexes/README.md`):

    manifest.json              the commit point: format, model fingerprint, geometry, index, documents, files
    write.lock                 held (flock) by the process writing the store, which it names
    data-<generation>/         one complete generation of data files
        layer<L>.keys.bin      (H, M, D) raw little-endian, stored dtype (bfloat16/float16/float32, int8);
                               absent when only the index holds the keys (option keep_keys false)
        layer<L>.values.bin    (H, M, D), or (H, M, W) codes of the manifest's `codec` (int8: D + 2, pq<M>: M)
        layer<L>.values-codebook.bin  (H, M, 2**bits, D / M) float32: the PQ codebook, once trained
        layer<L>.values-error_bound.bin  (H,) float32: squared code errors beyond it keep values exactly
        layer<L>.exact-values.bin     (n, D) of the manifest's dtype: values kept exactly beside their codes
        layer<L>.exact-value-ids.bin  (n, 2) int64 (head, id) of each, in order (manifest "exact_values": n)
        layer<L>.head<h>.faiss one Faiss index per head (Faiss specs only)
        layer<L>.head<h>.outliers.faiss  keys of the IVF outliers, when keys are not kept
        valid.bin              (M,) uint8: 1 for entries that may receive attention
        provenance.bin         (M,) uint16 token ids (65535: none) or int32 ones, documents and positions
                               following from the documents' entry ranges (manifest "provenance":
                               "token_ids16" or "token_ids"); else (M, 3) int64: document id, token position, token id

`write_store` takes the write lock, writes a new generation directory, then atomically replaces
`manifest.json`, then deletes older generations. A process killed at any point leaves the previous
manifest (and its generation) or the new one: never a store that loads half-written. It deletes only
what a store writer creates (generation directories holding nothing but data files, its temporary
manifests), so a directory that is not a store is refused rather than cleaned. Readers take no lock:
they open every file of the generation they read before using any, and if a writer replaced it in
between, they read the new manifest; deleting an old generation does not disturb open files or maps.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np
import torch

from ..memory.faiss_index import mapped_lists
from .manifest import (FORMAT_VERSION, GENERATION, MANIFEST, SHARD, StoreError, check_manifest, checksum, is_sharded,
                       read_manifest)

LOCK = "write.lock"
_DATA_FILE = re.compile(r"layer\d+\.(keys|values)(-\w+)?\.bin|layer\d+\.exact-value(s|-ids)\.bin|"
                        r"layer\d+\.head\d+(\.outliers)?\.faiss|valid\.bin|provenance\.bin")
_TEMPORARY = re.compile(rf"{re.escape(MANIFEST)}\.(data|shards)-[0-9a-f]{{12}}\.tmp")
# Files up to this size are hashed on every open; larger ones by size and a sample of blocks (first,
# last and evenly spread: truncation, appended bytes and overwritten headers show), so that opening a
# 1M-entry store stays well under 100 ms. `verify=True` hashes every byte.
HASHED_BYTES = 1 << 20
_SAMPLES, _BLOCK = 64, 4096
# A writer may replace the generation between a reader's reading the manifest and opening its files.
_OPEN_ATTEMPTS = 8
_FINGERPRINT_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mem_layers",
    "mem_positionals", "rope_theta", "max_position_embeddings", "num_key_value_heads", "head_dim",
    "mem_position_scheme",
)


def model_fingerprint(model) -> dict:
    """What a store's entries depend on: config fields and a digest of the memory layers' k/v projections."""
    config = model.config
    digest = hashlib.sha256()
    for layer in config.mem_layers:
        attention = model.get_decoder().layers[layer].self_attn
        for projection in (attention.k_proj, attention.v_proj):
            digest.update(projection.weight.detach().float().cpu().numpy().tobytes())
    return {"config": {f: getattr(config, f) for f in _FINGERPRINT_FIELDS}, "kv_projections_sha256": digest.hexdigest()}


def check_target(path: str | Path, *, sharded: bool = False) -> None:
    """`StoreError` unless a store (sharded or not, as `sharded` says) can be written at `path`: a store of that
    kind, an empty or new directory."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        where = "" if existing == path else f" (cannot create {path} under it)"
        raise StoreError(f"{existing}: is a file, not a directory{where}")
    if existing != path:
        return
    if (path / MANIFEST).exists():
        found = is_sharded(read_manifest(path))  # a store of this format, or an error saying why it is not one
        if found != sharded:
            kinds = {True: "sharded store", False: "store without shards"}
            raise StoreError(f"{path}: holds a {kinds[found]}; a {kinds[sharded]} cannot replace it: write it to a "
                             "new or empty directory")
        return
    foreign = sorted(entry.name for entry in path.iterdir() if entry.name != LOCK and not _written_by_store(entry))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(f"{path}: not a knnmem store and not empty (holds {shown}); write the store to a new "
                         "or empty directory")


def write_store(path: str | Path, *, manifest: dict, arrays: dict[str, torch.Tensor], indexes: dict) -> None:
    """Write a new generation of `arrays` (raw) and Faiss `indexes` under `path`, then commit `manifest`.

    Raises `StoreError` if `path` is not a store or an empty directory, if another process is writing
    it, or if a file cannot be written (e.g. the disk is full: the new generation is removed again).
    """
    path = Path(path)
    check_target(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"{path}: cannot create the store directory ({_reason(error)})") from None
    with write_lock(path):
        check_target(path)  # again, now that no other writer can change it
        generation = f"data-{uuid.uuid4().hex[:12]}"
        data, tmp = path / generation, path / f"{MANIFEST}.{generation}.tmp"
        try:
            _make_dir(data)
            files = {name: _write_file(data / name, _raw_bytes(tensor)) for name, tensor in arrays.items()}
            files |= {name: _write_file(data / name, faiss.serialize_index(index)) for name, index in indexes.items()}
            _fsync_dir(data)
            commit_manifest(path, {**manifest, "generation": generation, "files": files}, tmp)
        except BaseException:
            _remove(data)
            raise
        remove_stale(path, keep={generation})


def commit_manifest(path: Path, manifest: dict, tmp: Path) -> dict:
    """Make `manifest` (with format, version and checksum added) the manifest of store `path`, atomically: written
    to `tmp` first, then renamed over the old one. The caller holds the write lock. Returns what was written."""
    from .. import __version__

    manifest = {"format_version": FORMAT_VERSION, "knnmem_version": __version__, **manifest}
    manifest["checksum"] = checksum(manifest)
    try:
        _write_file(tmp, json.dumps(manifest, indent=1).encode())
        _commit(tmp, path / MANIFEST)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path)
    return manifest


def remove_stale(path: Path, *, keep: set[str]) -> None:
    """Delete what store writers left in `path` (older generations or shards, temporary manifests) but `keep`."""
    for stale in path.iterdir():
        if stale.name not in keep and _written_by_store(stale):
            _remove(stale)


def open_store(path: str | Path, *, fingerprint: dict, verify: bool = False) -> tuple[dict, dict[str, BinaryIO]]:
    """The manifest of store `path` and an open handle on each data file, after checking the model and every file.

    Files up to `HASHED_BYTES` are hashed; larger ones are checked by size and sampled blocks
    (`verify=True` hashes them too). The caller closes the handles.
    """
    path = Path(path)
    for _ in range(_OPEN_ATTEMPTS):
        manifest = read_manifest(path)
        if is_sharded(manifest):
            raise StoreError(f"{path}: a sharded store; open it with knnmem.Memory.load, which opens its shards")
        check_fingerprint(path / MANIFEST, manifest["fingerprint"], fingerprint)
        try:
            return manifest, _open_generation(path, manifest, verify)
        except _Missing:
            if read_manifest(path)["generation"] == manifest["generation"]:
                raise  # really missing, not replaced by a writer
    raise StoreError(f"{path}: rewritten {_OPEN_ATTEMPTS} times while being opened; open it when writes pause")


class _Missing(StoreError):
    """A file the manifest lists does not exist (perhaps because a writer just replaced the generation)."""


def _open_generation(path: Path, manifest: dict, verify: bool) -> dict[str, BinaryIO]:
    data = path / manifest["generation"]
    try:
        directory = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise _Missing(f"{data}: missing (the store lists it in {MANIFEST})") from None
    except OSError as error:
        raise StoreError(f"{data}: not a directory of the store ({_reason(error)})") from None
    handles: dict[str, BinaryIO] = {}
    try:
        for name, record in manifest["files"].items():
            handles[name] = _open_file(data / name, directory)
            _check_file(data / name, handles[name], record, hash_all=verify)
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    finally:
        os.close(directory)
    return handles


def _open_file(file: Path, directory: int) -> BinaryIO:
    """`file` opened for reading inside the generation `directory`: a regular file, not a link, FIFO or device."""
    try:
        # Non-blocking, so that a FIFO in place of a data file cannot hang the open.
        fd = os.open(file.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except FileNotFoundError:
        raise _Missing(f"{file}: missing (the store lists it in {MANIFEST})") from None
    except OSError as error:
        raise StoreError(f"{file}: cannot be opened ({_reason(error)})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{file}: not a regular file (a store holds only the files it wrote)")
    return os.fdopen(fd, "rb")


def check_fingerprint(file: Path, stored: dict, actual: dict) -> None:
    """`StoreError` naming `file` unless the `stored` fingerprint is the model's (`actual`)."""
    for field, value in actual["config"].items():  # the model's fields: one missing from the store differs too
        if field not in stored["config"] or stored["config"][field] != value:
            found = repr(stored["config"][field]) if field in stored["config"] else "missing"
            raise StoreError(f"{file}: built by a different model: {field} is {found} in the store, {value!r} in the model")
    if stored["kv_projections_sha256"] != actual["kv_projections_sha256"]:
        raise StoreError(
            f"{file}: built by a different model: the memory layers' key/value projection weights differ "
            "(re-index the corpus with this model)"
        )


def _sample_digest(read, size: int) -> str:
    """SHA-256 of `_SAMPLES` blocks spread from the first to the last byte; `read(offset, count)` returns bytes."""
    digest = hashlib.sha256()
    for i in range(_SAMPLES):
        digest.update(read(i * (size - _BLOCK) // (_SAMPLES - 1), _BLOCK))
    return digest.hexdigest()


def _record(buffer: memoryview) -> dict:
    record = {"bytes": buffer.nbytes, "sha256": hashlib.sha256(buffer).hexdigest()}
    if buffer.nbytes > HASHED_BYTES:
        record["sample_sha256"] = _sample_digest(lambda offset, count: buffer[offset:offset + count], buffer.nbytes)
    return record


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    array = tensor.detach().cpu().contiguous()
    if array.dtype == torch.bfloat16:
        array = array.view(torch.int16)  # numpy has no bfloat16: store the raw bits
    return memoryview(array.numpy()).cast("B")


def _write_file(file: Path, data) -> dict:
    """Write `data` (bytes-like) to the new file `file`, durably; its size and digests."""
    buffer = memoryview(data).cast("B")
    try:
        with open(file, "xb") as handle:
            handle.write(buffer)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise StoreError(f"{file}: cannot be written ({_reason(error)})") from None
    return _record(buffer)


def _check_file(file: Path, handle: BinaryIO, record: dict, *, hash_all: bool) -> None:
    size = os.fstat(handle.fileno()).st_size
    if size != record["bytes"]:
        raise StoreError(f"{file}: {size} bytes, expected {record['bytes']} (truncated or overwritten)")
    fd = handle.fileno()
    if hash_all or size <= HASHED_BYTES:
        digest = hashlib.sha256()
        for offset in range(0, size, 1 << 20):
            digest.update(os.pread(fd, 1 << 20, offset))
        ok = digest.hexdigest() == record["sha256"]
    else:
        ok = _sample_digest(lambda offset, count: os.pread(fd, count, offset), size) == record.get("sample_sha256")
    if not ok:
        raise StoreError(f"{file}: contents do not match the checksum in {MANIFEST} (corrupted)")


@contextmanager
def write_lock(path: Path):
    """Hold the store's write lock, or `StoreError` naming the process that holds it."""
    # The lock file stays: removing it would let a second writer lock a new file while the first holds the old.
    try:
        handle = open(path / LOCK, "a+")
    except OSError as error:
        raise StoreError(f"{path / LOCK}: cannot be opened ({_reason(error)})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StoreError(f"{path}: the store is being written by process {holder}; save again when it has "
                             "finished") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield  # closing the handle releases the lock


def _written_by_store(entry: Path) -> bool:
    """Whether `entry` is something a store writer creates: a generation of data files, a shard of a sharded store
    (a store, possibly half-written), a temporary manifest."""
    if entry.is_symlink():
        return False
    if entry.is_dir() and SHARD.fullmatch(entry.name):
        return all(_written_by_store(f) or (f.name in (MANIFEST, LOCK) and f.is_file() and not f.is_symlink())
                   for f in entry.iterdir())
    if entry.is_dir():
        return bool(GENERATION.fullmatch(entry.name)) and all(
            f.is_file() and not f.is_symlink() and _DATA_FILE.fullmatch(f.name) for f in entry.iterdir())
    return bool(_TEMPORARY.fullmatch(entry.name)) and entry.is_file()


def _remove(entry: Path) -> None:
    """Remove a generation or temporary file this writer (or a killed one) created, if it is there."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    elif entry.is_file():
        entry.unlink(missing_ok=True)


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir()
    except OSError as error:
        raise StoreError(f"{directory}: cannot be created ({_reason(error)})") from None


def _commit(tmp: Path, manifest: Path) -> None:
    try:
        os.replace(tmp, manifest)
    except OSError as error:
        raise StoreError(f"{manifest}: cannot be replaced ({_reason(error)})") from None


def _reason(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device: the disk is full; free space and save again"
    return error.strerror or str(error)


def map_array(handle: BinaryIO, shape: tuple, dtype: torch.dtype, writable: bool) -> torch.Tensor:
    """A tensor over the open file `handle` without reading it: copy-on-write memory map, so writes never reach
    the file. The map stays valid after `handle` is closed."""
    count = int(np.prod(shape))
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    array = np.memmap(handle, dtype=torch.empty(0, dtype=storage_dtype).numpy().dtype, mode="c", shape=shape)
    tensor = torch.from_numpy(array)
    tensor = tensor.view(dtype) if dtype == torch.bfloat16 else tensor
    return tensor.clone() if writable else tensor


class DeferredIndex:
    """A Faiss index file, open now (`open_store`'s handle) and read on first use.

    The open handle keeps the file readable even if a writer deletes its generation in between.
    """

    def __init__(self, file: Path, handle: BinaryIO):
        self.file, self._handle = file, handle

    def read(self, *, mmap: bool = False) -> faiss.Index:
        """The index; with `mmap`, the inverted lists of an IVF index (other than fast-scan ones, which Faiss reads)
        or the codes of a flat index are mapped read-only instead of read, so opening a store reads none of them
        and a search touches only the lists it probes."""
        if self._handle.closed:
            raise StoreError(f"{self.file}: already read or closed")
        by_handle = Path(f"/proc/self/fd/{self._handle.fileno()}")
        flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE  # built, if its index wants one, by `FaissBackend` (l2_tables)
        if mmap:  # IVF lists ("Iw..." files) and flat codes are mapped under different flags; together they fail
            flags |= faiss.IO_FLAG_MMAP if os.pread(self._handle.fileno(), 2, 0) == b"Iw" else faiss.IO_FLAG_MMAP_IFC
        try:
            index = faiss.read_index(str(by_handle if by_handle.exists() else self.file), flags)
            lists = mapped_lists(index)
            if lists is not None:
                if lists.ptr is None:  # an "ilod" stub naming some other file: not what a store writes
                    raise ValueError("its IVF lists are not in the file")
                # Faiss would start 32 threads to prefetch the probed lists at every search: slower than the
                # search itself (1.1-1.5 ms against 0.04-0.17 ms for one query), and the pages come when read.
                lists.prefetch_nthread = 0
            return index
        # What Faiss raises on a file it cannot parse: its own errors, and allocations sized by a bad header.
        except (RuntimeError, MemoryError, IndexError, AssertionError, ValueError, OverflowError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            raise StoreError(f"{self.file}: cannot be read by Faiss ({reason})") from None
        finally:
            self.close()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "DeferredIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def migrate_store(path: str | Path) -> dict:
    """Rewrite the manifest of a store written in format 1 (before manifests were checksummed) in this
    format, after checking every data file against the SHA-256 the old manifest recorded. The data files
    are not touched; the new manifest is committed as any save is (atomically, under the write lock).

    Returns the new manifest. Raises `StoreError` if `path` is not a format-1 store, a file does not match
    its old checksum, or the result is not a store this version can read.
    """
    path = Path(path)
    file = path / MANIFEST
    try:
        old = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{file}: cannot be read as a manifest ({error})") from None
    if not isinstance(old, dict) or old.get("format_version") != 1:
        raise StoreError(f"{file}: not a format-1 store (format {old.get('format_version') if isinstance(old, dict) else None!r})")
    generation = old.get("generation")
    if not isinstance(generation, str) or not GENERATION.fullmatch(generation) or not isinstance(old.get("files"), dict):
        raise StoreError(f"{file}: no valid generation and file list to migrate")
    with write_lock(path):
        files = {}
        for name, record in old["files"].items():
            if not _DATA_FILE.fullmatch(str(name)) or not isinstance(record, dict):
                raise StoreError(f"{file}: lists {name!r}, not a file a store writes")
            data = path / generation / name
            try:
                buffer = memoryview(data.read_bytes())
            except OSError as error:
                raise StoreError(f"{data}: cannot be read ({_reason(error)})") from None
            files[name] = _record(buffer)
            if files[name]["sha256"] != record.get("sha256"):
                raise StoreError(f"{data}: contents do not match the checksum in {MANIFEST} (corrupted)")
        from .. import __version__

        manifest = {**old, "format_version": FORMAT_VERSION, "knnmem_version": __version__, "files": files}
        config = manifest.get("fingerprint", {}).get("config")
        if isinstance(config, dict) and {"num_attention_heads", "hidden_size"} <= config.keys():
            # fields fingerprinted since format 1, as every model of that time had them
            config.setdefault("num_key_value_heads", config["num_attention_heads"])
            config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
            config.setdefault("mem_position_scheme", "longllama")
        manifest.setdefault("ivf_outliers", {layer: [{"radius": None, "ids": []} for _ in range(old.get("num_heads", 0))]
                                             for layer in old.get("l2_bounds", {})})
        manifest.pop("checksum", None)
        manifest["checksum"] = checksum(manifest)
        check_manifest(manifest, file)  # before the commit: a store this version cannot read stays as it was
        return commit_manifest(path, manifest, path / f"{MANIFEST}.{generation}.tmp")

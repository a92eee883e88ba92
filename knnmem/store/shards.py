"""Sharded stores: one memory split over several ordinary stores, each holding a range of documents.

Layout (documented for users in `indexes/README.md`):

    manifest.json                  kind "sharded": the model, the geometry, and the shards in order, each with
                                   its entry count and the checksum of its own manifest
    write.lock                     held by the process writing the sharded store
    shard-<i>-<generation>/        shard i: an ordinary store (see `format.py`)

Shard i's entries follow shard i-1's, so a memory over every shard numbers its entries as one memory
over all the documents would. `sharded_writer` writes a new generation of shards (in this process or
in parallel by other processes: each shard is an ordinary store with its own lock), then commits the
top-level manifest and only then deletes the older shards: a writer killed at any point leaves the
previous sharded store or the new one. Opening checks each shard's manifest against the checksum the
top-level manifest recorded, so a shard rewritten, replaced or missing is refused by name.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import format as fmt
from .manifest import MANIFEST, SHARDED, StoreError, is_sharded, read_manifest

# Fields every shard's manifest must share with the others (and the top-level manifest records).
_SHARED = ("fingerprint", "layers", "num_heads", "head_dim", "dtype", "codec", "index", "k", "options")


@contextmanager
def sharded_writer(path: str | Path, count: int) -> Iterator[list[Path]]:
    """The directories of `count` new shards of the sharded store `path`: write an ordinary store into each
    (e.g. `Memory.save`), and on leaving the block the sharded store listing them is committed.

    Holds the store's write lock throughout. If the block raises, nothing is committed and the new shards are
    removed. Raises `StoreError` if `path` is not a sharded store or an empty or new directory, or if a shard
    was not written.
    """
    if count < 1:
        raise ValueError(f"a sharded store needs at least one shard, got {count}")
    path = Path(path)
    fmt.check_target(path, sharded=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"{path}: cannot create the store directory ({error.strerror or error})") from None
    with fmt.write_lock(path):
        fmt.check_target(path, sharded=True)  # again, now that no other writer can change it
        generation = uuid.uuid4().hex[:12]
        shards = [path / f"shard-{i:05d}-{generation}" for i in range(count)]
        try:
            yield shards
            _commit(path, shards, path / f"{MANIFEST}.shards-{generation}.tmp")
        except BaseException:  # remove the new shards only: the older ones are still the store
            fmt.remove_stale(path, keep={entry.name for entry in path.iterdir()} - {shard.name for shard in shards})
            raise
        fmt.remove_stale(path, keep={shard.name for shard in shards})


def _commit(path: Path, shards: list[Path], tmp: Path) -> dict:
    manifests = []
    for number, shard in enumerate(shards):
        try:
            manifests.append(read_manifest(shard))
        except StoreError as error:
            raise StoreError(f"{path}: shard {number} was not written ({error})") from None
        if is_sharded(manifests[-1]):
            raise StoreError(f"{shard}: a shard must be a store without shards")
    _check_alike(path, manifests, [shard.name for shard in shards])
    first = manifests[0]
    manifest = {
        "kind": SHARDED, **{field: first[field] for field in _SHARED if field != "options"},
        "entries": sum(m["entries"] for m in manifests),
        "shards": [{"name": shard.name, "entries": m["entries"], "documents": len(m["documents"]),
                    "manifest_checksum": m["checksum"]} for shard, m in zip(shards, manifests)],
    }
    return fmt.commit_manifest(path, manifest, tmp)


def _check_alike(path: Path, manifests: list[dict], names: list[str]) -> None:
    """`StoreError` unless every shard's manifest agrees with the first on the model, geometry and index."""
    for field in _SHARED:
        for name, manifest in zip(names[1:], manifests[1:]):
            if manifest.get(field, manifests[0].get(field)) != manifests[0].get(field):
                raise StoreError(f"{path / name}: its {field} differs from that of {names[0]} "
                                 f"({manifest.get(field)!r:.80} against {manifests[0].get(field)!r:.80})")


def open_shards(path: str | Path, *, fingerprint: dict) -> tuple[dict, list[dict], list[Path]]:
    """The top-level manifest of the sharded store `path`, each shard's manifest and directory, checked: the model,
    every shard present and exactly the one the top-level manifest lists. The shards' data files are checked when
    each is opened (`open_store`)."""
    path = Path(path)
    manifest = read_manifest(path)
    if not is_sharded(manifest):
        raise StoreError(f"{path}: not a sharded store")
    fmt.check_fingerprint(path / MANIFEST, manifest["fingerprint"], fingerprint)
    listed = manifest["shards"]
    shards, manifests = [path / shard["name"] for shard in listed], []
    for number, (shard, record) in enumerate(zip(shards, listed)):
        try:
            manifests.append(read_manifest(shard))
        except StoreError as error:
            raise shard_error(shard, number, len(listed), error) from None
        found = manifests[-1]
        if found["checksum"] != record["manifest_checksum"] or found["entries"] != record["entries"]:
            raise StoreError(f"{shard}: shard {number} of {len(listed)} is not the one {path / MANIFEST} lists "
                             "(rewritten or replaced since the sharded store was written); write the sharded store again")
    _check_alike(path, manifests, [shard.name for shard in shards])
    return manifest, manifests, shards


def shard_error(shard: Path, number: int, count: int, error: Exception) -> StoreError:
    """A `StoreError` for a shard that cannot be opened: which shard, then why."""
    return StoreError(f"{shard}: shard {number} of {count} cannot be opened: {error}")

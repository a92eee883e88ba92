"""The manifest of a store: reading it, and checking every field before anything trusts it.

A manifest is JSON that anyone can edit or craft, so nothing in it is used unchecked: each field must
be present and of its type, its own checksum must match (an edit or a flipped bit is refused, not
read as another `k` or `nprobe`), and the data files it lists must be exactly those its geometry
implies, at exactly the sizes it implies. Paths never come from it unchecked: the generation and the
file names must have the forms the writer gives them, so none can point outside the store.

A sharded store's manifest (`"kind": "sharded"`) lists its shards instead of data files: each an
ordinary store in a subdirectory, recorded with its entry count and the checksum of its own manifest
(which covers every data file's digest), so a shard rewritten or replaced later is noticed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

# Stores are written in format 3, which may hold what a knnmem reading only format 2 would misread (codecs, stores
# without keys, exactly kept entries, narrower token ids): it refuses them by their version. Format-2 stores are
# read as they are.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
GENERATION = re.compile(r"data-[0-9a-f]{12}")
NO_TOKEN16 = 0xFFFF  # the token id of entries written by no document, in uint16 provenance
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXACT_SPECS = ("dense", "torch")  # backends without index files (see knnmem.memory.backends)
SHARDED = "sharded"
SHARD = re.compile(r"shard-\d{5}-[0-9a-f]{12}")  # shard-<number>-<generation of the sharded write>


class StoreError(ValueError):
    """A store cannot be read or does not fit the model; the message names the file and the mismatch."""


def checksum(manifest: dict) -> str:
    """SHA-256 of every field but `checksum` itself, in a canonical JSON form."""
    body = {name: value for name, value in manifest.items() if name != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str | Path) -> dict:
    """The manifest of store `path`, checked (see `check_manifest`); `StoreError` naming what is wrong."""
    file = Path(path) / MANIFEST
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise StoreError(f"{file}: missing; {path} is not a knnmem store (or its first save never completed)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StoreError(f"{file}: cannot be read ({error})") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise StoreError(f"{file}: not valid JSON ({error})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise StoreError(f"{file}: format version {version!r} is not supported (this knnmem reads "
                         f"{' and '.join(map(str, READABLE_VERSIONS))}; migrate a format-1 store with "
                         "`knnmem migrate STORE`, or re-index the corpus)")
    if manifest.get("checksum") != checksum(manifest):
        raise StoreError(f"{file}: contents do not match its checksum (corrupted or edited)")
    (check_sharded_manifest if is_sharded(manifest) else check_manifest)(manifest, file)
    return manifest


def is_sharded(manifest: dict) -> bool:
    """Whether `manifest` is a sharded store's (listing shards) rather than a store's (listing data files)."""
    return manifest.get("kind") == SHARDED


_CODEC_ARRAY = re.compile(r"layer\d+\.(keys|values)-\w+\.bin")


def _field_checker(manifest: dict, file: Path):
    """`need(name, kind, ok, what, within)`: the field `name` of `within` (default: `manifest`), or `StoreError`
    naming `file` unless it is present, of `kind` and `ok`."""

    def need(name, kind, ok=lambda value: True, what=None, within=manifest):
        value = within.get(name) if isinstance(within, dict) else None
        if name not in within or not _is(value, kind) or not ok(value):
            found = "missing" if name not in within else f"{value!r}"[:80]
            raise StoreError(f"{file}: field {name!r} must be {what or kind.__name__}, found {found}")
        return value

    return need


def _check_common(need) -> tuple[list, int, str, int]:
    """The fields every manifest has: the model and the geometry of the memory. Returns (layers, heads, spec, entries)."""
    need("knnmem_version", str)
    fingerprint = need("fingerprint", dict)
    need("config", dict, bool, "a non-empty object", within=fingerprint)
    need("kv_projections_sha256", str, _SHA256.fullmatch, "a SHA-256 digest", within=fingerprint)
    layers = need("layers", list, lambda v: all(_is(x, int) and x >= 0 for x in v) and len(set(v)) == len(v),
                  "a list of distinct layer numbers")
    heads = need("num_heads", int, lambda v: v > 0, "a positive integer")
    need("head_dim", int, lambda v: v > 0, "a positive integer")
    need("dtype", str, _ITEMSIZE.__contains__, f"one of {sorted(_ITEMSIZE)}")
    spec = need("index", str, str.strip, "an index spec")
    need("k", int, lambda v: v > 0, "a positive integer")
    entries = need("entries", int, lambda v: v >= 0, "a count")
    return layers, heads, spec, entries


def check_sharded_manifest(manifest: dict, file: Path) -> None:
    """`StoreError` unless `manifest` is a sharded store's: the common fields, and shards whose entries add up."""
    need = _field_checker(manifest, file)
    entries = _check_common(need)[3]
    need("codec", str, str.strip, "a codec spec such as int8 or int8/pq8")
    shards = need("shards", list, bool, "a non-empty list of shards")
    for number, shard in enumerate(shards):
        what = f"shard {number}"
        if not isinstance(shard, dict):
            raise StoreError(f"{file}: {what} must be an object {{name, entries, documents, manifest_checksum}}")
        need("name", str, SHARD.fullmatch, "a name shard-<5 digits>-<12 hex digits> (a directory of the store)",
             within=shard)
        need("entries", int, lambda v: v >= 0, "a count", within=shard)
        need("documents", int, lambda v: v >= 0, "a count", within=shard)
        need("manifest_checksum", str, _SHA256.fullmatch, "a SHA-256 digest", within=shard)
    if len({shard["name"] for shard in shards}) != len(shards):
        raise StoreError(f"{file}: lists a shard directory twice")
    if sum(shard["entries"] for shard in shards) != entries:
        raise StoreError(f"{file}: its shards hold {sum(s['entries'] for s in shards)} entries, its field 'entries' "
                         f"says {entries}")


def check_manifest(manifest: dict, file: Path) -> None:
    """`StoreError` unless every field of `manifest` is present, of its type and consistent with the others."""
    need = _field_checker(manifest, file)
    layers, heads, spec, entries = _check_common(need)
    faiss = spec not in _EXACT_SPECS
    options = need("options", dict, lambda v: not faiss or {"train_size", "l2_reduction"} <= v.keys(),
                   "an object (holding train_size and l2_reduction for a Faiss index)")
    if faiss:
        need("l2_reduction", bool, within=options)
    in_range = lambda ids: all(_is(i, int) and 0 <= i < entries for i in ids)  # noqa: E731
    per_layer = {str(layer) for layer in layers} if faiss and entries else set()
    bounds = need("l2_bounds", dict, lambda v: v.keys() == per_layer, f"an object with layers {sorted(per_layer)}")
    outliers = need("ivf_outliers", dict, lambda v: v.keys() == per_layer, f"an object with layers {sorted(per_layer)}")
    for layer in per_layer:
        need(layer, list, lambda v: len(v) == heads and all(b is None or _is(b, float) for b in v),
             f"a list of {heads} numbers or nulls", within=bounds)
        need(layer, list, lambda v: len(v) == heads and all(
            isinstance(h, dict) and all(h.get(bound) is None or _is(h[bound], float) for bound in ("radius", "error_bound"))
            and isinstance(h.get("ids"), list) and in_range(h["ids"])
            and (isinstance(h.get("errors", []), list) and len(h.get("errors", h["ids"])) == len(h["ids"])
                 and all(e is None or _is(e, float) and e >= 0 and h.get("error_bound") is not None
                         for e in h.get("errors", [])))
            for h in v),
            f"a list of {heads} objects {{radius, error_bound, ids, errors}} with ids below {entries} and an error "
            "for each (null, or a number under an error bound)", within=outliers)
    need("documents", list, lambda v: all(
        isinstance(d, dict) and d.keys() == {"id", "name", "start", "end"} and _is(d["id"], int)
        and isinstance(d["name"], str) and _is(d["start"], int) and _is(d["end"], int)
        and 0 <= d["start"] <= d["end"] <= entries for d in v),
        f"a list of documents {{id, name, start, end}} within the {entries} entries")
    if "provenance" in manifest:  # absent where provenance.bin holds (document, position, token id) as int64
        need("provenance", str, lambda v: v in ("token_ids", "token_ids16"),
             "'token_ids' or 'token_ids16' (int32 or uint16 token ids, one per entry)")
    if "codec" in manifest:  # absent in stores written before codecs: the cast codec of `dtype`
        need("codec", str, str.strip, "a codec spec such as int8 or int8/pq8")
    if "codec_arrays" in manifest:
        need("codec_arrays", dict, lambda v: all(
            _CODEC_ARRAY.fullmatch(name) and isinstance(shape, list) and all(_is(n, int) and n > 0 for n in shape)
            for name, shape in v.items()), "an object of codec parameter files and their shapes")
    if "exact_values" in manifest:  # absent in stores written before values were kept exactly beside their codes
        need("exact_values", dict, lambda v: v.keys() <= {str(layer) for layer in layers} and all(
            _is(n, int) and 0 < n <= entries * heads for n in v.values()),
            f"an object of layers and how many of their {entries} x {heads} values are kept exactly")
    need("generation", str, GENERATION.fullmatch, "a name data-<12 hex digits> (a directory of the store)")
    files = need("files", dict)
    expected, optional = data_files(manifest)
    if not expected.keys() <= files.keys() <= expected.keys() | optional:
        missing, extra = sorted(expected.keys() - files.keys()), sorted(files.keys() - expected.keys() - optional)
        raise StoreError(f"{file}: lists the wrong data files (missing {missing}, unexpected {extra}) "
                         f"for {len(layers)} layers x {heads} heads of a {spec!r} memory")
    for name, record in files.items():
        need(name, dict, _is_record, "an object {bytes, sha256} (and sample_sha256 for large files)", within=files)
        if expected.get(name) is not None and record["bytes"] != expected[name]:
            raise StoreError(f"{file}: lists {name} with {record['bytes']} bytes, but {entries} entries of this "
                             f"geometry ({heads} heads x {manifest['head_dim']} dims of {manifest.get('codec', manifest['dtype'])}) "
                             f"take {expected[name]}")


def data_files(manifest: dict) -> tuple[dict[str, int | None], set[str]]:
    """Every data file a store of this geometry has, with its size in bytes (None: checked on load, for Faiss
    indexes and codes whose width depends on a trained codec), and the files it may also have."""
    entries, heads, dim = manifest["entries"], manifest["num_heads"], manifest["head_dim"]
    codec = manifest.get("codec", manifest["dtype"])  # a cast codec stores its dtype's bytes
    array = entries * heads * dim * _ITEMSIZE[codec] if codec in _ITEMSIZE else None
    keep_keys = manifest["options"].get("keep_keys", True) is not False
    provenance = {"token_ids": 4, "token_ids16": 2}.get(manifest.get("provenance"), 3 * 8) * entries
    files: dict[str, int | None] = {"valid.bin": entries, "provenance.bin": provenance}
    files |= {name: 4 * math.prod(shape) for name, shape in manifest.get("codec_arrays", {}).items()}  # float32
    for layer, count in manifest.get("exact_values", {}).items():  # (head, id) as int64, vectors of the dtype
        files |= {f"layer{layer}.exact-value-ids.bin": 16 * count,
                  f"layer{layer}.exact-values.bin": count * dim * _ITEMSIZE[manifest["dtype"]]}
    optional = set()
    for layer in manifest["layers"]:
        files |= {f"layer{layer}.values.bin": array} | ({f"layer{layer}.keys.bin": array} if keep_keys else {})
        if manifest["index"] not in _EXACT_SPECS and entries:
            files |= {f"layer{layer}.head{h}.faiss": None for h in range(heads)}
            # without stored keys, the keys of IVF outliers are kept in a flat index beside each head's
            optional |= {f"layer{layer}.head{h}.outliers.faiss" for h in range(heads)}
    return files, optional


def _is_record(record: dict) -> bool:
    digests = [record.get("sha256")] + ([record["sample_sha256"]] if "sample_sha256" in record else [])
    return _is(record.get("bytes"), int) and record["bytes"] >= 0 and all(
        isinstance(d, str) and _SHA256.fullmatch(d) for d in digests)


def _is(value, kind) -> bool:
    """isinstance, except that a bool is not an int and an int is also a float (JSON does not tell them apart)."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return isinstance(value, kind)

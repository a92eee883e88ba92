"""Stores of compressed memories: every codec survives save and load; damaged codec state is refused."""

import hashlib
import json

import numpy as np
import pytest
import torch

import knnmem
from knnmem.store.manifest import checksum
from conftest import sharp_model, tiny_config
from knnmem.cli import main

# (index, options): dense reads every decoded entry; the IVF index is trained on them
MEMORIES = [
    ("dense", dict(codec="bfloat16")),
    ("dense", dict(codec="int8")),
    ("dense", dict(codec="int8/pq2x4")),
    ("IVF4,Flat", dict(k=16, train_size=40, nprobe=2, codec="int8/pq2x4")),
    ("IVF4,PQ4x4fs", dict(k=16, train_size=40, nprobe=2, codec="float16/pq4x4", keep_keys=False)),
    ("IVF4,Flat", dict(k=16, train_size=40, nprobe=2, codec="int8", keep_keys=False, rerank=1)),
    ("IVF4,Flat", dict(k=8, train_size=40, nprobe=2, codec="int8", rerank=3)),
]


@pytest.fixture(scope="module")
def model():
    return sharp_model(tiny_config())


def documents():
    torch.manual_seed(0)
    return [torch.randint(1, 96, (length,)).tolist() for length in (300, 250, 280)]  # 830 tokens: PQ trains at 624


def filled(model, index, **options):
    memory = knnmem.Memory.create(model, index=index, **options)
    knnmem.encode_documents(model, documents(), memory, progress=False)
    return memory


def read(model, memory, ids):
    with torch.no_grad():
        return model(ids, memory=memory, use_cache=True, last_context_length=ids.shape[1]).logits


def manifest_of(store):
    return json.loads((store / "manifest.json").read_text())


def sha256(file):
    return hashlib.sha256(file.read_bytes()).hexdigest()


def rewrite_manifest(store, **fields):
    """A crafted manifest: the fields changed, its own checksum made to match."""
    manifest = {**manifest_of(store), **fields}
    manifest["checksum"] = checksum(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("index, options", MEMORIES)
def test_each_codec_gives_identical_answers_after_save_and_load(model, tmp_path, index, options):
    memory = filled(model, index, **options)
    assert memory.entries(1).value_codec.trained
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, memory, query)
    memory.save(tmp_path / "store")
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    assert loaded.codec == memory.codec and loaded.options() == memory.options()
    for kept, reloaded in zip(memory.entries(1).exact_values(), loaded.entries(1).exact_values()):
        assert torch.equal(kept, reloaded)  # values kept exactly beside PQ codes (none for the others)
    assert torch.equal(read(model, loaded, query), expected)
    memory.save(tmp_path / "store")  # a new generation replaces the one holding every kind of file
    assert len(list((tmp_path / "store").glob("data-*"))) == 1
    dense = filled(model, "dense")
    error = (expected - read(model, dense, query)).norm() / read(model, dense, query).norm()
    assert error < 0.5  # compressed, yet the same memory (the sharp random model magnifies every error)


def test_compression_shrinks_the_store_and_info_reports_it(model, tmp_path, capsys):
    sizes = {}
    for codec in ("float32", "int8", "int8/pq2x4"):
        filled(model, "dense", codec=codec).save(tmp_path / codec.replace("/", "_"))
        assert main(["info", str(tmp_path / codec.replace("/", "_"))]) == 0
        out = capsys.readouterr().out
        assert f"codec: {codec}" in out
        assert " per token)" in out
        assert ("kept exactly: layer 1: " in out) == codec.endswith("pq2x4")
        sizes[codec] = int(out.split("bytes on disk:")[1].split()[0].replace(",", ""))
    # Per token, layer and head, keys and values of 8 dimensions take 32 bytes each as float32, 10 as int8 and
    # 2 as pq2x4 codes; the codebooks take 16 centroids of 8 float32 numbers per layer and head, the error bounds one
    # float32 number; the values kept exactly 8 float32 numbers and their (head, id).
    tokens = sum(map(len, documents()))
    assert sizes["float32"] - sizes["int8"] == tokens * 2 * 4 * 2 * (32 - 10)
    exact = sum(manifest_of(tmp_path / "int8_pq2x4")["exact_values"].values())
    assert 0 < exact < 0.01 * tokens * 2 * 4
    assert sizes["int8"] - sizes["int8/pq2x4"] == (tokens * 2 * 4 * (10 - 2) - 2 * 4 * (16 * 8 + 1) * 4
                                                   - exact * (32 + 16))


def test_stores_without_a_codec_open_as_the_cast_of_their_dtype(model, tmp_path):
    memory = filled(model, "Flat", k=16)
    memory.save(tmp_path / "store")
    manifest = manifest_of(tmp_path / "store")
    del manifest["codec"], manifest["codec_arrays"]
    manifest["checksum"] = checksum(manifest)  # as a store written before codecs existed
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    query = torch.randint(1, 96, (1, 12))
    assert loaded.codec == "float32" and torch.equal(read(model, loaded, query), read(model, memory, query))


@pytest.fixture
def pq_store(model, tmp_path):
    filled(model, "dense", codec="int8/pq2x4").save(tmp_path / "store")
    return tmp_path / "store"


def test_unknown_or_corrupt_codec_is_refused_naming_the_manifest(model, pq_store):
    rewrite_manifest(pq_store, codec="int8/zstd")
    with pytest.raises(knnmem.StoreError, match=r"manifest.json: unknown codec 'zstd'"):
        knnmem.Memory.load(pq_store, model=model)
    rewrite_manifest(pq_store, codec=7)
    with pytest.raises(knnmem.StoreError, match=r"manifest.json: field 'codec' must be a codec spec"):
        knnmem.Memory.load(pq_store, model=model)


def test_codebook_that_does_not_fit_its_codec_or_codes_is_refused_naming_the_file(model, pq_store):
    name = "layer1.values-codebook.bin"
    shapes = manifest_of(pq_store)["codec_arrays"]
    rewrite_manifest(pq_store, codec_arrays={**shapes, name: [4, 4, 16, 2]})  # the numbers of another codec
    with pytest.raises(knnmem.StoreError, match=rf"{name}, \S+error_bound.bin: the pq2x4 codebook is \(4, 4, 16, 2\) torch.float32"):
        knnmem.Memory.load(pq_store, model=model)
    rewrite_manifest(pq_store, codec_arrays={**shapes, name: [4, 2, 16, 5]})
    with pytest.raises(knnmem.StoreError, match=rf"manifest.json: lists {name} with 2048 bytes"):
        knnmem.Memory.load(pq_store, model=model)
    # A codebook of 4 sub-vectors (same numbers) over codes of 2: the codes file has the wrong width.
    rewrite_manifest(pq_store, codec="int8/pq4x4",
                     codec_arrays={**shapes, **{n: [4, 4, 16, 2] for n in shapes if n.endswith("codebook.bin")}})
    with pytest.raises(knnmem.StoreError, match=r"layer1.values.bin: 6,640 bytes, but codec pq4x4 \(trained\)"):
        knnmem.Memory.load(pq_store, model=model)
    manifest = manifest_of(pq_store)
    bad = pq_store / manifest["generation"] / "layer2.values-codebook.bin"
    bad.write_bytes(bytes(len(bad.read_bytes())))
    with pytest.raises(knnmem.StoreError, match="layer2.values-codebook.bin: contents do not match the checksum"):
        knnmem.Memory.load(pq_store, model=model)  # small files are always hashed


def test_values_kept_exactly_are_checked_on_open_and_stores_written_before_them_read_codes(model, pq_store):
    manifest = manifest_of(pq_store)
    data, count = pq_store / manifest["generation"], manifest["exact_values"]["1"]
    ids_file = data / "layer1.exact-value-ids.bin"
    original = ids_file.read_bytes()
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, knnmem.Memory.load(pq_store, model=model), query)

    def craft(where, counts=manifest["exact_values"]):  # (head, id) pairs rewritten, the manifest made to match them
        ids_file.write_bytes(where.numpy().tobytes())
        files = {**manifest["files"], ids_file.name: {"bytes": ids_file.stat().st_size, "sha256": sha256(ids_file)}}
        rewrite_manifest(pq_store, files=files, exact_values=counts)

    where = torch.frombuffer(bytearray(original), dtype=torch.int64).view(count, 2)
    for bad, problem in ((torch.tensor([4, 0]), "outside the 4 heads and 830 entries"),
                         (torch.tensor([0, 830]), "outside the 4 heads and 830 entries"),
                         (where[0], "out of order or repeated")):
        craft(torch.cat([where[:-1], bad[None]]) if count > 1 else bad[None])
        with pytest.raises(knnmem.StoreError, match=rf"layer1.exact-value-ids.bin: holds \(head, id\) pairs {problem}"):
            knnmem.Memory.load(pq_store, model=model)
    craft(where, {**manifest["exact_values"], "1": count + 1})
    with pytest.raises(knnmem.StoreError, match=r"manifest.json: lists layer1.exact-values?(-ids)?.bin with"):
        knnmem.Memory.load(pq_store, model=model)
    craft(where)
    assert torch.equal(read(model, knnmem.Memory.load(pq_store, model=model), query), expected)

    vectors_file = data / "layer1.exact-values.bin"
    kept = vectors_file.read_bytes()
    vectors_file.write_bytes(torch.full((count, 8), float("nan")).numpy().tobytes())
    files = {**manifest["files"], vectors_file.name: {"bytes": len(kept), "sha256": sha256(vectors_file)}}
    rewrite_manifest(pq_store, files=files)
    with pytest.raises(knnmem.StoreError, match=r"layer1.exact-values.bin: holds non-finite numbers"):
        knnmem.Memory.load(pq_store, model=model)
    vectors_file.write_bytes(kept)
    no_bound = {n: v for n, v in manifest["codec_arrays"].items() if n != "layer1.values-error_bound.bin"}
    rewrite_manifest(pq_store, files={n: v for n, v in manifest["files"].items() if n != "layer1.values-error_bound.bin"},
                     codec_arrays=no_bound)
    with pytest.raises(knnmem.StoreError, match=r"layer1.exact-values.bin: values kept exactly .* no error bound"):
        knnmem.Memory.load(pq_store, model=model)
    rewrite_manifest(pq_store, files=manifest["files"], codec_arrays=manifest["codec_arrays"])

    # As written before values were kept exactly: a codebook alone, no error bound, no exact values.
    old = {key: value for key, value in manifest.items() if key != "exact_values"}
    old["codec_arrays"] = {n: v for n, v in manifest["codec_arrays"].items() if "error_bound" not in n}
    old["files"] = {n: v for n, v in manifest["files"].items() if "exact-value" not in n and "error_bound" not in n}
    old["checksum"] = checksum(old)
    (pq_store / "manifest.json").write_text(json.dumps(old))
    loaded = knnmem.Memory.load(pq_store, model=model)
    assert not len(loaded.entries(1).exact_values()[0]) and loaded.entries(1).value_codec.error_bound is None
    answer = read(model, loaded, query)
    assert not torch.equal(answer, expected) and (answer - expected).norm() < 0.5 * expected.norm()


def test_values_kept_exactly_give_way_alike_after_a_store_is_reopened_for_writing(model, tmp_path):
    torch.manual_seed(1)
    more = [(torch.randint(1, 96, (900,)) * 0 + torch.arange(900) % 95 + 1).tolist()]  # unlike the first documents
    whole = filled(model, "dense", codec="int8/pq2x4")
    knnmem.encode_documents(model, more, whole, progress=False)
    part = filled(model, "dense", codec="int8/pq2x4")
    part.save(tmp_path / "store")
    reopened = knnmem.Memory.load(tmp_path / "store", model=model, writable=True)
    knnmem.encode_documents(model, more, reopened, progress=False)  # kept values' errors measured again from codes
    for layer in whole.layers:
        kept, again = whole.entries(layer).exact_values(), reopened.entries(layer).exact_values()
        assert len(kept[0]) and all(map(torch.equal, kept, again))
        assert torch.equal(whole.entries(layer).value_codec.error_bound, reopened.entries(layer).value_codec.error_bound)


def test_without_keys_the_store_is_smaller_and_refuses_exact_search_and_reindexing(model, tmp_path):
    options = dict(k=16, train_size=40, nprobe=2, codec="int8/pq2x4")
    kept, dropped = filled(model, "IVF4,PQ4x4fs", **options), filled(model, "IVF4,PQ4x4fs", keep_keys=False, **options)
    assert kept.entries(1).has_keys and not dropped.entries(1).has_keys
    assert kept.nbytes - dropped.nbytes == 2 * 4 * 10 * len(kept)  # int8 keys: 10 bytes per head and layer
    dropped.save(tmp_path / "store")
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    assert "layer1.keys.bin" not in manifest_of(tmp_path / "store")["files"]
    for attempt in (lambda: loaded.reindex("Flat"), lambda: dropped.reindex("IVF4,Flat", train_size=40)):
        with pytest.raises(ValueError, match=r"does not keep its keys \(keep_keys=False\).*cannot be searched exactly"):
            attempt()
    with pytest.raises(ValueError, match="index 'torch' searches the stored keys exactly: it needs keep_keys=True"):
        knnmem.Memory.create(model, index="torch", keep_keys=False)
    with pytest.raises(ValueError, match="rerank=2 scores candidates from stored keys: it needs keep_keys=True"):
        knnmem.Memory.create(model, index="IVF4,Flat", keep_keys=False, rerank=2)


def test_outlier_keys_that_do_not_fit_their_list_or_index_are_refused_naming_the_file(model, tmp_path):
    import faiss

    from knnmem.memory.faiss_index import reduced_widths
    from knnmem.store.format import _record

    store = tmp_path / "store"
    filled(model, "IVF4,PQ4x4", k=16, train_size=40, nprobe=2, keep_keys=False).save(store)
    manifest = manifest_of(store)
    name = next(n for n in manifest["files"] if n.endswith(".outliers.faiss"))
    file = store / manifest["generation"] / name
    keys = faiss.read_index(str(file))
    vectors = faiss.rev_swig_ptr(keys.get_xb(), keys.ntotal * keys.d).reshape(keys.ntotal, keys.d).copy()
    query = torch.randint(1, 96, (1, 8))

    def refused(path, index, match):
        """`path` replaced by `index` and signed in the manifest is refused; then put back."""
        before = path.read_bytes()
        faiss.write_index(index, str(path))
        rewrite_manifest(store, files={**manifest["files"], path.name: _record(memoryview(path.read_bytes()))})
        with pytest.raises(knnmem.StoreError, match=match):
            read(model, knnmem.Memory.load(store, model=model), query)  # indexes are read on first search
        path.write_bytes(before)

    def flat(kind, rows, dim):
        index = kind(dim)
        index.add(rows)
        return index

    refused(file, flat(faiss.IndexFlatIP, vectors[:-1], keys.d),  # a key short
            rf"{name}: holds {keys.ntotal - 1} keys of {keys.d} dimensions for the {keys.ntotal} outliers")
    refused(file, flat(faiss.IndexFlatIP, np.zeros((keys.ntotal, keys.d + 4), np.float32), keys.d + 4),
            rf"{name}: holds {keys.ntotal} keys of {keys.d + 4} dimensions")
    refused(file, flat(faiss.IndexFlatL2, vectors, keys.d), rf"{name}: a IndexFlatL2, not the flat inner-product")
    # Another width new indexes of the spec may have, but not the layout of the layer's other heads.
    other = next(d for d in reduced_widths("IVF4,PQ4x4", tiny_config().head_dim) if d != keys.d)
    index = faiss.index_factory(other, "IVF4,PQ4x4")
    index.train(np.random.default_rng(0).standard_normal((256, other)).astype(np.float32))
    layer = name.split(".")[0]
    refused(file.with_name(f"{layer}.head1.faiss"), index, rf"{layer}.head1.faiss: indexes vectors of {other} "
                                                           rf"dimensions, head 0 of its layer {keys.d}: one layout")
    rewrite_manifest(store, files=manifest["files"])
    read(model, knnmem.Memory.load(store, model=model), query)  # as written: opens
    file.unlink()
    del manifest["files"][name]
    rewrite_manifest(store, files=manifest["files"])
    with pytest.raises(knnmem.StoreError, match=rf"{name}: missing, but manifest.json lists {keys.ntotal} outliers"):
        knnmem.Memory.load(store, model=model)

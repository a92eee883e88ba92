"""Opening a store trusts nothing in it: every manifest field, size and path is checked, and a crafted or
corrupted store is refused with a `StoreError` naming the file, never read as something else."""

import json
import os

import faiss
import numpy as np
import pytest
import torch

import knnmem
from conftest import sharp_model, tiny_config
from knnmem.store.format import _record
from knnmem.store.manifest import checksum
from test_store import filled, read


@pytest.fixture
def model():
    return sharp_model(tiny_config())


@pytest.fixture
def store(model, tmp_path):
    filled(model, "HNSW32", k=16).save(tmp_path / "store")
    return tmp_path / "store"


def manifest_of(store):
    return json.loads((store / "manifest.json").read_text())


def craft(store, change):
    """Apply `change` to the manifest and sign it again, as someone crafting a store would."""
    manifest = manifest_of(store)
    change(manifest)
    manifest["checksum"] = checksum(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def refused(store, model, match):
    with pytest.raises(knnmem.StoreError, match=match):
        memory = knnmem.Memory.load(store, model=model)
        read(model, memory, torch.randint(1, 96, (1, 8)))  # indexes are read and checked on first search


def test_an_edited_manifest_is_refused(store, model):
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text.replace('"k": 16', '"k": 17'))
    refused(store, model, "manifest.json: contents do not match its checksum")


def test_a_format_1_store_is_refused_and_pointed_to_migration(store, model):
    for version in (1, 4, "3", 3.0, True):
        craft(store, lambda m: m.update(format_version=version))
        refused(store, model, rf"manifest.json: format version {version!r} is not supported \(this knnmem reads 2 and 3; "
                              r"migrate a format-1 store with `knnmem migrate STORE`")


def test_stores_are_written_in_format_3_and_format_2_stores_still_open(store, model):
    assert manifest_of(store)["format_version"] == 3  # what a knnmem reading only format 2 refuses by its version
    query = torch.randint(1, 96, (1, 8))
    expected = read(model, knnmem.Memory.load(store, model=model), query)
    craft(store, lambda m: m.update(format_version=2))  # the reader takes format 2 as it is: only the version differs
    torch.testing.assert_close(read(model, knnmem.Memory.load(store, model=model), query), expected)


def test_a_changed_dtype_is_refused_not_reinterpreted(store, model):
    craft(store, lambda m: m.update(dtype="float16", codec="float16"))
    with pytest.raises(knnmem.StoreError, match=r"manifest.json: lists layer1.keys.bin with 31872 bytes, but 249 entries "
                                                r"of this geometry \(4 heads x 8 dims of float16\) take 15936"):
        knnmem.Memory.load(store, model=model, verify=True)


@pytest.mark.parametrize("field", ["fingerprint", "files", "options", "documents", "layers", "num_heads", "head_dim",
                                   "dtype", "index", "k", "entries", "l2_bounds", "ivf_outliers", "generation"])
def test_a_missing_section_is_refused(store, model, field):
    craft(store, lambda m: m.pop(field))
    refused(store, model, f"manifest.json: field '{field}' must be .*, found missing")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["fingerprint"].update(config={}), "field 'config' must be a non-empty object"),
    (lambda m: m["fingerprint"]["config"].pop("hidden_size"), "built by a different model: hidden_size is missing in the store, 32 in the model"),
    (lambda m: m.update(files={}), r"lists the wrong data files \(missing \['layer1.head0.faiss'"),
    (lambda m: m["options"].pop("train_size"), "field 'options' must be an object .holding train_size"),
    (lambda m: m.update(entries=250), "lists layer1.keys.bin with 31872 bytes, but 250 entries"),
    (lambda m: m.update(k=0), "field 'k' must be a positive integer, found 0"),
    (lambda m: m["documents"][0].update(end=10**6), "field 'documents' must be a list of documents"),
    (lambda m: m["ivf_outliers"]["1"][0].update(ids=[249]), "field '1' must be .* with ids below 249"),
    (lambda m: m["ivf_outliers"]["1"][0].update(error_bound="0.5"), r"field '1' must be .*\{radius, error_bound, ids, errors\}"),
    (lambda m: m["ivf_outliers"]["1"][0].update(errors=[0.5] * 7), r"field '1' must be .* and an error for each \(null"),
    (lambda m: m["ivf_outliers"]["1"][0].update(ids=[3], errors=[0.5], error_bound=None),
     r"field '1' must be .* and an error for each \(null, or a number under an error bound\)"),
    (lambda m: m.update(exact_values={"3": 1}), r"field 'exact_values' must be an object of layers and how many"),
    (lambda m: m.update(l2_bounds={}), r"field 'l2_bounds' must be an object with layers \['1', '2'\]"),
])
def test_inconsistent_fields_are_refused(store, model, change, message):
    craft(store, change)
    refused(store, model, "manifest.json: " + message)


@pytest.mark.parametrize("generation", ["../outside", "/tmp", "data-0123456789ab/..", "."])
def test_the_generation_cannot_point_outside_the_store(store, model, generation):
    craft(store, lambda m: m.update(generation=generation))
    refused(store, model, "field 'generation' must be a name data-<12 hex digits>")


@pytest.mark.parametrize("name", ["../valid.bin", "/etc/passwd", "sub/valid.bin"])
def test_file_names_cannot_point_outside_the_generation(store, model, name):
    craft(store, lambda m: m["files"].update({name: m["files"]["valid.bin"]}))
    refused(store, model, rf"lists the wrong data files \(missing \[\], unexpected \['{name}'\]\)")


def test_links_fifos_and_devices_are_refused(store, model, tmp_path):
    generation = store / manifest_of(store)["generation"]
    valid = generation / "valid.bin"
    (tmp_path / "elsewhere.bin").write_bytes(valid.read_bytes())
    valid.unlink()
    valid.symlink_to(tmp_path / "elsewhere.bin")
    refused(store, model, "valid.bin: cannot be opened")
    valid.unlink()
    os.mkfifo(valid)  # would block a plain open
    refused(store, model, "valid.bin: not a regular file")
    valid.unlink()
    valid.symlink_to("/dev/zero")  # would be hashed forever
    refused(store, model, "valid.bin: cannot be opened")
    valid.unlink()
    (tmp_path / "moved").mkdir()
    generation.rename(tmp_path / "moved" / generation.name)
    generation.symlink_to(tmp_path / "moved" / generation.name)
    refused(store, model, f"{generation.name}: not a directory of the store")


def test_index_ids_outside_the_store_are_refused(store, model):
    file = store / manifest_of(store)["generation"] / "layer2.head1.faiss"
    index = faiss.read_index(str(file))
    ids = faiss.vector_to_array(index.id_map)
    faiss.copy_array_to_vector(ids + 1000, index.id_map)  # consistent checksums: a crafted file
    data = faiss.serialize_index(index)
    file.write_bytes(data.tobytes())
    craft(store, lambda m: m["files"].update({file.name: _record(memoryview(data))}))
    refused(store, model, rf"layer2.head1.faiss: maps vectors to ids 1000..{ids.max() + 1000}, outside the 249 entries")


def test_an_index_of_another_dimension_is_refused(store, model):
    file = store / manifest_of(store)["generation"] / "layer1.head0.faiss"
    other = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    other.add_with_ids(np.zeros((3, 4), dtype=np.float32), np.arange(3))
    data = faiss.serialize_index(other)
    file.write_bytes(data.tobytes())
    craft(store, lambda m: m["files"].update({file.name: _record(memoryview(data))}))
    refused(store, model, "layer1.head0.faiss: indexes vectors of 4 dimensions, the store's keys need 8")

"""IVF stores: lists that hold entry ids themselves, memory-mapped from the store; stores of the earlier layouts."""

import json

import faiss
import numpy as np
import pytest
import torch

import knnmem
import knnmem.memory.faiss_index as faiss_index
from knnmem.memory.faiss_index import inner_index
from knnmem.store.format import _record
from knnmem.store.manifest import checksum
from conftest import sharp_model, tiny_config
from test_store_codecs import documents, manifest_of, read

OPTIONS = dict(k=16, train_size=40, nprobe=2)


@pytest.fixture(scope="module")
def model():
    return sharp_model(tiny_config())


def filled(model, index="IVF4,PQ3", **options):
    memory = knnmem.Memory.create(model, index=index, **{**OPTIONS, **options})
    knnmem.encode_documents(model, documents(), memory, progress=False)
    return memory


def signed(store, manifest):
    manifest["checksum"] = checksum(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def heads(memory, layer):
    return [index for row in memory.backend(layer)._rows for index in row]


@pytest.mark.parametrize("index, options", [("IVF4,PQ3", {}), ("IVF4,Flat", dict(keep_keys=False))])
def test_ivf_lists_are_mapped_from_the_store_and_answer_as_before(model, tmp_path, index, options):
    memory = filled(model, index, **options)
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, memory, query)
    memory.save(tmp_path / "store")
    assert all(not isinstance(faiss.downcast_index(i), faiss.IndexIDMap2) for i in heads(memory, 1))  # ids in lists
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        assert torch.equal(read(model, loaded, query), expected)
        lists = {type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(i).invlists)).__name__ for i in heads(loaded, 1)}
        assert lists == {"OnDiskInvertedLists"}  # mapped read-only, not read
    with knnmem.Memory.load(tmp_path / "store", model=model, writable=True) as writable:
        assert torch.equal(read(model, writable, query), expected)
        lists = {type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(i).invlists)).__name__ for i in heads(writable, 1)}
        assert lists == {"ArrayInvertedLists"}  # read, to take more entries


def test_a_store_of_id_mapped_ivf_indexes_opens_unchanged(model, tmp_path, monkeypatch):
    # Stores written before IVF lists held entry ids wrap every index in an id map, and hold all of provenance.
    monkeypatch.setattr(faiss_index, "_with_ids", faiss.IndexIDMap2)
    old = filled(model, "IVF4,PQ4", l2_reduction=False)  # PQ indexes were not reduced then
    monkeypatch.undo()
    old.save(tmp_path / "store")
    manifest = manifest_of(tmp_path / "store")
    provenance = tmp_path / "store" / manifest["generation"] / "provenance.bin"
    data = old.provenance.numpy().astype(np.int64).tobytes()
    provenance.write_bytes(data)
    manifest["files"]["provenance.bin"] = _record(memoryview(data))
    del manifest["provenance"]
    signed(tmp_path / "store", manifest)
    assert isinstance(faiss.read_index(str(provenance.parent / "layer1.head0.faiss")), faiss.IndexIDMap2)
    query = torch.randint(1, 96, (1, 12))
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        assert torch.equal(read(model, loaded, query), read(model, old, query))
        assert loaded.provenance.dtype == torch.int64 and torch.equal(loaded.provenance, old.provenance)


def test_a_store_of_product_quantizers_at_the_smallest_width_opens_unchanged(model, tmp_path, monkeypatch):
    # Stores written before sub-vectors were padded to widths Faiss encodes fast hold indexes of the smallest
    # dimension PQ accepts: 8 + 1 coordinates in 3 sub-vectors of 3 (new ones: of 4, 12 dimensions).
    def widths(fast):
        monkeypatch.setattr(faiss_index, "_FAST_SUBVECTOR_WIDTHS", fast)
        faiss_index.reduced_widths.cache_clear()
        faiss_index.reduced_layout.cache_clear()

    widths(())
    old = filled(model, "IVF4,PQ3", keep_keys=False)
    widths((2, 4, 8))
    assert {index.d for index in heads(old, 1)} == {9} and faiss_index.reduced_widths("IVF4,PQ3", 8) == (12, 9)
    old.save(tmp_path / "store")
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, old, query)
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        assert torch.equal(read(model, loaded, query), expected)
    with knnmem.Memory.load(tmp_path / "store", model=model, writable=True) as writable:  # and take more entries
        knnmem.encode_documents(model, documents()[:1], writable, progress=False)
        assert {index.d for index in heads(writable, 1)} == {9} and len(writable) > len(old)
        read(model, writable, query)
    assert {index.d for index in heads(filled(model, "IVF4,PQ3", keep_keys=False), 1)} == {12}


def test_a_memory_opened_read_only_saves_its_mapped_lists_whole(model, tmp_path):
    memory = filled(model)
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, memory, query)
    memory.save(tmp_path / "a")
    with knnmem.Memory.load(tmp_path / "a", model=model) as loaded:
        read(model, loaded, query[:, :1])  # reads (maps) the indexes
        assert abs(loaded.nbytes - memory.nbytes) < 0.01 * memory.nbytes  # the lists counted, not their stub
        loaded.save(tmp_path / "b")
        assert torch.equal(read(model, loaded, query), expected)  # its own lists given back
    for writable in (False, True):
        with knnmem.Memory.load(tmp_path / "b", model=model, writable=writable) as again:
            assert torch.equal(read(model, again, query), expected)


@pytest.mark.parametrize("spec", ["IVF4,PQ4,RFlat", "OPQ4,IVF4,PQ4"])
def test_refined_and_transformed_ivf_specs_keep_their_ids(model, tmp_path, spec):
    memory = filled(model, spec, l2_reduction=False)
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, memory, query)
    memory.save(tmp_path / "store")
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        assert torch.equal(read(model, loaded, query), expected)


def test_provenance_stores_token_ids_only_when_documents_give_the_rest(model, tmp_path):
    memory = filled(model)
    documents = len(memory)
    with torch.no_grad():  # entries of no document, written by reading text with the memory
        model(torch.randint(1, 96, (1, 300)), memory=memory, use_cache=False)
    assert len(memory) > documents
    memory.save(tmp_path / "store")
    manifest = manifest_of(tmp_path / "store")
    assert manifest["provenance"] == "token_ids16"  # the ids of a vocabulary of 96 fit 16 bits
    assert manifest["files"]["provenance.bin"]["bytes"] == len(memory) * 2
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        assert loaded._provenance_source is not None  # worked out on first use, not at open
        assert loaded.provenance.shape == (len(memory), 3) and (loaded.provenance[documents:] == -1).all()
        assert torch.equal(loaded.provenance[:documents].long(), memory.provenance)
    memory.provenance[7, 2] = 70_000  # a token id beyond 16 bits: 32 a token
    memory.save(tmp_path / "wide")
    assert manifest_of(tmp_path / "wide")["provenance"] == "token_ids"
    with knnmem.Memory.load(tmp_path / "wide", model=model) as loaded:
        unknown = torch.full((len(memory) - documents, 3), -1)  # entries of no document
        assert torch.equal(loaded.provenance.long(), torch.cat([memory.provenance, unknown]))
    memory.provenance[5, 1] = 99  # a position the documents do not give: everything is stored
    memory.save(tmp_path / "other")
    assert "provenance" not in manifest_of(tmp_path / "other")
    with knnmem.Memory.load(tmp_path / "other", model=model) as loaded:
        assert torch.equal(loaded.provenance[:documents], memory.provenance)


def test_ids_in_ivf_lists_outside_the_store_are_refused_when_searched(model, tmp_path):
    filled(model).save(tmp_path / "store")
    manifest = manifest_of(tmp_path / "store")
    file = tmp_path / "store" / manifest["generation"] / "layer1.head1.faiss"
    index = faiss.read_index(str(file))
    invlists = faiss.extract_index_ivf(index).invlists
    for list_no in range(invlists.nlist):  # consistent checksums: a crafted file
        size = invlists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
            ids += 1000
    data = faiss.serialize_index(index)
    file.write_bytes(data.tobytes())
    manifest["files"][file.name] = _record(memoryview(data))
    signed(tmp_path / "store", manifest)
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        with pytest.raises(ValueError, match=r"layer1.head1.faiss: returned entry id \d+, outside the 830 entries"):
            read(model, loaded, torch.randint(1, 96, (1, 12)))


@pytest.mark.parametrize("spec,table", [("IVF4,PQ3", False), ("PCA8,IVF4,PQ4", True)])
def test_l2_tables_only_where_searches_read_them(model, tmp_path, spec, table):
    # Faiss precomputes, for L2 searches of IVF-PQ lists, nlist x M x 2^nbits floats (2 GiB for 4 heads of
    # IVF8192,PQ16x10). Lists ranked by inner product (`_inner_product_view`) never read it; under a transform
    # they are searched by L2 and get theirs back after a load, which reads stores without it.
    def tables(memory):
        return {faiss.downcast_index(faiss.extract_index_ivf(index)).precomputed_table.size() > 0
                for index in heads(memory, 1)}

    memory = filled(model, spec, keep_keys=False)
    assert tables(memory) == {table}
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, memory, query)
    memory.save(tmp_path / "store")
    with knnmem.Memory.load(tmp_path / "store", model=model) as loaded:
        assert torch.equal(read(model, loaded, query), expected) and tables(loaded) == {table}

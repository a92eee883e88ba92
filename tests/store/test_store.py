import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import knnmem
from conftest import sharp_model, tiny_config
from knnmem.cli import main

SPECS = [
    ("dense", {}),
    ("torch", dict(k=16)),
    ("Flat", dict(k=16)),
    ("HNSW32", dict(k=16)),
    ("IVF4,Flat", dict(k=16, train_size=40, nprobe=2)),
    ("IVF4,PQ4x4fs", dict(k=16, train_size=40, nprobe=2)),
    ("IVF4,PQ4x4", dict(k=16, train_size=40, nprobe=2, keep_keys=False)),  # worst-coded entries kept exactly
]


class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 95 for c in text]}


def documents(count=3, length=70, seed=0):
    torch.manual_seed(seed)
    return [torch.randint(1, 96, (length + 13 * i,)).tolist() for i in range(count)]


@pytest.fixture
def model():
    return sharp_model(tiny_config())


def filled(model, index="dense", **options):
    memory = knnmem.Memory.create(model, index=index, **options)
    knnmem.encode_documents(model, documents(), memory, names=["a", "b", "c"], progress=False)
    return memory


def read(model, memory, ids):
    with torch.no_grad():  # the query stays in the local cache: memory is only read
        return model(ids, memory=memory, use_cache=True, last_context_length=ids.shape[1]).logits


@pytest.mark.parametrize("index, options", SPECS)
def test_saved_and_reloaded_memory_gives_identical_results(model, tmp_path, index, options, capsys):
    memory = filled(model, index, **options)
    query = torch.randint(1, 96, (1, 12))
    expected = read(model, memory, query)
    memory.save(tmp_path / "store")
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    assert len(loaded) == len(memory) and loaded.index == index and loaded.k == memory.k
    assert loaded.options() == memory.options()  # train_size, l2_reduction and search parameters
    assert torch.equal(read(model, loaded, query), expected)
    if index.startswith("IVF"):  # entries unlike the training sample, searched exactly, are kept
        layer = memory.layers[0]
        tracked = memory.backend(layer).export_state()[1]["ivf_outliers"]
        assert loaded.backend(layer).export_state()[1]["ivf_outliers"] == tracked and any(h["ids"] for h in tracked)
        counts = [len(h["ids"]) for h in tracked]
        assert main(["info", str(tmp_path / "store")]) == 0  # and `knnmem info` tells how many
        printed = capsys.readouterr().out
        assert f"layer {layer}: {min(counts)}-{max(counts)} entries per head beyond the lists or their codes" in printed
    # Generation writes overflow into memory: a writable load inserts it exactly like the in-RAM memory.
    prompt = torch.randint(1, 96, (1, 20))
    writable = knnmem.Memory.load(tmp_path / "store", model=model, writable=True)
    assert torch.equal(
        model.generate(prompt, memory=writable, max_new_tokens=12, do_sample=False),
        model.generate(prompt, memory=memory, max_new_tokens=12, do_sample=False),
    )


def test_reload_in_another_process(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    filled(model, "HNSW32", k=16).save(tmp_path / "store")
    query = torch.randint(1, 96, (1, 12))
    torch.save(query, tmp_path / "query.pt")
    script = f"""
import torch, knnmem
model = knnmem.LongLlamaForCausalLM.from_pretrained({str(tmp_path / 'model')!r}).eval()
memory = knnmem.Memory.load({str(tmp_path / 'store')!r}, model=model)
with torch.no_grad():
    query = torch.load({str(tmp_path / 'query.pt')!r})
    logits = model(query, memory=memory, use_cache=True, last_context_length=query.shape[1]).logits
    torch.save(logits, {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    loaded_here = knnmem.Memory.load(tmp_path / "store", model=model)
    assert torch.equal(torch.load(tmp_path / "out.pt"), read(model, loaded_here, query))


def test_stored_keys_find_their_own_ids_after_reload(model, tmp_path):
    memory = filled(model, "Flat", k=1)
    memory.save(tmp_path / "store")
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    entries = loaded.entries(1)
    keys = torch.nn.functional.normalize(entries.keys().float(), dim=-1)  # unit norm: a key's best match is itself
    unit = knnmem.Memory(layers=[1], num_heads=4, head_dim=8, dtype=torch.float32, index="Flat", k=1)
    unit.add(1, keys, entries.values().float(), entries.valid)
    hits = unit.search(1, keys, slice(0, 4))
    own = hits.ids[0, :, :, 0] == torch.arange(len(loaded))
    assert own.float().mean() > 0.9  # same token opening a window gives identical layer-1 keys
    retrieved = keys[0].gather(1, hits.ids[0, :, :, 0, None].expand(-1, -1, keys.shape[-1]))  # (H, M, D)
    torch.testing.assert_close(retrieved[~own], keys[0][~own])  # the others are duplicates
    assert torch.equal(loaded.entries(1).values(), memory.entries(1).values())


def test_documents_and_provenance_survive(model, tmp_path):
    memory = filled(model)
    memory.save(tmp_path / "store")
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    assert [d.name for d in loaded.documents] == ["a", "b", "c"]
    assert [(d.start, d.end) for d in loaded.documents] == [(0, 70), (70, 153), (153, 249)]
    b = loaded.documents[1]
    assert loaded.provenance[b.start].tolist() == [1, 0, documents()[1][0]]
    assert loaded.provenance[b.end - 1].tolist() == [1, 82, documents()[1][82]]


def test_document_order_does_not_change_entries(model):
    forward = filled(model)
    backward = knnmem.Memory.create(model)
    knnmem.encode_documents(model, documents()[::-1], backward, progress=False)
    a, b = forward.documents[0], backward.documents[2]
    assert torch.equal(forward.entries(2).keys()[:, :, a.start:a.end], backward.entries(2).keys()[:, :, b.start:b.end])


def test_read_only_store_keeps_generation_in_an_overlay(model, tmp_path):
    filled(model, "HNSW32", k=16).save(tmp_path / "store")
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    loaded = knnmem.Memory.load(tmp_path / "store", model=model)
    stored = len(loaded)
    model.generate(torch.randint(1, 96, (1, 30)), memory=loaded, max_new_tokens=10, do_sample=False)
    assert len(loaded) > stored and len(loaded.overlay) == len(loaded) - stored
    assert (tmp_path / "store" / "manifest.json").read_text() == manifest
    assert len(knnmem.Memory.load(tmp_path / "store", model=model)) == stored
    loaded.save(tmp_path / "copy")  # without the overlay
    assert len(knnmem.Memory.load(tmp_path / "copy", model=model)) == stored
    loaded.save(include_overlay=True)
    assert len(knnmem.Memory.load(tmp_path / "store", model=model)) == len(loaded)


def test_add_documents_and_reindex(model, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "one.txt").write_text("the first document " * 5)
    (corpus / "sub" / "two.txt").write_text("another text in a folder " * 4)
    (corpus / "skip.md").write_text("not included")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"id": "j1", "text": "from a jsonl line " * 3}) + "\n")
    memory = knnmem.index_corpus(model, CharTokenizer(), [corpus], path=tmp_path / "store", index="Flat", k=8,
                                 progress=False)
    assert [Path(d.name).name for d in memory.documents] == ["one.txt", "two.txt"]
    writable = knnmem.Memory.load(tmp_path / "store", model=model, writable=True)
    knnmem.add_documents(writable, model, CharTokenizer(), [jsonl], progress=False)
    reloaded = knnmem.Memory.load(tmp_path / "store", model=model)
    assert [d.name for d in reloaded.documents][-1] == "j1" and len(reloaded) == len(memory) + 54
    exact = reloaded.reindex("torch", path=tmp_path / "exact", k=1000)
    assert knnmem.Memory.load(tmp_path / "exact", model=model).index == "torch"
    query = torch.randint(1, 96, (1, 6))
    torch.testing.assert_close(read(model, exact, query), read(model, reloaded.reindex("dense"), query))
    with pytest.raises(ValueError, match="load it with writable=True"):
        knnmem.add_documents(reloaded, model, CharTokenizer(), [jsonl], progress=False)


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        knnmem.read_corpus([tmp_path / "nope.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a string field 'text'"):
        knnmem.read_corpus([bad])


@pytest.fixture
def store(model, tmp_path):
    filled(model, "HNSW32", k=16).save(tmp_path / "store")
    return tmp_path / "store"


def data_file(store, name):
    manifest = json.loads((store / "manifest.json").read_text())
    return store / manifest["generation"] / name


def test_different_model_is_refused(store):
    other = sharp_model(tiny_config(), seed=1)
    with pytest.raises(knnmem.StoreError, match="key/value projection weights differ"):
        knnmem.Memory.load(store, model=other)
    wider = sharp_model(tiny_config(hidden_size=64))
    with pytest.raises(knnmem.StoreError, match="hidden_size is 32 in the store, 64 in the model"):
        knnmem.Memory.load(store, model=wider)


def test_unknown_format_version(store, model):
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(knnmem.StoreError, match="manifest.json: format version 99 is not supported"):
        knnmem.Memory.load(store, model=model)


def flip_byte(file, offset):
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0xFF
    file.write_bytes(bytes(raw))


def test_truncated_file(store, model):
    keys = data_file(store, "layer1.keys.bin")
    keys.write_bytes(keys.read_bytes()[:-10])
    with pytest.raises(knnmem.StoreError, match=r"layer1.keys.bin: \d+ bytes, expected \d+ \(truncated"):
        knnmem.Memory.load(store, model=model)


def test_corrupted_index_and_missing_file(store, model):
    index = data_file(store, "layer2.head3.faiss")
    flip_byte(index, 100)
    with pytest.raises(knnmem.StoreError, match="layer2.head3.faiss: contents do not match the checksum"):
        knnmem.Memory.load(store, model=model, verify=True)
    index.write_bytes(index.read_bytes()[:-3])
    with pytest.raises(knnmem.StoreError, match=r"layer2.head3.faiss: \d+ bytes, expected \d+ \(truncated"):
        knnmem.Memory.load(store, model=model)
    data_file(store, "provenance.bin").unlink()
    with pytest.raises(knnmem.StoreError, match="provenance.bin: missing"):
        knnmem.Memory.load(store, model=model)


def test_corrupted_array_is_refused_on_open(store, model):
    flip_byte(data_file(store, "layer2.values.bin"), 7)
    for verify in (False, True):  # arrays this small are hashed on every open
        with pytest.raises(knnmem.StoreError, match="layer2.values.bin: contents do not match the checksum"):
            knnmem.Memory.load(store, model=model, verify=verify)


def test_not_a_store(tmp_path, model):
    with pytest.raises(knnmem.StoreError, match="manifest.json: missing"):
        knnmem.Memory.load(tmp_path, model=model)


WRITER = """
import sys, torch, knnmem
sys.path.insert(0, {tests!r})
from conftest import sharp_model, tiny_config
from knnmem.cli import main
model = sharp_model(tiny_config())
memories = []
for n in (1, 2):
    memory = knnmem.Memory.create(model, index="HNSW32", k=16)
    torch.manual_seed(n)
    knnmem.encode_documents(model, [torch.randint(1, 96, (400 * n,)).tolist()], memory, progress=False)
    memories.append(memory)
print("ready", flush=True)
while True:
    for memory in memories:
        memory.save({store!r})
"""


def test_a_killed_writer_never_leaves_a_half_store(model, tmp_path):
    store = tmp_path / "store"
    script = WRITER.format(tests=str(Path(__file__).parents[1]), store=str(store))  
    seen = set()
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31, 0.37, 0.43, 0.53):
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        if (store / "manifest.json").exists():
            loaded = knnmem.Memory.load(store, model=model, verify=True)
            assert len(loaded) in (400, 800)
            seen.add(len(loaded))
    assert seen  # at least one save completed before a kill


def test_readers_survive_a_writer(model, store):
    reader = knnmem.Memory.load(store, model=model)
    idle_reader = knnmem.Memory.load(store, model=model)  # its indexes are not read until it searches
    query = torch.randint(1, 96, (1, 8))
    before = read(model, reader, query)
    filled(model, "HNSW32", k=16).save(store)  # a new generation; the readers' files are deleted
    assert torch.equal(read(model, reader, query), before)
    assert torch.equal(read(model, idle_reader, query), before)
    assert len(knnmem.Memory.load(store, model=model)) == len(reader)

"""Sharded stores opened in this process: the same answers as one store, and every damaged shard refused by name."""

import json

import pytest
import torch

import knnmem
from conftest import sharp_model, tiny_config
from knnmem.cli import main
from knnmem.ingest.encode import split_documents
from knnmem.memory.manager import merge_hits
from knnmem.memory.protocol import MemoryHits
from knnmem.store.manifest import MANIFEST, checksum
from knnmem.store.shards import sharded_writer

NAMES = [f"doc{i}" for i in range(5)]


class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 95 for c in text]}


@pytest.fixture(scope="module")
def model():
    return sharp_model(tiny_config())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = []
    for i, name in enumerate(NAMES):
        text = "".join(chr(33 + int(c)) for c in torch.randint(0, 90, (60 + 17 * i,), generator=generator))
        lines.append(json.dumps({"id": name, "text": text}))
    path.write_text("\n".join(lines))
    return path


def index(model, corpus, path, spec, shards, **options):
    return knnmem.index_corpus(model, CharTokenizer(), [corpus], path=path, index=spec, shards=shards,
                               progress=False, **options)


def by_score(hits: MemoryHits) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and scores of valid hits per query, best first and equal scores by id (the order in which two memories
    return hits of equal scores may differ)."""
    ids, order = hits.ids.sort(dim=-1)
    scores = hits.scores.masked_fill(~hits.valid, float("-inf")).gather(-1, order)
    scores, order = scores.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order).masked_fill(scores == float("-inf"), -1), scores


@pytest.mark.parametrize("spec", ["Flat", "torch"])
def test_a_sharded_store_returns_the_ids_and_scores_of_one_store(model, corpus, tmp_path, spec):
    whole = index(model, corpus, tmp_path / "whole", spec, 1, k=16)
    sharded = index(model, corpus, tmp_path / "sharded", spec, 3, k=16)
    assert type(sharded).__name__ == "ShardedMemory" and len(sharded) == len(whole) and sharded.read_only
    assert sharded.documents == whole.documents  # ids and entry ranges numbered across shards
    assert torch.equal(sharded.provenance, whole.provenance)
    queries = torch.randn(1, 4, 7, 8, generator=torch.Generator().manual_seed(1))
    for layer in model.config.mem_layers:
        expected, found = whole.search(layer, queries, slice(0, 4)), sharded.search(layer, queries, slice(0, 4))
        assert found.ids.shape == expected.ids.shape == (1, 4, 7, 16)
        for a, b in zip(by_score(found), by_score(expected)):
            assert torch.equal(a, b)
        # ids carry their shard: each hit's values are those of that entry in its shard
        shard, local = sharded.locate(int(found.ids[0, 0, 0, 0]))
        alone = knnmem.Memory.load(tmp_path / "sharded" / shard, model=model)
        assert torch.equal(found.values[0, 0, 0, 0], alone.entries(layer).values()[0, 0, local])
    # The model reads, and generates, as with one loaded store (the overlay of what it adds included).
    whole = knnmem.Memory.load(tmp_path / "whole", model=model)
    prompt = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(prompt, memory=sharded).logits, model(prompt, memory=whole).logits)
    sharded.reset(), whole.reset()  # their overlays
    assert torch.equal(model.generate(prompt, memory=sharded, max_new_tokens=12, do_sample=False),
                       model.generate(prompt, memory=whole, max_new_tokens=12, do_sample=False))


def test_merging_keeps_the_best_k_by_score_and_never_an_invalid_entry():
    def hits(scores, valid):
        scores, valid = torch.tensor([[[scores]]]), torch.tensor([[[valid]]])
        return MemoryHits(None, scores[..., None].expand(-1, -1, -1, -1, 2), valid, torch.arange(len(scores[0, 0, 0]))
                          .expand_as(scores), scores)

    first, second = hits([5.0, 1.0, 0.0], [True, True, False]), hits([3.0, 9.0, 2.0], [True, False, True])
    merged = merge_hits(first, second, offset=10, k=3)
    assert merged.ids.tolist() == [[[[0, 10, 12]]]] and merged.scores.tolist() == [[[[5.0, 3.0, 2.0]]]]
    assert torch.equal(merged.values[..., 0], merged.scores) and merged.valid.all()
    assert merge_hits(first, second, offset=10).ids.shape[-1] == 6  # without k (the overlay): everything


def test_documents_are_split_into_consecutive_ranges_of_about_equal_tokens():
    assert split_documents([60, 73, 86, 99, 112], 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_documents([100, 1, 1], 2) == [range(0, 1), range(1, 3)]
    assert split_documents([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="4 shards need at least 4 documents, the corpus has 3"):
        split_documents([1, 1, 1], 4)


@pytest.fixture
def sharded_store(model, corpus, tmp_path):
    path = tmp_path / "sharded"
    index(model, corpus, path, "Flat", 3, k=8)
    return path


def shard_dirs(path):
    return [path / s["name"] for s in json.loads((path / MANIFEST).read_text())["shards"]]


def test_a_missing_shard_is_refused_by_name(model, sharded_store):
    second = shard_dirs(sharded_store)[1]
    (second / MANIFEST).unlink()
    with pytest.raises(knnmem.StoreError, match=rf"{second.name}: shard 1 of 3 cannot be opened: .*missing"):
        knnmem.Memory.load(sharded_store, model=model)


def test_a_corrupted_shard_is_refused_by_name_and_file(model, sharded_store):
    third = shard_dirs(sharded_store)[2]
    values = next(third.glob("data-*/layer1.values.bin"))
    data = bytearray(values.read_bytes())
    data[len(data) // 2] ^= 0xFF
    values.write_bytes(bytes(data))
    with pytest.raises(knnmem.StoreError, match=rf"{third.name}: shard 2 of 3 cannot be opened: .*layer1.values.bin: "
                       "contents do not match the checksum"):
        knnmem.Memory.load(sharded_store, model=model)


def test_a_shard_replaced_by_another_store_is_refused(model, corpus, sharded_store, tmp_path):
    first = shard_dirs(sharded_store)[0]
    other = index(model, corpus, tmp_path / "other", "Flat", 1, k=8)
    other.save(first)  # a valid store, but not the shard that was written
    with pytest.raises(knnmem.StoreError, match=rf"{first.name}: shard 0 of 3 is not the one .* lists"):
        knnmem.Memory.load(sharded_store, model=model)


def test_an_edited_top_level_manifest_is_refused(model, sharded_store):
    manifest = json.loads((sharded_store / MANIFEST).read_text())
    manifest["shards"] = manifest["shards"][:2]  # dropping a shard silently would lose entries
    (sharded_store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(knnmem.StoreError, match="do not match its checksum"):
        knnmem.Memory.load(sharded_store, model=model)
    manifest["checksum"] = checksum(manifest)
    (sharded_store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(knnmem.StoreError, match="its shards hold .* entries, its field 'entries' says"):
        knnmem.Memory.load(sharded_store, model=model)


def test_a_failed_sharded_write_leaves_the_previous_store(model, corpus, sharded_store):
    before = sorted(p.name for p in sharded_store.iterdir())
    with pytest.raises(RuntimeError, match="encoding failed"):
        with sharded_writer(sharded_store, 2) as directories:
            knnmem.Memory.load(shard_dirs(sharded_store)[0], model=model).save(directories[0])
            raise RuntimeError("encoding failed")
    assert sorted(p.name for p in sharded_store.iterdir()) == before  # the new shard is removed, the old ones kept
    assert len(knnmem.Memory.load(sharded_store, model=model)) > 0
    with pytest.raises(knnmem.StoreError, match="shard 1 was not written"):
        with sharded_writer(sharded_store, 2) as directories:
            knnmem.Memory.load(shard_dirs(sharded_store)[0], model=model).save(directories[0])
    assert sorted(p.name for p in sharded_store.iterdir()) == before
    index(model, corpus, sharded_store, "Flat", 2, k=8)  # rewritten in 2 shards: the 3 old ones are deleted
    assert len(shard_dirs(sharded_store)) == 2 and len(list(sharded_store.glob("shard-*"))) == 2


def test_what_a_sharded_store_refuses(model, corpus, sharded_store, tmp_path):
    memory = knnmem.Memory.load(sharded_store, model=model)
    with pytest.raises(ValueError, match="keeps its entries in its 3 shards"):
        memory.save(tmp_path / "copy")
    with pytest.raises(ValueError, match="a sharded store opens read-only"):
        knnmem.Memory.load(sharded_store, model=model, writable=True)
    with pytest.raises(knnmem.StoreError, match="holds a sharded store; a store without shards cannot replace it"):
        index(model, corpus, sharded_store, "Flat", 1)
    whole = tmp_path / "whole"
    index(model, corpus, whole, "Flat", 1)
    with pytest.raises(knnmem.StoreError, match="holds a store without shards; a sharded store cannot replace it"):
        index(model, corpus, whole, "Flat", 2)
    with pytest.raises(ValueError, match="ray=True serves the shards of a sharded store, and this store has none"):
        knnmem.Memory.load(whole, model=model, ray=True)
    index(model, corpus, tmp_path / "dense", "dense", 2)
    with pytest.raises(ValueError, match="a dense memory attends to every entry, so its actors would send all of it"):
        knnmem.Memory.load(tmp_path / "dense", model=model, ray=True)
    with pytest.raises(knnmem.StoreError, match="a sharded store; open it with knnmem.Memory.load"):
        knnmem.store.format.open_store(sharded_store, fingerprint=knnmem.store.model_fingerprint(model))


def test_info_lists_the_shards(sharded_store, capsys):
    assert main(["info", str(sharded_store)]) == 0
    out = capsys.readouterr().out
    assert "kind: sharded" in out and "shards: 3" in out and out.count(" entries ") == 3

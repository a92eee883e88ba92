"""Format-1 stores are refused with the command that migrates them, which keeps their data."""

import json

import pytest
import torch

import knnmem
from knnmem.cli import main

from conftest import sharp_model, tiny_config


@pytest.fixture
def model():
    return sharp_model(tiny_config())


QUERY = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(1))


def read(model, path):
    with torch.no_grad():
        return model(QUERY, memory=knnmem.Memory.load(path, model=model), use_cache=False).logits


def format_1_store(model, path):
    """A store as format 1 wrote it (no manifest checksum, sampled digests, codec or newer fingerprint fields);
    returns what it answers before the rewrite."""
    memory = knnmem.Memory.create(model, index="Flat", k=8)
    with torch.no_grad():
        model(torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(0)), memory=memory, use_cache=False)
    memory.save(path)
    answers = read(model, path)
    manifest = json.loads((path / "manifest.json").read_text())
    for field in ("checksum", "codec", "codec_arrays"):
        manifest.pop(field, None)
    for field in ("num_key_value_heads", "head_dim", "mem_position_scheme"):
        manifest["fingerprint"]["config"].pop(field)
    manifest["format_version"] = 1
    manifest["files"] = {name: {"bytes": r["bytes"], "sha256": r["sha256"]} for name, r in manifest["files"].items()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return answers


def test_a_format_1_store_is_refused_naming_the_migration_and_migrates_unchanged(model, tmp_path, capsys):
    store = tmp_path / "store"
    answers = format_1_store(model, store)
    with pytest.raises(knnmem.StoreError, match="knnmem migrate STORE"):
        knnmem.Memory.load(store, model=model)
    assert main(["migrate", str(store)]) == 0
    assert "data files unchanged" in capsys.readouterr().out
    knnmem.Memory.load(store, model=model, verify=True)
    assert torch.equal(read(model, store), answers)
    assert main(["migrate", str(store)]) == 2  # already migrated
    assert "not a format-1 store" in capsys.readouterr().err


def test_a_damaged_format_1_store_is_not_migrated(model, tmp_path):
    store = tmp_path / "store"
    format_1_store(model, store)
    before = (store / "manifest.json").read_text()
    generation = json.loads(before)["generation"]
    values = store / generation / "layer1.values.bin"
    data = bytearray(values.read_bytes())
    data[0] ^= 0xFF
    values.write_bytes(bytes(data))
    with pytest.raises(knnmem.StoreError, match="layer1.values.bin: contents do not match"):
        knnmem.store.format.migrate_store(store)
    assert (store / "manifest.json").read_text() == before

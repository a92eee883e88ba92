"""Specs and search parameters that Faiss would abort the process on, or fail with at search, are refused
with a `ValueError` when the memory is made or its parameters are set."""

import json

import pytest
import torch

import knnmem
from knnmem.memory import check_spec
from knnmem.store.manifest import checksum


def memory(index, **options):
    return knnmem.Memory(layers=[0], num_heads=2, head_dim=8, dtype=torch.float32, index=index, **options)


@pytest.mark.parametrize("spec", ["HNSW0", "IVF0,Flat", "IVF4_HNSW0,Flat", "PQ0", "NSG0"])
def test_zero_sizes_are_refused(spec):
    with pytest.raises(ValueError, match=f"invalid Faiss index spec '{spec}': its sizes .* must be positive"):
        memory(spec)
    with pytest.raises(ValueError, match="unknown index spec"):
        check_spec(spec, 32)


@pytest.mark.parametrize("spec", ["IDMap,Flat", "IDMap2,HNSW32"])
def test_id_maps_are_refused(spec):
    with pytest.raises(ValueError, match="knnmem maps index ids to entries itself; drop IDMap"):
        check_spec(spec, 32)


def test_specs_are_checked_at_the_real_head_dimension():
    assert check_spec("PQ32", 32) == "PQ32" and check_spec("IVF16,PQ16", 32) == "IVF16,PQ16"
    with pytest.raises(ValueError, match="for dimension 8"):
        check_spec("PQ32", 8)


@pytest.mark.parametrize("spec, params", [
    ("IVF4,PQ4x4", dict(nprobe=0)), ("IVF4,Flat", dict(nprobe=-1)), ("HNSW32", dict(efSearch=0)),
    ("IVF4,Flat", dict(nprobe=2.5)), ("HNSW32", dict(efSearch=float("inf"))),
])
def test_search_parameters_must_be_positive_counts(spec, params):
    with pytest.raises(ValueError, match=f"search parameter '{next(iter(params))}' must be a"):
        memory(spec, train_size=8, **params)
    usable = memory(spec, train_size=8)
    with pytest.raises(ValueError, match="must be a"):
        usable.set_search_params(**params)
    keys = torch.randn(1, 2, 64, 8)
    usable.add(0, keys, keys, torch.ones(1, 64, dtype=torch.bool))
    assert usable.search(0, keys[:, :, :3], slice(0, 2)).ids.shape[-1] > 0  # still searchable


def test_a_stored_zero_nprobe_is_refused_by_name(tmp_path):
    from conftest import sharp_model, tiny_config

    model = sharp_model(tiny_config())
    stored = knnmem.Memory.create(model, index="IVF4,PQ4x4", train_size=8, nprobe=2)
    keys = torch.randn(1, 4, 64, 8)
    for layer in stored.layers:
        stored.add(layer, keys, keys, torch.ones(1, 64, dtype=torch.bool))
    stored.save(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    manifest["options"]["nprobe"] = 0
    manifest["checksum"] = checksum(manifest)
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(knnmem.StoreError, match="manifest.json: search parameter 'nprobe' must be a positive integer"):
        knnmem.Memory.load(tmp_path / "store", model=model)

"""Grouped- and multi-query attention: one index per key/value head, searched by all its query heads."""

import pytest
import torch
from torch.testing import assert_close

import knnmem

from conftest import sharp_model, tiny_config

BACKENDS = [("torch", {}), ("Flat", {}), ("HNSW32", {}), ("IVF4,Flat", dict(train_size=20, nprobe=4))]


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("index, options", BACKENDS)
def test_top_k_covering_memory_equals_dense_with_grouped_queries(kv_heads, index, options):
    model = sharp_model(tiny_config(num_key_value_heads=kv_heads))
    ids = torch.randint(1, 96, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        memory = knnmem.Memory.create(model, index=index, k=64, **options)
        got = model(ids, memory=memory, use_cache=False).logits
    assert memory.num_heads == kv_heads and len(memory) == 60
    assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_each_key_value_head_is_searched_once_per_block_by_all_its_query_heads():
    model = sharp_model(tiny_config(num_key_value_heads=2))
    memory = knnmem.Memory.create(model, index="torch", k=4)
    calls = []
    memory.observers.append(lambda layer, queries, heads, hits: calls.append((layer, heads, queries.shape)))
    with torch.no_grad():
        model(torch.randint(1, 96, (1, 30)), memory=memory, use_cache=False)
    searched = [shape for _, _, shape in calls if shape[2] > 0]
    assert all(shape[1] == 2 for shape in searched)  # both key/value heads in one call
    assert all(shape[2] % 2 == 0 for shape in searched)  # the queries of the 2 query heads of each group


@pytest.mark.parametrize("grouping", [(2, 3), (1, 5), (4, 1)])
def test_grouping_does_not_change_results_with_grouped_queries(grouping):
    ids = torch.randint(1, 96, (2, 45), generator=torch.Generator().manual_seed(4))
    plain = sharp_model(tiny_config(num_key_value_heads=2))
    grouped = sharp_model(tiny_config(num_key_value_heads=2, mem_attention_grouping=grouping))
    with torch.no_grad():
        assert_close(grouped(ids, use_cache=False).logits, plain(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_a_store_refuses_a_model_with_other_key_value_heads(tmp_path):
    model = sharp_model(tiny_config(num_key_value_heads=2))
    memory = knnmem.Memory.create(model, index="Flat")
    with torch.no_grad():
        model(torch.randint(1, 96, (1, 30)), memory=memory, use_cache=False)
    memory.save(tmp_path / "store")
    other = sharp_model(tiny_config(num_key_value_heads=1))
    with pytest.raises(knnmem.StoreError, match="num_key_value_heads is 2 in the store, 1 in the model"):
        knnmem.Memory.load(tmp_path / "store", model=other)
    with pytest.raises(ValueError, match="key/value heads"):
        model(torch.randint(1, 96, (1, 30)), memory=knnmem.Memory.create(other), use_cache=False)

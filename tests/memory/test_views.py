"""Views of a read-only memory: the stored entries shared, each overlay its own."""

import pytest
import torch

import knnmem


def test_views_share_the_store_and_keep_their_overlays_apart(make_model, ids, tmp_path):
    model = make_model()
    memory = knnmem.Memory.create(model, index="Flat", k=4)
    model(input_ids=ids[:1], memory=memory, use_cache=False)
    memory.save(tmp_path / "store")
    with knnmem.Memory.load(tmp_path / "store", model=model) as shared:
        stored = len(shared)
        first, second = shared.view(), shared.view()
        model(input_ids=ids[:1, :20], memory=first, use_cache=False)  # written to the first view's overlay
        assert len(first) > stored and len(second) == stored and len(shared) == stored and shared.overlay is None
        queries = torch.randn(1, model.config.num_key_value_heads, 3, model.config.head_dim)
        layer = model.config.mem_layers[0]
        heads = slice(0, model.config.num_key_value_heads)
        assert torch.equal(second.search(layer, queries, heads).ids, shared.search(layer, queries, heads).ids)
        assert second.search_seconds > 0 and first.observers is not shared.observers
        first.close()  # drops its overlay, not the store
        assert len(first) == stored and torch.equal(shared.search(layer, queries, heads).ids,
                                                    second.search(layer, queries, heads).ids)


def test_only_read_only_memories_give_views(make_model):
    with pytest.raises(ValueError, match="read-only"):
        knnmem.Memory.create(make_model()).view()

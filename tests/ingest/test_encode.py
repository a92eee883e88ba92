"""Encoding a document computes only what its stored entries depend on, and stores the same entries."""

import torch

import knnmem
from knnmem.ingest.encode import encode_documents

from conftest import sharp_model, tiny_config


def test_entries_only_skips_what_stored_entries_do_not_depend_on_and_stores_the_same_entries():
    config = tiny_config(num_hidden_layers=4, mem_layers=[1, 2], max_position_embeddings=16)
    model = sharp_model(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 53))  # three full windows and a partial one
    calls = []
    hooks = [model.model.layers[3].register_forward_hook(lambda *a: calls.append("layer 3")),
             model.model.layers[2].self_attn.register_forward_hook(lambda *a: calls.append("layer 2 attention")),
             model.lm_head.register_forward_hook(lambda *a: calls.append("head"))]
    stored = knnmem.Memory.create(model)
    encode_documents(model, tokens.tolist(), stored, progress=False)
    assert calls == []
    for hook in hooks:
        hook.remove()

    # The full model reading the same windows one at a time (positions are relative within a window)
    # writes the same entries.
    full = knnmem.Memory.create(model)
    with torch.no_grad():
        for start in range(0, 53, 16):
            model(input_ids=tokens[:, start : start + 16], memory=full, use_cache=False, last_context_length=16)
    assert len(stored) == len(full) == 53
    for layer in config.mem_layers:
        for (k1, v1, _), (k2, v2, _) in zip(stored.entries(layer).chunks(), full.entries(layer).chunks()):
            torch.testing.assert_close(k1, k2)
            torch.testing.assert_close(v1, v2)

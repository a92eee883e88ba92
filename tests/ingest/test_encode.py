"""Encoding a document computes only what its stored entries depend on, and stores the same entries."""

import time

import pytest
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


def test_the_forward_pass_gives_a_core_to_insertion_only_while_it_waits_for_it_and_gives_it_back(monkeypatch):
    config = tiny_config(num_hidden_layers=2, mem_layers=[1], max_position_embeddings=16)
    model = sharp_model(config).eval()
    seen = []
    def reading(*_):  # each window reads for 100 ms: far longer than appending its entries to dense memory takes
        seen.append(torch.get_num_threads())
        time.sleep(0.1)

    hook = model.model.layers[0].register_forward_hook(reading)
    threads = torch.get_num_threads()
    documents = [[1, 2, 3] * 10, [4, 5] * 9, [6] * 20, [7, 8] * 10]

    def encode(memory, documents=documents):
        seen.clear()
        encode_documents(model, documents, memory, progress=False)
        return seen[::2]  # threads per document (two windows each)

    try:
        torch.set_num_threads(3)
        assert encode(knnmem.Memory.create(model)) == [3, 3, 3, 3]  # insertion keeps up: every core reads
        slow = knnmem.Memory.create(model)
        add = slow.add
        monkeypatch.setattr(slow, "add", lambda *args: (time.sleep(0.4), add(*args)))
        assert encode(slow) == [3, 3, 2, 2] and torch.get_num_threads() == 3  # from the first wait on
        slowly = iter([True, True])  # the first two documents insert slowly, the rest fast: the core comes back
        monkeypatch.setattr(slow, "add", lambda *args: (next(slowly, False) and time.sleep(0.4), add(*args)))
        assert encode(slow, documents + documents[:2]) == [3, 3, 2, 2, 3, 3]
        torch.set_num_threads(1)
        assert encode(slow) == [1, 1, 1, 1]  # never below one thread
        torch.set_num_threads(3)
        with pytest.raises(ValueError, match="no tokens"):
            encode(slow, documents[:3] + [[]])
        assert torch.get_num_threads() == 3
    finally:
        hook.remove()
        torch.set_num_threads(threads)

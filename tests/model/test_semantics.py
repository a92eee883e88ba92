"""knnmem's LongLLaMA against the naive token-by-token restatement of its semantics in reference.py."""

import pytest
import torch

import knnmem
from conftest import sharp_model, tiny_config
from reference import NaiveLongLlama


def model_for(**overrides):
    fields = dict(max_position_embeddings=6, last_context_length=4, mem_layers=[1, 2])
    return sharp_model(tiny_config(**{**fields, **overrides}), seed=3)


@pytest.mark.parametrize("mem_positionals", [True, False])
@pytest.mark.parametrize("length, last", [(5, 4), (23, 4), (23, 6), (30, 1)])
def test_forward_over_many_windows(mem_positionals, length, last):
    model = model_for(mem_positionals=mem_positionals)
    ids = torch.randint(1, 96, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours = model(ids, use_cache=False, last_context_length=last).logits[0].double()
    expected = NaiveLongLlama(model).forward(ids[0].tolist(), last_context_length=last)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_left_padding_in_a_batch():
    model = model_for()
    ids = torch.randint(1, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, use_cache=False).logits.double()
    for row in range(2):
        valid = mask[row].bool().tolist()
        expected = NaiveLongLlama(model).forward(ids[row].tolist(), valid=valid)
        torch.testing.assert_close(ours[row][mask[row].bool()], expected[mask[row].bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mem_positionals", [True, False])
def test_generation_overflows_the_cache_into_memory(mem_positionals):
    """Prompt, then one token at a time past several cache overflows, as generate runs the model."""
    model = model_for(mem_positionals=mem_positionals)
    prompt = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    naive = NaiveLongLlama(model)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        torch.testing.assert_close(out.logits[0].double(), naive.forward(prompt[0].tolist(), use_cache=True),
                                   rtol=1e-4, atol=1e-4)
        cache = out.cache
        for step in range(14):  # the cache (window 6) overflows into memory more than once
            token = int(out.logits[0, -1].argmax())
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            expected = naive.forward([token], use_cache=True)
            torch.testing.assert_close(out.logits[0].double(), expected, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        assert len(cache.memory) == sum(1 for _ in naive.memory[1])


def test_generate_produces_the_reference_greedy_tokens():
    model = model_for()
    prompt = torch.randint(1, 96, (1, 11), generator=torch.Generator().manual_seed(2))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)[0, 11:].tolist()
    naive = NaiveLongLlama(model)
    logits = naive.forward(prompt[0].tolist(), use_cache=True)
    expected = []
    for _ in range(10):
        expected.append(int(logits[-1].argmax()))
        logits = naive.forward([expected[-1]], use_cache=True)
    assert generated == expected

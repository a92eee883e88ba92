"""`knnmem.decoding.generate`: the tokens of `model.generate`, plus sampling, stop strings, streaming and cancellation."""

from pathlib import Path

import pytest
import torch

import knnmem
from knnmem.decoding import Sampling, generate

TINY = Path(__file__).resolve().parent.parent / "model" / "tiny"


@pytest.fixture(scope="module")
def tiny():
    return knnmem.load_pretrained(TINY, "cpu")


def test_greedy_is_model_generate(tiny):
    model, tokenizer = tiny
    ids = tokenizer("import os")["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    generated = generate(model, tokenizer, None, ids, Sampling(max_new_tokens=10))
    assert generated.tokens == out and generated.finish_reason == "length"
    assert generated.text == tokenizer.decode(out, skip_special_tokens=True)


def test_streamed_pieces_make_the_text_and_stop_strings_cut_it(tiny):
    model, tokenizer = tiny
    ids = tokenizer("import os")["input_ids"]
    free = generate(model, tokenizer, None, ids, Sampling(max_new_tokens=16)).text
    stop = free[5:8]
    pieces = []
    cut = generate(model, tokenizer, None, ids, Sampling(max_new_tokens=16, stop=(stop,)), on_text=pieces.append)
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text and stop not in "".join(pieces)


def test_sampling_follows_its_seed(tiny):
    model, tokenizer = tiny
    ids = tokenizer("import os")["input_ids"]

    def sample(seed, top_p=1.0):
        return generate(model, tokenizer, None, ids, Sampling(max_new_tokens=12, temperature=1.0, top_p=top_p, seed=seed)).tokens

    assert sample(3) == sample(3) and sample(3, 0.5) == sample(3, 0.5)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1
    # With top_p tiny, only the most likely token remains: greedy decoding.
    assert sample(5, top_p=1e-6) == generate(model, tokenizer, None, ids, Sampling(max_new_tokens=12)).tokens


def test_cancellation_ends_at_the_next_token(tiny):
    model, tokenizer = tiny
    seen = []
    generated = generate(model, tokenizer, None, tokenizer("import os")["input_ids"], Sampling(max_new_tokens=50),
                         on_text=seen.append, cancelled=lambda: len(seen) >= 3)
    assert generated.finish_reason == "cancelled" and len(generated.tokens) == 3


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(stop=("",)), "stop"),
])
def test_bad_sampling_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**options)

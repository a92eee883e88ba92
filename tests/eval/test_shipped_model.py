"""The shipped demo model (`model/`) loads, and it retrieves facts through kNN memory that it cannot
see otherwise."""

from pathlib import Path

import numpy as np
import pytest
import torch

import knnmem
from knnmem.eval.demo import DATA
from knnmem.eval.passkey import passkey_prompt
from knnmem.train.synthetic import TEMPLATES, entity, value

MODEL = Path(__file__).resolve().parents[2] / "model" / "tiny"
TRIALS, FILLER_CHARS = 4, 20_000  # about 8k tokens between each fact and its question
# Measured on 8 such facts: 31 of 35 answer tokens with HNSW32 memory, 5 of 35 from the question alone.
KNN_AT_LEAST, MARGIN = 0.7, 0.4


@torch.no_grad()
def answer_tokens_predicted(model, tokenizer, question: str, answer: str, memory) -> tuple[int, int]:
    """(correct, total): answer tokens that are the greedy next token after the question and the answer so far."""
    encoded = tokenizer(f"{question} {answer}", return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]], device=model.device)
    # Answer tokens: those ending inside the answer (a leading space token belongs to the question).
    positions = [i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(question) + 1 and i > 0]
    logits = model(input_ids=ids, memory=memory, use_cache=False).logits[0]
    predicted = logits[[i - 1 for i in positions]].argmax(-1)
    return int((predicted == ids[0, positions]).sum()), len(positions)


@pytest.fixture(scope="module")
def shipped():
    return knnmem.load_pretrained(MODEL, "cpu")


def fact_far_back(rng, filler: str) -> tuple[str, str, str]:
    """(context, question, answer): a fact, then held-out real text, then the question."""
    name, attr, val = entity(rng), "code", value(rng)
    statement, question = TEMPLATES[0]
    return statement.format(a=attr, e=name, v=val) + "\n" + filler, question.format(a=attr, e=name), val


def test_shipped_model_has_the_documented_shape(shipped):
    model, tokenizer = shipped
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.mem_layers) == (4, 128, [2])
    assert config.max_position_embeddings == 256 and len(tokenizer) == config.vocab_size == 2048
    assert tokenizer.decode(tokenizer("x = 12345")["input_ids"], skip_special_tokens=True) == "x = 12345"


def test_load_pretrained_applies_config_overrides_to_the_same_weights(shipped, tmp_path):
    model, _ = shipped
    other, _ = knnmem.load_pretrained(MODEL, "cpu", mem_layers=[1, 3])
    assert other.config.mem_layers == [1, 3] and not other.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        knnmem.load_pretrained(tmp_path)


@pytest.mark.slow
def test_shipped_model_retrieves_facts_from_thousands_of_tokens_back_through_knn_memory(shipped):
    model, tokenizer = shipped
    corpus = (DATA / "corpus.jsonl").read_text()
    rng = np.random.default_rng(0)
    hits = {"HNSW32": 0, "none": 0}
    total = 0
    for _ in range(TRIALS):
        start = int(rng.integers(0, len(corpus) - FILLER_CHARS))
        context, question, answer = fact_far_back(rng, corpus[start : start + FILLER_CHARS])
        prompt = context + question
        assert len(tokenizer(prompt)["input_ids"]) > 4 * model.config.max_position_embeddings
        correct, count = answer_tokens_predicted(model, tokenizer, prompt, answer,
                                                 knnmem.Memory.create(model, index="HNSW32", k=128))
        hits["HNSW32"] += correct
        # The baseline never sees the fact: the question alone.
        hits["none"] += answer_tokens_predicted(model, tokenizer, question, answer, knnmem.Memory.create(model))[0]
        total += count
    assert hits["HNSW32"] / total >= KNN_AT_LEAST
    assert hits["HNSW32"] - hits["none"] >= MARGIN * total


@pytest.mark.parametrize("index", ["IVF1024,Flat", "IVF64,Flat"])
@pytest.mark.parametrize("depth, pass_key", [(0.1, 40817), (0.45, 2962), (0.8, 31475)])
def test_shipped_model_finds_a_pass_key_8k_tokens_long_through_knn_memory(shipped, index, depth, pass_key):
    """k=128 from the default index, which searches these ~8k entries exactly (its lists are trained at
    39,936 entries), and from IVF64,Flat, trained at 2,496 entries and then searched approximately."""
    model, tokenizer = shipped
    ids = torch.tensor([passkey_prompt(tokenizer, 8192, depth, pass_key)])
    key_at = depth * ids.shape[1]
    assert ids.shape[1] - key_at > 4 * model.config.max_position_embeddings  # the key is only in memory
    memory = knnmem.Memory.create(model, index=index)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, do_sample=False, memory=memory)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()[0] == str(pass_key)
    if index == "IVF64,Flat":  # its lists were trained, so the search was approximate
        assert memory.train_size < ids.shape[1]

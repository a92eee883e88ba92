"""knnmem against outputs of the published LongLLaMA implementation.

`data/original` holds a tiny checkpoint saved by that implementation (its config still carries the
published `auto_map`, its weights the rotary `inv_freq` buffers) and the outputs it computed:
long inputs split into windows with bfloat16 memory, a left-padded batch, no memory positionals,
and a greedy generation whose local cache overflows into memory.
"""

from pathlib import Path

import pytest
import torch
import transformers
from torch.testing import assert_close

import knnmem

CHECKPOINT = Path(__file__).parent / "data" / "original"


@pytest.fixture(scope="module")
def reference():
    return torch.load(CHECKPOINT / "reference_outputs.pt", weights_only=True)


@pytest.mark.parametrize("loader", [knnmem.LongLlamaForCausalLM, transformers.AutoModelForCausalLM])
def test_long_input_and_padded_batch(reference, loader):
    model = loader.from_pretrained(CHECKPOINT).eval()
    assert isinstance(model, knnmem.LongLlamaForCausalLM)
    ids, mask = reference["ids"], reference["mask"]
    with torch.no_grad():
        long = model(ids[1:], last_context_length=10, use_cache=False).logits
        padded = model(ids, attention_mask=mask, last_context_length=10, use_cache=False).logits
    assert_close(long, reference["long"], rtol=0, atol=1e-4)
    assert_close(padded[mask.bool()], reference["padded"][mask.bool()], rtol=0, atol=1e-4)


def test_without_memory_positionals(reference):
    model = knnmem.LongLlamaForCausalLM.from_pretrained(CHECKPOINT, mem_positionals=False).eval()
    with torch.no_grad():
        logits = model(reference["ids"][1:], last_context_length=10, use_cache=False).logits
    assert_close(logits, reference["nopos"], rtol=0, atol=1e-4)


def test_generation_overflowing_the_local_cache(reference):
    model = knnmem.LongLlamaForCausalLM.from_pretrained(CHECKPOINT).eval()
    out = model.generate(reference["ids"][1:, :60], max_new_tokens=20, do_sample=False, last_context_length=12,
                         output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference["generated"])
    assert_close(torch.stack(out.scores, 1), reference["generated_scores"], rtol=0, atol=1e-4)

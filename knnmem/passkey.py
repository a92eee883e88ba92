"""The landmark-attention pass-key test: a pass key hidden at a random depth inside filler text.

The prompt is the one of the landmark-attention paper: a task line, repeated filler sentences with
the key sentence at the chosen depth, and the question; the model must continue with the key.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def key_sentence(pass_key: int) -> str:
    return f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."


def passkey_prompt(tokenizer, length: int, depth: float, pass_key: int) -> list[int]:
    """Token ids of a prompt of about `length` tokens with the key sentence at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    fixed = len(tokenizer("\n".join([TASK, "", key_sentence(pass_key), "", QUESTION]))["input_ids"])
    per_filler = len(tokenizer(" ".join([FILLER] * 16))["input_ids"]) / 16
    repeats = max(math.ceil((length - fixed) / per_filler), 0)
    before = round(repeats * depth)
    text = "\n".join(
        [TASK, " ".join([FILLER] * before), key_sentence(pass_key), " ".join([FILLER] * (repeats - before)), QUESTION]
    )
    return tokenizer(text)["input_ids"]


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    pass_key: int
    answer: str
    correct: bool
    seconds: float


def run_passkey(model, tokenizer, length: int, *, trials: int, memory_factory, seed: int = 0) -> list[PasskeyTrial]:
    """Greedy-decode the key for `trials` prompts of about `length` tokens, depths uniform in [0, 1].

    Args:
        memory_factory: called with no arguments for each trial; returns the `knnmem.Memory` to use.
    """
    rng = np.random.default_rng([seed, length])
    results = []
    for _ in range(trials):
        depth, pass_key = float(rng.uniform()), int(rng.integers(1, 50001))
        ids = torch.tensor([passkey_prompt(tokenizer, length, depth, pass_key)])
        digits = len(str(pass_key))
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=digits + 1, do_sample=False, memory=memory_factory())
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        number = re.match(r"\d+", answer)
        correct = number is not None and number.group() == str(pass_key)
        results.append(PasskeyTrial(ids.shape[1], depth, pass_key, answer, correct, time.perf_counter() - start))
    return results

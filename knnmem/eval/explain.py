"""Which stored passages the memory layers attended to while generating.

`explain_generation` decodes greedily with an `AttentionRecorder` observing the memory (any decoding
can: pass it to `knnmem.decoding.generate` and summarize with `explain`): for each generated token it keeps, per memory layer and key/value heads searched, the memory-softmax weights
of the newest query of every query head over the retrieved entries, averages them over heads and
layers, and maps the entries back to their documents and positions through the store's provenance.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from ..decoding import Generated, Sampling, generate
from ..memory import Memory, MemoryHits


class AttentionRecorder(LogitsProcessor):
    """Observes a memory's searches and, at each generation step, turns the last search of every
    (layer, heads) into the weights the newest queries gave each entry.

    Observes while used as a context manager (`with AttentionRecorder(memory, groups) as recorder:`).

    Args:
        memory: the memory to observe.
        groups: query heads per key/value head; searches lay their queries out as G blocks of T.
    """

    def __init__(self, memory: Memory, groups: int):
        self.memory, self.groups = memory, groups
        self.steps: list[dict[int, float]] = []  # per generated token: entry id -> weight
        self._last: dict[tuple[int, int], tuple[torch.Tensor, MemoryHits]] = {}

    def __enter__(self) -> "AttentionRecorder":
        self.memory.observers.append(self.observe)
        return self

    def __exit__(self, *exc) -> None:
        self.memory.observers.remove(self.observe)

    def observe(self, layer: int, queries: torch.Tensor, heads: slice, hits: MemoryHits) -> None:
        # Only each forward's last search of (layer, heads) holds the newest query; keep that one.
        self._last[layer, heads.start or 0] = (queries, hits)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        weights: dict[int, float] = defaultdict(float)
        for queries, hits in self._last.values():
            length = queries.shape[2] // self.groups
            newest = torch.arange(1, self.groups + 1) * length - 1  # the last query of each query head
            if hits.shared:  # every entry, scored here
                keys = hits.keys[0].float()  # (h, M, D)
                step = torch.einsum("hgd,hmd->hgm", queries[0, :, newest].float(), keys)
                valid = hits.valid[0][None, None].expand_as(step)
                ids = torch.arange(keys.shape[1])[None, None].expand_as(step)
            else:
                step, valid, ids = (x[0, :, newest] for x in (hits.scores, hits.valid, hits.ids))
            step = step.float() / queries.shape[-1] ** 0.5  # as attention scales its scores
            probs = torch.softmax(step.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
            share = 1.0 / (probs.shape[0] * probs.shape[1] * len(self._last))  # mean over heads and searches
            for entry, weight in zip(ids.flatten().tolist(), probs.flatten().tolist()):
                if weight > 0:
                    weights[entry] += weight * share
        self.steps.append(dict(weights))
        self._last = {}
        return scores


@dataclass
class Passage:
    document: str
    position: int  # token position of the entry in its document
    text: str
    weight: float


@dataclass
class Explanation:
    answer: str
    tokens: list[str]
    per_token: list[list[Passage]]  # top passages of each generated token
    overall: list[Passage]  # top passages over the whole answer


def describe(memory: Memory, tokenizer, entry: int, weight: float, context: int = 12) -> Passage:
    """The passage around memory entry `entry`: its document, position and surrounding text."""
    provenance = memory.provenance
    if provenance is None or entry >= len(provenance) or int(provenance[entry, 0]) < 0:
        return Passage("(prompt)", entry, "", weight)
    doc = memory.documents[int(provenance[entry, 0])]
    lo, hi = max(doc.start, entry - context), min(doc.end, entry + context + 1)
    before = tokenizer.decode(provenance[lo:entry, 2].tolist())
    token = tokenizer.decode(provenance[entry:entry + 1, 2].tolist())
    after = tokenizer.decode(provenance[entry + 1:hi, 2].tolist())
    return Passage(doc.name, int(provenance[entry, 1]), f"{before}[{token}]{after}".replace("\n", " "), weight)


def explain(recorder: AttentionRecorder, tokenizer, generated: Generated, *, top: int = 3) -> Explanation:
    """The passages `recorder` saw attended to for each token of `generated`, and over the whole answer."""
    memory, tokens = recorder.memory, generated.tokens
    steps = recorder.steps[: len(tokens)]
    overall: dict[int, float] = defaultdict(float)
    for weights in steps:
        for entry, weight in weights.items():
            overall[entry] += weight / max(len(tokens), 1)
    ranked = lambda weights: sorted(weights.items(), key=lambda kv: -kv[1])[:top]  # noqa: E731
    return Explanation(
        answer=generated.text,
        tokens=[tokenizer.decode([t]) for t in tokens],
        per_token=[[describe(memory, tokenizer, e, w) for e, w in ranked(weights)] for weights in steps],
        overall=[describe(memory, tokenizer, e, w) for e, w in ranked(overall)],
    )


def explain_generation(model, tokenizer, memory: Memory, prompt: str | list[int], *, max_new_tokens: int = 16,
                       top: int = 3) -> Explanation:
    """Greedy generation from `prompt` (text, or token ids such as `chat.encode_prompt` gives) with `memory`,
    reporting the passages each token attended to."""
    config = model.config
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    with AttentionRecorder(memory, config.num_attention_heads // config.num_key_value_heads) as recorder:
        generated = generate(model, tokenizer, memory, ids, Sampling(max_new_tokens=max_new_tokens),
                             logits_processors=[recorder])
    return explain(recorder, tokenizer, generated, top=top)

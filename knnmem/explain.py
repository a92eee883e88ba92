"""Which stored passages the memory layers attended to while generating.

`explain_generation` decodes greedily with an `AttributedMemory` around a loaded (or built) memory:
on every step it records, for the newest query of each memory layer and head, the memory-softmax
weights of the retrieved entries, averages them over heads and layers, and maps the entries back to
their documents and positions through the store's provenance.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from .backends import MemoryHits
from .memory import Memory


class AttributedMemory(Memory):
    """A `Memory` that records the memory attention of the newest query on every search."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.weights: dict[int, float] = defaultdict(float)
        self.searches = 0
        self.recording = True

    def search(self, layer: int, queries: torch.Tensor, heads: slice) -> MemoryHits | None:
        hits = super().search(layer, queries, heads)
        if hits is None or not self.recording:
            return hits
        query = queries[0, :, -1].float()  # (h, D): the newest position of row 0
        if hits.ids is None:  # shared by all queries: every entry
            keys, valid = hits.keys[0].float(), hits.valid[0][None].expand(query.shape[0], -1)
            ids = torch.arange(keys.shape[1])[None].expand(query.shape[0], -1)
        else:
            keys, valid, ids = hits.keys[0, :, -1].float(), hits.valid[0, :, -1], hits.ids[0, :, -1]
        scores = torch.einsum("hd,hmd->hm", query, keys).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (h, M)
        for entry, weight in zip(ids.flatten().tolist(), weights.flatten().tolist()):
            if weight > 0:
                self.weights[entry] += weight / weights.shape[0]
        self.searches += 1
        return hits

    def take(self) -> dict[int, float]:
        """The weights recorded since the last call, averaged over the searches (layers) that made them."""
        searches = max(self.searches, 1)
        out = {entry: weight / searches for entry, weight in self.weights.items()}
        self.weights, self.searches = defaultdict(float), 0
        return out


def attributed(memory: Memory) -> AttributedMemory:
    """The same memory (sharing its storage and indexes), recording attention while it is searched."""
    copy = AttributedMemory.__new__(AttributedMemory)
    copy.__dict__.update(memory.__dict__)
    copy.weights, copy.searches, copy.recording = defaultdict(float), 0, True
    return copy


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


@torch.no_grad()
def explain_generation(model, tokenizer, memory: Memory, prompt: str, *, max_new_tokens: int = 16,
                       top: int = 3) -> Explanation:
    """Greedy generation from `prompt` with `memory`, reporting the passages each token attended to."""
    probe = attributed(memory)
    device = next(model.parameters()).device
    ids = tokenizer(prompt)["input_ids"]
    # The prompt but its last token is read without recording; from then on each step's single query
    # is the one whose attention explains the next token.
    past = None
    if len(ids) > 1:
        probe.recording = False
        past = model(input_ids=torch.tensor([ids[:-1]], device=device), memory=probe, use_cache=True,
                     logits_to_keep=1).cache
        probe.recording = True
    step_ids = torch.tensor([ids[-1:]], device=device)
    generated, per_token, overall = [], [], defaultdict(float)
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, cache=past, memory=probe, use_cache=True,
                    logits_to_keep=1)
        weights, past = probe.take(), out.cache
        token = int(out.logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        for entry, weight in weights.items():
            overall[entry] += weight
        best = sorted(weights.items(), key=lambda kv: -kv[1])[:top]
        per_token.append([describe(memory, tokenizer, e, w) for e, w in best])
        step_ids = torch.tensor([[token]], device=device)
    overall = {entry: weight / max(len(generated), 1) for entry, weight in overall.items()}
    ranked = sorted(overall.items(), key=lambda kv: -kv[1])[:top]
    return Explanation(
        answer=tokenizer.decode(generated, skip_special_tokens=True),
        tokens=[tokenizer.decode([t]) for t in generated],
        per_token=per_token,
        overall=[describe(memory, tokenizer, e, w) for e, w in ranked],
    )

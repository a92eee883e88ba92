"""Encoding documents into one memory.

Each document is run through the model on its own, seeing only its own earlier windows as memory
(as FoT models are trained to ignore unrelated memory); its keys and values are then appended to
the target memory. So the cost is linear in the corpus size and document order does not change
any stored entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .memory import Memory


class Document(NamedTuple):
    """A document whose entries are ids `start..end-1` of a single-row memory."""

    id: int
    name: str
    start: int
    end: int


@torch.no_grad()
def encode_documents(
    model, documents: Iterable[Sequence[int]], memory: "Memory", *, names: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Document]:
    """Append every document's memory entries to `memory` (one batch row), with their provenance.

    Args:
        model: a `LongLlamaForCausalLM` (or `LongLlamaModel`).
        documents: token ids per document.
        memory: the target memory; any index spec.
        names: a name per document (default: its number).
        progress: show a progress bar with tokens/s and ETA.

    Returns:
        The documents added, with the entry ids each received; also appended to `memory.documents`,
        and `memory.provenance` gains a (document id, position, token id) row per entry.
    """
    memory.check_compatible(model.config)
    memory.check_batch(1)
    documents = [list(d) for d in documents]
    names = list(names) if names is not None else [str(len(memory.documents) + i) for i in range(len(documents))]
    device = next(model.parameters()).device
    added, provenance = [], []
    bar = tqdm(total=sum(map(len, documents)), unit="tok", unit_scale=True, disable=not progress, desc="encoding")
    for tokens, name in zip(documents, names):
        if not tokens:
            raise ValueError(f"document {name!r} has no tokens")
        scratch = memory.empty_like("dense")  # the document's own earlier windows only
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[None]
        model(input_ids=ids, memory=scratch, use_cache=False)
        start = len(memory)
        for layer in memory.layers:
            buffer = scratch.layer(layer).buffer
            memory.add(layer, buffer.keys, buffer.values, buffer.valid)
        document = Document(len(memory.documents) + len(added), name, start, len(memory))
        added.append(document)
        provenance.append(torch.stack([torch.full((len(tokens),), document.id), torch.arange(len(tokens)),
                                       torch.tensor(tokens)], dim=1))
        bar.update(len(tokens))
    bar.close()
    memory.documents += added
    old = [memory.provenance] if memory.provenance is not None else []
    memory.provenance = torch.cat(old + provenance) if old or provenance else None
    return added

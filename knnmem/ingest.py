"""Encoding documents into one memory.

Each document is run through the model on its own, seeing only its own earlier windows as memory
(as FoT models are trained to ignore unrelated memory); its keys and values are then appended to
the target memory. So the cost is linear in the corpus size and document order does not change
any stored entry.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .memory import Memory


@torch.no_grad()
def encode_documents(
    model, documents: Iterable[Sequence[int]], memory: Memory, *, progress: bool = True
) -> list[range]:
    """Append every document's memory entries to `memory` (batch of one row).

    Args:
        model: a `LongLlamaForCausalLM` (or `LongLlamaModel`).
        documents: token ids per document.
        memory: the target memory; any index spec.
        progress: show a progress bar with tokens/s.

    Returns:
        The range of entry ids each document received, in order.
    """
    memory.check_compatible(model.config)
    memory.check_batch(1)
    ranges = []
    device = next(model.parameters()).device
    documents = list(documents)
    bar = tqdm(total=sum(len(d) for d in documents), unit="tok", unit_scale=True, disable=not progress)
    for tokens in documents:
        if not len(tokens):
            raise ValueError(f"document {len(ranges)} is empty")
        scratch = Memory.create(model.config)  # dense: the document's own earlier windows only
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device)[None]
        model(input_ids=ids, memory=scratch, use_cache=False)
        start = len(memory)
        for layer in memory.layers:
            buffer = scratch.layer(layer).buffer
            memory.add(layer, buffer.keys, buffer.values, buffer.valid)
        ranges.append(range(start, len(memory)))
        bar.update(len(tokens))
    bar.close()
    return ranges

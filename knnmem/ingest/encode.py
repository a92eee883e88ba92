"""Encoding documents into one memory, and building a store from a corpus.

Each document is run through the model on its own, seeing only its own earlier windows as memory
(as FoT models are trained to ignore unrelated memory); its keys and values are then appended to
the target memory. So the cost is linear in the corpus size and document order does not change
any stored entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..memory.manager import Document, Memory
from .corpus import read_corpus


@torch.no_grad()
def encode_documents(
    model, documents: Iterable[Sequence[int]], memory: Memory, *, names: Sequence[str] | None = None,
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
        # The document's own earlier windows only, as the model wrote them (encoded once, into `memory`).
        scratch = memory.empty_like("dense", codec=None, keep_keys=True)
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[None]
        # Only what stored entries depend on is computed: nothing above the last memory layer.
        model.get_decoder()(input_ids=ids, memory=scratch, use_cache=False, entries_only=True)
        start = len(memory)
        for layer in memory.layers:
            for keys, values, valid in scratch.entries(layer).chunks():
                memory.add(layer, keys, values, valid)
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


def add_documents(memory: Memory, model, tokenizer, sources, *, progress: bool = True, **read_options) -> list[Document]:
    """Read `sources` (see `read_corpus`), encode them into `memory` and, if it came from a writable store,
    save it there."""
    if memory.read_only:
        raise ValueError(f"memory loaded read-only from {memory.path}; load it with writable=True to add documents")
    texts = read_corpus(sources, **read_options)
    tokens = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in texts]
    added = encode_documents(model, tokens, memory, names=[d.name for d in texts], progress=progress)
    if memory.path is not None:
        memory.save(memory.path)
    return added


def index_corpus(
    model, tokenizer, sources, *, path: str | Path, index: str = "dense", progress: bool = True,
    include: str = "*.txt", text_field: str = "text", **options,
) -> Memory:
    """Encode a corpus (files, folders, JSONL) into a memory under `index` and save it as a store at `path`.

    Documents are encoded independently (see `encode_documents`); `options` are those of `Memory`.
    """
    memory = Memory.create(model, index=index, **options)
    add_documents(memory, model, tokenizer, sources, progress=progress, include=include, text_field=text_field)
    memory.save(path)
    memory.path = Path(path)
    return memory

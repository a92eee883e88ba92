"""Encoding documents into one memory, and building a store from a corpus.

Each document is run through the model on its own, seeing only its own earlier windows as memory
(as FoT models are trained to ignore unrelated memory); its keys and values are then appended to
the target memory. So the cost is linear in the corpus size and document order does not change
any stored entry, and a corpus can be cut into shards encoded apart (in parallel with Ray: see
`knnmem.cluster.indexing`) whose entries are exactly those of the whole.
"""

from __future__ import annotations

import bisect
from itertools import accumulate
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..memory.manager import Document, Memory
from ..store.shards import sharded_writer
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

    def insert(scratch: Memory, tokens: list[int], name: str) -> None:
        start = len(memory)
        for layer in memory.layers:
            for keys, values, valid in scratch.entries(layer).chunks():
                memory.add(layer, keys, values, valid)
        document = Document(len(memory.documents) + len(added), name, start, len(memory))
        added.append(document)
        provenance.append(torch.stack([torch.full((len(tokens),), document.id), torch.arange(len(tokens)),
                                       torch.tensor(tokens)], dim=1))
        bar.update(len(tokens))

    for tokens, name in zip(documents, names):
        if not tokens:
            raise ValueError(f"document {name!r} has no tokens")
        # The document's own earlier windows only, as the model wrote them (encoded once, into `memory`).
        scratch = memory.empty_like("dense", codec=None, keep_keys=True)
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[None]
        # Only what stored entries depend on is computed: nothing above the last memory layer. Insertion follows on
        # every core: run beside the next document's forward pass, it and torch's spinning threads slowed each other.
        model.get_decoder()(input_ids=ids, memory=scratch, use_cache=False, entries_only=True)
        insert(scratch, tokens, name)
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
    tokens, names = _tokenized(tokenizer, sources, **read_options)
    added = encode_documents(model, tokens, memory, names=names, progress=progress)
    if memory.path is not None:
        memory.save(memory.path)
    return added


def _tokenized(tokenizer, sources, **read_options) -> tuple[list[list[int]], list[str]]:
    """Token ids and name of every document of `sources` (see `read_corpus`)."""
    texts = read_corpus(sources, **read_options)
    return [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in texts], [d.name for d in texts]


def index_corpus(
    model, tokenizer, sources, *, path: str | Path, index: str = "dense", shards: int = 1, ray: bool = False,
    progress: bool = True, include: str = "*.txt", text_field: str = "text", **options,
) -> Memory:
    """Encode a corpus (files, folders, JSONL) into a memory under `index` and save it as a store at `path`.

    Documents are encoded independently (see `encode_documents`); `options` are those of `Memory`. With
    `shards` > 1 or `ray`, the store is sharded: the documents are cut into `shards` consecutive ranges of about
    equal token counts (`split_documents`), each encoded into a shard of its own, one after the other or, with
    `ray`, by parallel Ray tasks (`knnmem.cluster.indexing`); the sharded store is returned opened (`Memory.load`).
    """
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if shards == 1 and not ray:
        memory = Memory.create(model, index=index, **options)
        add_documents(memory, model, tokenizer, sources, progress=progress, include=include, text_field=text_field)
        memory.save(path)
        memory.path = Path(path)
        return memory
    tokens, names = _tokenized(tokenizer, sources, include=include, text_field=text_field)
    ranges = split_documents([len(t) for t in tokens], shards)
    with sharded_writer(path, len(ranges)) as directories:
        jobs = [([tokens[i] for i in docs], [names[i] for i in docs], directory)
                for docs, directory in zip(ranges, directories)]
        if ray:
            from ..cluster.indexing import encode_in_tasks

            encode_in_tasks(model, jobs, index=index, **options)
        else:
            for documents, shard_names, directory in jobs:
                encode_shard(model, documents, shard_names, directory, index=index, progress=progress, **options)
    return Memory.load(path, model=model)


def encode_shard(model, documents: Sequence[Sequence[int]], names: Sequence[str], path: Path, *, index: str,
                 progress: bool = False, **options) -> None:
    """Encode `documents` into a new memory under `index` (`options` as in `Memory`) and save it as the store `path`:
    one shard of a sharded store."""
    memory = Memory.create(model, index=index, **options)
    encode_documents(model, documents, memory, names=names, progress=progress)
    memory.save(path)
    memory.close()


def split_documents(lengths: Sequence[int], shards: int) -> list[range]:
    """`shards` consecutive, non-empty ranges of documents with token counts `lengths`, of about equal token counts.

    Raises:
        ValueError: fewer documents than shards.
    """
    if shards > len(lengths):
        raise ValueError(f"{shards} shards need at least {shards} documents, the corpus has {len(lengths)}")
    cumulative = list(accumulate(lengths))
    cuts = [0]
    for i in range(1, shards):
        # After the document where the running token count comes nearest i/shards of the total, leaving at least
        # one document for this shard and each later one.
        target = cumulative[-1] * i / shards
        cut = bisect.bisect_left(cumulative, target)  # documents 0..cut hold at least the target
        if cut == 0 or cumulative[cut] - target < target - cumulative[cut - 1]:
            cut += 1
        cuts.append(min(max(cut, cuts[-1] + 1), len(lengths) - (shards - i)))
    cuts.append(len(lengths))
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]

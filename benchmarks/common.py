"""Shared by the benchmark scripts: the model they run, the text they read, and process memory."""

from __future__ import annotations

from pathlib import Path

from knnmem.ingest import stdlib_texts

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model" / "tiny"


def stdlib_documents(tokenizer, total_tokens: int, doc_tokens: int = 4096) -> list[list[int]]:
    """Standard-library sources (the training split's files), tokenized, cut into documents of at most
    `doc_tokens` tokens."""
    docs, remaining = [], total_tokens
    for _, text in stdlib_texts("train"):
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), doc_tokens):
            piece = ids[start : start + min(doc_tokens, remaining)]
            if len(piece) >= 64:
                docs.append(piece)
                remaining -= len(piece)
            if remaining <= 0:
                return docs
    raise ValueError(f"the standard library holds fewer than {total_tokens} tokens")


def rss_bytes() -> int:
    """Resident memory of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0

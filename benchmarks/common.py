"""Shared by the benchmark scripts: the model they run, the text they read, and process memory."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from knnmem.ingest import stdlib_texts

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model" / "tiny"


def stdlib_documents(tokenizer, total_tokens: int, doc_tokens: int = 4096, *, packages: bool = False) -> list[list[int]]:
    """Standard-library sources (the training split's files), tokenized, cut into documents of at most
    `doc_tokens` tokens; with `packages`, followed by the Python sources of the installed packages (for corpora
    beyond the standard library's ~4M tokens of the test model's tokenizer)."""
    docs, remaining = [], total_tokens
    for text in _python_sources(packages):
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), doc_tokens):
            piece = ids[start : start + min(doc_tokens, remaining)]
            if len(piece) >= 64:
                docs.append(piece)
                remaining -= len(piece)
            if remaining <= 0:
                return docs
    raise ValueError(f"the {'Python sources' if packages else 'standard library'} hold fewer than {total_tokens} tokens")


def _python_sources(packages: bool):
    yield from (text for _, text in stdlib_texts("train"))
    if packages:
        for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
            yield path.read_text(encoding="utf-8", errors="replace")


def memory_config(text: str) -> tuple[str, str | None, bool]:
    """"SPEC[@CODEC][-keys]" as (spec, codec or None, keep_keys): "@CODEC" stores entries with that codec, "-keys"
    keeps no keys beside the index."""
    spec, _, codec = text.removesuffix("-keys").partition("@")
    return spec, codec or None, not text.endswith("-keys")


def rss_bytes() -> int:
    """Resident memory of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0

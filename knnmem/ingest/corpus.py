"""Reading a corpus: text files, folders of them, and JSONL files with a text field."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple


class SourceDocument(NamedTuple):
    name: str
    text: str


def read_corpus(
    sources: Iterable[str | Path], *, include: str = "*.txt", text_field: str = "text"
) -> list[SourceDocument]:
    """Documents of `sources`, in order.

    Args:
        sources: text files, folders (searched recursively for `include`), or `.jsonl` files with one
            JSON object per line holding the text in `text_field` (named by its `id` or `name` field
            if present, else by file and line).

    Binary files (holding a NUL byte) are skipped, with a warning saying how many.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a JSONL file is not UTF-8, a line is not an object with a string `text_field`, or
            nothing was found.
    """
    documents, binary = [], []
    for source in map(Path, sources):
        if source.is_dir():
            files = sorted(p for p in source.rglob(include) if p.is_file())
        elif source.suffix == ".jsonl":
            documents += _read_jsonl(source, text_field)
            continue
        elif source.is_file():
            files = [source]
        else:
            raise FileNotFoundError(f"corpus source {source} does not exist")
        for file in files:
            raw = file.read_bytes()
            if b"\0" in raw:  # text never holds NUL; binary formats nearly always do
                binary.append(str(file))
            else:
                documents.append(SourceDocument(str(file), raw.decode("utf-8-sig", errors="replace")))
    if binary:
        warnings.warn(f"skipped {len(binary)} binary file{'s' * (len(binary) > 1)} (first: {binary[0]})", stacklevel=2)
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise ValueError(f"no non-empty document found in {[str(s) for s in sources]} (include={include!r})")
    return documents


def _read_jsonl(path: Path, text_field: str) -> list[SourceDocument]:
    documents = []
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is allowed, not part of the first line
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}): JSONL files are UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}:{number}: expected an object with a string field {text_field!r}")
        name = record.get("id", record.get("name", f"{path}:{number}"))
        documents.append(SourceDocument(str(name), record[text_field]))
    return documents

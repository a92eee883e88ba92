"""What a user would pick instead of a memory: retrieval-augmented prompting with BM25 over chunks.

Documents are cut into chunks of whole paragraphs, BM25 (`bm25s`) ranks the chunks for a question,
and the best are placed in the prompt of the same model, which then runs without memory.
"""

from __future__ import annotations

import re

CHUNK_CHARS = 900  # a few paragraphs: small enough that three fit a short prompt


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` cut at paragraph breaks into chunks of at most `size` characters (or one paragraph)."""
    out, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + 2 + len(paragraph) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return out + [current] if current else out


def passage_prompt(passages: list[str], question: str) -> str:
    """A question to be answered from `passages`, as the user's message."""
    text = "\n\n".join(passages)
    return f"Text:\n{text}\n\nAnswer from the text above, briefly. {question}"


def answered(generated: str, expected: str) -> bool:
    """Whether `expected` occurs in `generated` as a whole (case-insensitive; "17" is not found in "170")."""
    return re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", generated, re.IGNORECASE) is not None


class Bm25Chunks:
    """BM25 over the chunks of `documents` (name, text)."""

    def __init__(self, documents: list[tuple[str, str]], size: int = CHUNK_CHARS):
        import bm25s

        self.chunks = [(name, chunk) for name, text in documents for chunk in chunks(text, size)]
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([chunk for _, chunk in self.chunks], stopwords="en", show_progress=False),
                         show_progress=False)

    def search(self, question: str, top: int = 3) -> list[tuple[str, str]]:
        """The `top` best (document name, chunk) for `question`, best first."""
        query = self._bm25s.tokenize([question], stopwords="en", show_progress=False)
        found, _ = self.index.retrieve(query, k=min(top, len(self.chunks)), show_progress=False)
        return [self.chunks[int(i)] for i in found[0]]

"""The FoT training data recipe: real text found offline mixed with synthetic retrieval documents,
laid out by k-packing.

Real text is the Python standard library's sources (with their docstrings and comments), split by
file into training and held-out parts. A batch is `rows` rows of `window` tokens; consecutive rows
hold consecutive chunks of one document (at most `k_pack` of them), so in cross-batch attention a row
sees earlier parts of its own document and parts of other documents. Every batch is a function of
`(seed, step)`, so training resumes on exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .synthetic import haystack, retrieval_document

# Answer categories of a target token.
NOT_ANSWER, LOCAL_ANSWER, MEMORY_ANSWER = 0, 1, 2
CHARS_PER_TOKEN = 2.6  # about right for code and English with a 2k vocabulary; documents are cut in tokens
HAYSTACK_FRACTION = 0.4  # synthetic documents whose filler is repeated simple sentences instead of real text
HAYSTACK_GAP = 2000  # their largest filler passage (characters): few facts in much filler, like a needle in a haystack


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, window)
    answers: torch.Tensor  # (rows, window) int8: NOT_ANSWER, LOCAL_ANSWER or MEMORY_ANSWER


class TrainingData:
    """Batches for FoT training.

    Args:
        tokenizer: a fast tokenizer (offsets are used to locate answers).
        real_text: the real text stream, one string (documents separated by blank lines).
        window: tokens per row.
        rows: rows per batch.
        k_pack: most consecutive chunks of one document.
        synthetic_fraction: share of documents that are synthetic retrieval documents.
        reach: how far back (characters) questions of synthetic documents may look (a number or a
            callable of the training progress in [0, 1], for a curriculum).
        seed: fixes every batch.
    """

    def __init__(self, tokenizer, real_text: str, *, window: int, rows: int, k_pack: int,
                 synthetic_fraction: float, reach, seed: int):
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must lie in [0, 1], got {synthetic_fraction}")
        if k_pack < 1 or rows < 1 or window < 2:
            raise ValueError(f"need k_pack >= 1, rows >= 1, window >= 2; got {k_pack}, {rows}, {window}")
        self.tokenizer = tokenizer
        self.real = np.asarray(tokenizer(real_text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        self.real_text = real_text
        if len(self.real) < k_pack * window:
            raise ValueError(f"real text has {len(self.real)} tokens, fewer than one document ({k_pack * window})")
        self.window, self.rows, self.k_pack = window, rows, k_pack
        self.synthetic_fraction, self.seed = synthetic_fraction, seed
        self.reach = reach if callable(reach) else (lambda progress: reach)

    def batch(self, step: int, progress: float = 1.0, *, stream: int = 0) -> Batch:
        """Batch `step` of `stream` (0: training; others: evaluation) at curriculum `progress` in [0, 1]."""
        rng = np.random.default_rng([self.seed, stream, step])
        ids = np.zeros((self.rows, self.window), dtype=np.int64)
        answers = np.zeros((self.rows, self.window), dtype=np.int8)
        row = 0
        while row < self.rows:
            chunks = min(int(rng.integers(1, self.k_pack + 1)), self.rows - row)
            length = chunks * self.window
            if rng.random() < self.synthetic_fraction:
                doc, kinds = self._synthetic(rng, length, int(self.reach(progress)))
            else:
                start = int(rng.integers(0, len(self.real) - length + 1))
                doc, kinds = self.real[start:start + length], np.zeros(length, dtype=np.int8)
            ids[row:row + chunks] = doc.reshape(chunks, self.window)
            answers[row:row + chunks] = kinds.reshape(chunks, self.window)
            row += chunks
        return Batch(torch.from_numpy(ids), torch.from_numpy(answers))

    def _filler(self, rng: np.random.Generator, num_chars: int) -> str:
        start = int(rng.integers(0, max(len(self.real_text) - num_chars, 1)))
        return self.real_text[start:start + num_chars]

    def _synthetic(self, rng: np.random.Generator, length: int, reach: int) -> tuple[np.ndarray, np.ndarray]:
        """A synthetic document of exactly `length` tokens and the answer category of each token."""
        num_chars = int(length * CHARS_PER_TOKEN * 1.3)
        while True:
            # Filler between events: real text, or repeated simple sentences with sparser events.
            if rng.random() < HAYSTACK_FRACTION:
                text, spans = retrieval_document(rng, haystack(rng), num_chars, reach, max_gap=HAYSTACK_GAP)
            else:
                text, spans = retrieval_document(rng, lambda n: self._filler(rng, n), num_chars, reach)
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(encoded["input_ids"]) >= length:
                break
        ids = np.asarray(encoded["input_ids"][:length], dtype=np.int64)
        starts = np.asarray([s for s, _ in encoded["offset_mapping"][:length]])
        ends = np.asarray([e for _, e in encoded["offset_mapping"][:length]])
        kinds = np.zeros(length, dtype=np.int8)
        for span in spans:
            answer = np.nonzero((starts < span.answer[1]) & (ends > span.answer[0]))[0]
            source = np.nonzero((starts < span.source[1]) & (ends > span.source[0]))[0]
            if not len(answer) or not len(source):
                continue
            same_chunk = answer[0] // self.window == source[0] // self.window
            kinds[answer] = LOCAL_ANSWER if same_chunk else MEMORY_ANSWER
        return ids, kinds

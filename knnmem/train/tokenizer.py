"""SentencePiece tokenizers trained by knnmem, saved so `transformers.AutoTokenizer` loads them.

Digits are split into single tokens (numbers of any length stay copyable digit by digit) and
unknown characters fall back to bytes, so every text round-trips.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 2048):
    """Train a BPE SentencePiece model on every line of `texts` (deterministically) and save it in
    `out_dir` with its Hugging Face files.

    Returns:
        The tokenizer loaded back with `transformers.AutoTokenizer` (a `LlamaTokenizer`).
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with corpus.open("w", encoding="utf-8") as f:
            for text in texts:
                f.write(text.replace("\x00", "") + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(out_dir / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            split_digits=True,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            shuffle_input_sentence=False,
            num_threads=2,
            minloglevel=2,
            **{f"{name}_id": idx for name, idx in SPECIAL_IDS.items()},
        )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return save_fast_files(out_dir)


def save_fast_files(out_dir: str | Path):
    """Convert `out_dir/tokenizer.model` once into `tokenizer.json`, so loading needs no SentencePiece."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer

"""The one offline source of real text: the Python standard library's sources, split three ways.

`train` and `heldout` split the modules outside the `test` package by a hash of their path (the
training recipe reads the first, evaluations and the demo the second); `test` is the `test`
package, which training never reads (the perplexity benchmark's long documents).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

SPLITS = ("train", "heldout", "test")


def stdlib_texts(split: str, *, heldout_percent: int = 3) -> list[tuple[str, str]]:
    """(path relative to the standard library, text) of the `.py` files in `split`, sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel:
            continue
        if split == "test":
            chosen = rel.startswith("test/")
        else:
            chosen = "test" not in rel.split("/")[0] and (zlib.crc32(rel.encode()) % 100 < heldout_percent) == (
                split == "heldout")
        if chosen:
            texts.append((rel, path.read_text(encoding="utf-8", errors="replace")))
    if not texts:
        raise RuntimeError(f"no standard-library sources of split {split!r} found under {root}")
    return texts

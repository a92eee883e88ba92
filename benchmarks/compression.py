"""Compressed memory against uncompressed, side by side: bytes per token, retrieval and model quality.

A corpus of real text (standard-library sources) is encoded once by the shipped model (or `--model DIR`)
into a dense memory; every (index spec, codec, keep_keys) then starts from those same entries and reads
the same held-out text, compared with exact dense memory over uncompressed entries (`compare_memories`):
recall@k and softmax mass on the model's real queries (judged by full-precision keys), output error,
perplexity, and bytes per token of keys, values and indexes. Prints a Markdown table, writes JSON and a
plot of bytes per token against recall and perplexity.

    python benchmarks/compression.py --tokens 1048576 --text-tokens 1024 --config IVF1024,Flat@float32 \
        --config "IVF1024,PQ16x10@bfloat16/pq2-keys" --out benchmarks/results/compression-1M
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from common import SHIPPED_MODEL, memory_config, stdlib_documents

import knnmem
from knnmem.eval.compare import compare_memories
from knnmem.plotting import pyplot

# (index, codecs, keep_keys): the uncompressed default, then compressed values, then compressed keys as well
CONFIGS = [("IVF1024,Flat", ["float32", "int8"], True), ("IVF1024,Flat", ["bfloat16/pq4"], False),
           ("IVF1024,PQ16x4fs", ["bfloat16/pq4"], False), ("IVF1024,PQ16", ["bfloat16/pq4"], False),
           ("IVF1024,PQ17", ["bfloat16/pq2", "bfloat16/pq4", "bfloat16/pq8"], False),
           ("IVF1024,PQ16x10", ["bfloat16/pq2"], False)]


def markdown(rows: list[dict]) -> str:
    """The table; rows[0] is dense memory, rows[1] the uncompressed default index that compressed ones are judged by."""
    lines = ["| index | codec | keys kept | bytes/token | recall@128 | mass captured | output rel. error | perplexity | "
             "vs dense | vs uncompressed |", "|" + "---|" * 10]
    dense, uncompressed = rows[0]["perplexity"], rows[min(1, len(rows) - 1)]["perplexity"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['codec']} | {r['keep_keys']} | {r['bytes_per_entry']:,.0f} | {r['recall']:.3f} "
                     f"| {r['mass_captured']:.3f} | {r['output_rel_error']:.4f} | {r['perplexity']:.3f} "
                     f"| {100 * (r['perplexity'] / dense - 1):+.2f}% | {100 * (r['perplexity'] / uncompressed - 1):+.2f}% |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (recall, perplexity) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows[1:]:
        name = f"{r['index']} {r['codec']}" + ("" if r["keep_keys"] else " no keys")
        recall.scatter(r["bytes_per_entry"], r["recall"])
        recall.annotate(name, (r["bytes_per_entry"], r["recall"]), fontsize=7)
        perplexity.scatter(r["bytes_per_entry"], r["perplexity"])
        perplexity.annotate(name, (r["bytes_per_entry"], r["perplexity"]), fontsize=7)
    perplexity.axhline(rows[0]["perplexity"], color="grey", linestyle="--", label="dense, uncompressed")
    recall.set(xscale="log", xlabel="bytes per memory token (keys, values, indexes)", ylabel="recall@128 (real queries)")
    perplexity.set(xscale="log", xlabel="bytes per memory token (keys, values, indexes)", ylabel="held-out perplexity")
    perplexity.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--tokens", type=int, default=1 << 17, help="memory tokens every configuration starts with")
    parser.add_argument("--text-tokens", type=int, default=1 << 12, help="held-out tokens read with each memory")
    parser.add_argument("--config", action="append", default=None, metavar="INDEX@CODEC[-keys]",
                        help="a configuration to run instead of the built-in list (-keys: no keys kept); repeatable; "
                             "the first is the uncompressed reference")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    configs = CONFIGS if args.config is None else [
        (spec, [codec or "float32"], keep_keys) for spec, codec, keep_keys in map(memory_config, args.config)]
    model, tokenizer = knnmem.load_pretrained(args.model, "cpu")
    docs = stdlib_documents(tokenizer, args.tokens + args.text_tokens + 4096)  # the document crossing --tokens is memory
    corpus, held_out, total = [], [], 0
    for doc in docs:  # the corpus first, the documents after it are the held-out text
        (corpus if total < args.tokens else held_out).append(doc)
        total += len(doc)
    base = knnmem.Memory.create(model)
    knnmem.encode_documents(model, corpus, base, progress=False)
    text = torch.tensor([[t for doc in held_out for t in doc][: args.text_tokens]], dtype=torch.long)
    rows = []
    for spec, codecs, keep_keys in configs:
        found = compare_memories(model, text, [spec], base=base, codecs=codecs, keep_keys=keep_keys)
        rows += [{**asdict(r), "keep_keys": keep_keys or r.index == "dense"} for r in found[0 if not rows else 1:]]
        print(markdown(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression.json").write_text(json.dumps(dict(memory_tokens=len(base), rows=rows), indent=1))
    plot(rows, args.out / "compression.png")
    (args.out / "compression.txt").write_text(markdown(rows) + "\n")


if __name__ == "__main__":
    main()

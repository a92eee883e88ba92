"""Perplexity on held-out long documents as context grows: local window only vs memory, dense and kNN.

The documents are the longest files of the standard library's `test` package, which the training
recipe never reads. For each document the target is the same: the last `--target` tokens of its
first `--length` tokens. The model reads the `L` tokens that end there (the memory holds everything
before the window being predicted) and is scored on the target only, so every column predicts the
same tokens and only the context differs. "local" scores each target window on its own (no memory).

    python benchmarks/perplexity.py --contexts 2k,8k,32k,64k --index HNSW32 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from common import SHIPPED_MODEL
from tqdm.auto import tqdm

import knnmem
from knnmem.cli import parse_token_list
from knnmem.ingest import stdlib_texts
from knnmem.plotting import pyplot


def long_documents(tokenizer, length: int, count: int) -> list[tuple[str, list[int]]]:
    """The `count` longest `test` files of at least `length` tokens, cut to their first `length` tokens."""
    docs = []
    for name, text in sorted(stdlib_texts("test"), key=lambda item: -len(item[1].encode()))[: 4 * count]:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            docs.append((name.removeprefix("test/"), ids[:length]))
        if len(docs) == count:
            return docs
    raise ValueError(f"fewer than {count} held-out documents have {length} tokens")


@torch.no_grad()
def target_loss(model, ids: list[int], target: int, memory: knnmem.Memory | None) -> float:
    """Summed next-token loss over the last `target` tokens of `ids` (the first of them needs its predecessor)."""
    tokens = torch.tensor([ids], device=model.device)
    if memory is None:  # local only: each window of the target predicted from that window alone
        window = model.config.max_position_embeddings
        total = 0.0
        for start in range(len(ids) - target, len(ids), window):
            logits = model(input_ids=tokens[:, start - 1 : start - 1 + window], use_cache=False).logits
            total += torch.nn.functional.cross_entropy(logits[0], tokens[0, start : start + window], reduction="sum").item()
        return total
    logits = model(input_ids=tokens, use_cache=False, memory=memory, logits_to_keep=target + 1).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, -target:], reduction="sum").item()


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    local = next(r["perplexity"] for r in rows if r["memory"] == "local")
    for name in dict.fromkeys(r["memory"] for r in rows if r["memory"] != "local"):
        points = sorted((r["context"], r["perplexity"]) for r in rows if r["memory"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.axhline(local, color="grey", linestyle="--", label="local window only")
    contexts = sorted({r["context"] for r in rows if r["memory"] != "local"})
    ax.set(xscale="log", xlabel="context tokens", ylabel="perplexity of the target tokens",
           title="Held-out long documents")
    ax.minorticks_off()
    ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--contexts", type=parse_token_list, default=parse_token_list("2k,8k,32k,64k"))
    parser.add_argument("--index", default=knnmem.memory.DEFAULT_INDEX, help="index spec of the kNN memory")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--target", type=int, default=1024, help="scored tokens per document")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="auto", help="auto (CUDA where available), cpu, cuda or cuda:N")
    args = parser.parse_args()
    model, tokenizer = knnmem.load_pretrained(args.model, args.device)
    if args.target % model.config.max_position_embeddings:
        parser.error(f"--target must be a multiple of the window ({model.config.max_position_embeddings})")
    length = max(args.contexts)
    docs = long_documents(tokenizer, length, args.documents)
    memories = {"dense": {}, f"{args.index} k={args.k}": dict(index=args.index, k=args.k)}
    losses: dict[tuple[str, int], float] = {}
    points = [("local", model.config.max_position_embeddings)] + [(m, c) for c in args.contexts for m in memories]
    with tqdm(total=len(points) * len(docs), desc="perplexity") as bar:
        for name, ids in docs:
            for memory, context in points:
                created = None if memory == "local" else knnmem.Memory.create(model, **memories[memory])
                span = ids[-max(context, args.target + 1) :]
                losses[memory, context] = losses.get((memory, context), 0.0) + target_loss(model, span, args.target, created)
                bar.update()
    scored = args.target * len(docs)
    rows = [dict(memory=m, context=c, perplexity=math.exp(loss / scored)) for (m, c), loss in losses.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perplexity.json").write_text(json.dumps(dict(documents=[n for n, _ in docs], target=args.target,
                                                              rows=rows), indent=1))
    plot(rows, args.out / "perplexity.png")
    local = next(r["perplexity"] for r in rows if r["memory"] == "local")
    print(f"Perplexity of the last {args.target} of the first {length:,} tokens of {len(docs)} held-out documents; "
          f"local window only ({model.config.max_position_embeddings} tokens): {local:.3f}\n")
    print("| memory | " + " | ".join(f"{c:,} tokens" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    for memory in memories:
        values = {r["context"]: r["perplexity"] for r in rows if r["memory"] == memory}
        print(f"| {memory} | " + " | ".join(f"{values[c]:.3f}" for c in args.contexts) + " |")

if __name__ == "__main__":
    main()

"""Sweep memory size and index spec: decode latency, window-prefill throughput, retrieval quality, bytes.

For each memory size, documents of real text (Python standard-library sources, byte tokens) are
encoded once into a dense memory; each index spec then re-indexes those same entries (no model
re-run) and answers the same workload: a prompt window (prefill throughput, recall@k and softmax
mass captured on its real queries) and single-token decode steps. Prints one Markdown row per
operating point and writes a JSON file and a PNG plot.

    python benchmarks/memory_sweep.py --sizes 65536,262144,1048576 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import faiss
import torch

import knnmem
from knnmem.quality import ProbedMemory

DEFAULT_SPECS = [
    "dense",
    "torch",
    "Flat",
    "HNSW32:efSearch=16",
    "HNSW32:efSearch=64",
    "HNSW32:efSearch=256",
    "IVF1024,Flat:nprobe=8",
    "IVF1024,Flat:nprobe=32",
    "IVF1024,Flat:nprobe=128",
    "IVF1024,PQ16:nprobe=32",
]


def demo_model(seed: int = 0) -> knnmem.LongLlamaForCausalLM:
    """A small LongLLaMA with random weights (std 0.1, so attention is far from uniform)."""
    config = knnmem.LongLlamaConfig(
        vocab_size=260, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=256, last_context_length=256, mem_layers=[1, 2], mem_dtype="bfloat16",
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    return knnmem.LongLlamaForCausalLM(config).eval()


def stdlib_documents(total_tokens: int, doc_tokens: int = 4096) -> list[list[int]]:
    """Byte tokens (+1, 0 is padding) of standard-library sources, cut into documents."""
    docs, remaining = [], total_tokens
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        data = path.read_bytes()
        for start in range(0, len(data), doc_tokens):
            piece = [b + 1 for b in data[start : start + min(doc_tokens, remaining)]]
            if len(piece) >= 64:
                docs.append(piece)
                remaining -= len(piece)
            if remaining <= 0:
                return docs
    raise ValueError(f"the standard library holds fewer than {total_tokens} tokens")


def parse_spec(text: str) -> tuple[str, dict]:
    spec, _, params = text.partition(":")
    options = {}
    for item in filter(None, params.split(",")):
        name, _, value = item.partition("=")
        options[name] = int(value)
    return spec, options


def memory_bytes(memory: knnmem.Memory) -> int:
    total = 0
    for layer in memory.layers:
        backend = memory.layer(layer)
        buffer = backend.buffer
        total += buffer.keys.nbytes + buffer.values.nbytes + buffer.valid.nbytes
        for row in getattr(backend, "_rows", []):
            total += sum(faiss.serialize_index(index).nbytes for index in row)
    return total


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def measure(model, source: knnmem.Memory, spec_text: str, k: int, prompt: torch.Tensor, decode_steps: int) -> dict:
    spec, options = parse_spec(spec_text)
    rss_before = rss_bytes()
    start = time.perf_counter()
    memory = ProbedMemory.create(model, index=spec, **({} if spec == "dense" else dict(k=k)), **options)
    memory.extend(source)
    build_s = time.perf_counter() - start
    rss_after = rss_bytes()

    # Prompt window: recall and mass on its real queries (probe on), then timed without the probe.
    model(input_ids=prompt, memory=memory, use_cache=True)
    quality = memory.quality()
    memory.probing = False
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(input_ids=prompt, memory=memory, use_cache=True)
        timings.append(time.perf_counter() - start)
    prefill_tok_s = prompt.shape[1] / min(timings)

    # Decode: one token at a time through the local cache (it holds the prompt; memory is read-only).
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        steps.append(time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps.sort()
    return dict(
        index=spec_text, memory_tokens=len(source), k=None if spec == "dense" else k,
        decode_ms=1000 * steps[len(steps) // 2], prefill_tok_s=prefill_tok_s,
        recall=quality.recall, mass=quality.mass_captured,
        bytes_per_token=memory_bytes(memory) / len(source), rss_gb=(rss_after - rss_before) / 2**30, build_s=build_s,
    )


def markdown(rows: list[dict]) -> str:
    header = "| memory tokens | index | k | decode ms/token | prefill tok/s | recall@k | mass captured | bytes/token | RSS GiB | build s |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['memory_tokens']:,} | {r['index']} | {r['k'] or 'all'} | {r['decode_ms']:.1f} | {r['prefill_tok_s']:,.0f} "
            f"| {r['recall']:.3f} | {r['mass']:.3f} | {r['bytes_per_token']:,.0f} | {r['rss_gb']:.2f} | {r['build_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index in dict.fromkeys(r["index"] for r in rows):
        points = sorted((r["memory_tokens"], r["decode_ms"], r["recall"]) for r in rows if r["index"] == index)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=index)
        right.scatter([p[1] for p in points], [p[2] for p in points], label=index)
    left.set(xscale="log", yscale="log", xlabel="memory tokens", ylabel="decode ms / token", title="Decode latency")
    right.set(xscale="log", xlabel="decode ms / token", ylabel="recall@k (real queries)", title="Recall vs latency")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536,262144,1048576", help="memory sizes in tokens, comma-separated")
    parser.add_argument("--index", action="append", help="index spec, SPEC[:param=value,...] (repeatable)")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    specs = args.index or DEFAULT_SPECS
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "memory_sweep.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["memory_tokens"], r["index"]) for r in rows}
    model = demo_model()
    prompt = torch.tensor([stdlib_documents(4096 * 4, 4096)[-1][: model.config.max_position_embeddings]])
    for size in (int(s) for s in args.sizes.split(",")):
        if all((size, s) in done for s in specs):
            continue
        source = knnmem.Memory.create(model)
        knnmem.encode_documents(model, stdlib_documents(size), source)
        for spec in specs:
            if (len(source), spec) in done:
                continue
            rows.append(measure(model, source, spec, args.k, prompt, args.decode_steps))
            results_path.write_text(json.dumps(rows, indent=1))  # resumable: finished points are kept
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        del source
    print(markdown(rows))
    plot(rows, args.out / "memory_sweep.png")


if __name__ == "__main__":
    main()

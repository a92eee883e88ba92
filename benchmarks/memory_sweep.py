"""Sweep memory size and index spec: decode latency, window-prefill throughput, retrieval quality, bytes.

For each memory size, documents of real text (Python standard-library sources) are encoded once by
the shipped model (or `--model DIR`) into a dense memory; each index spec then re-indexes those same
entries (no model re-run) and answers the same workload: a prompt window (prefill throughput, recall@k and softmax
mass captured on its real queries) and single-token decode steps. Prints one Markdown row per
operating point and writes a JSON file and a PNG plot.

    python benchmarks/memory_sweep.py --sizes 65536,262144,1048576 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import SHIPPED_MODEL, memory_config, rss_bytes, stdlib_documents

import knnmem
from knnmem.eval.quality import RetrievalProbe
from knnmem.plotting import pyplot

# index spec -> search-parameter settings measured on the one built index
DEFAULT_SPECS = {
    "dense": [{}],
    "torch": [{}],
    "Flat": [{}],
    "HNSW32": [dict(efSearch=16), dict(efSearch=64), dict(efSearch=256)],
    "IVF1024,Flat": [dict(nprobe=8), dict(nprobe=32), dict(nprobe=128)],
    "IVF1024,Flat+l2": [dict(nprobe=8), dict(nprobe=32), dict(nprobe=128)],
    "IVF1024,PQ16x4fs": [dict(nprobe=32)],
    "IVF1024,PQ17+l2@bfloat16/pq4-keys": [dict(nprobe=32)],
}


def parse_spec(text: str) -> tuple[str, list[dict]]:
    """"SPEC" or "SPEC:name=v,name=v;name=v" (settings separated by ';') -> (spec, settings)."""
    spec, _, params = text.partition(":")
    settings = []
    for setting in params.split(";"):
        pairs = (item.partition("=") for item in filter(None, setting.split(",")))
        settings.append({name: int(value) for name, _, value in pairs})
    return spec, settings


def label(spec: str, params: dict) -> str:
    return spec + "".join(f" {name}={value}" for name, value in params.items())


@torch.no_grad()
def measure(model, spec: str, memory: knnmem.Memory, probe: RetrievalProbe, params: dict, prompt: torch.Tensor,
            decode_steps: int) -> dict:
    """Quality, prefill and decode of one operating point; `memory` is read, never written."""
    if params:
        memory.set_search_params(**params)
    entries = len(memory)
    probe.reset()
    probe.enabled = True
    model(input_ids=prompt, memory=memory, use_cache=True, last_context_length=prompt.shape[1])  # all in the cache
    quality = probe.quality()
    probe.enabled = False
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(input_ids=prompt, memory=memory, use_cache=True, last_context_length=prompt.shape[1])
        timings.append(time.perf_counter() - start)
    cache, token, steps = out.cache, out.logits[:, -1:].argmax(-1), []
    for _ in range(decode_steps):
        start = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True)
        steps.append(time.perf_counter() - start)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    if len(memory) != entries:
        raise RuntimeError(f"the workload wrote {len(memory) - entries} entries to the memory it measures")
    return dict(
        index=label(spec, params),
        memory_tokens=len(memory), k=None if memory.index == "dense" else memory.k,
        decode_ms=1000 * sorted(steps)[len(steps) // 2], prefill_tok_s=prompt.shape[1] / min(timings),
        recall=quality.recall, mass=quality.mass_captured, bytes_per_token=memory.nbytes / len(memory),
    )


def build(model, source: knnmem.Memory, spec: str, k: int) -> tuple[knnmem.Memory, RetrievalProbe, dict]:
    """Re-index `source` under `spec`: "INDEX[+l2][@CODEC][-keys]", where "+l2" asks for the inner-product-to-L2
    reduction (else none), "@CODEC" stores entries with that codec and "-keys" keeps no keys beside the index
    (recall is then judged by `source`'s keys)."""
    rss_before, start = rss_bytes(), time.perf_counter()
    spec, codec, keep_keys = memory_config(spec)
    index, l2 = spec.removesuffix("+l2"), spec.endswith("+l2")
    options = {} if index == "dense" else dict(k=k) if index == "torch" else dict(k=k, l2_reduction=l2)
    memory = knnmem.Memory.create(model, index=index, codec=codec, keep_keys=keep_keys, **options)
    memory.extend(source)
    cost = dict(build_s=time.perf_counter() - start, rss_gb=(rss_bytes() - rss_before) / 2**30)
    return memory, RetrievalProbe(memory, reference=source if not keep_keys or codec else None), cost


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
    plt = pyplot()
    import matplotlib.ticker

    fig, (decode, prefill, recall) = plt.subplots(1, 3, figsize=(16, 4.5))
    indexes = list(dict.fromkeys(r["index"] for r in rows))
    for i, index in enumerate(indexes):
        color = plt.cm.tab20(i % 20)
        points = sorted((r["memory_tokens"], r["decode_ms"], r["prefill_tok_s"], r["recall"])
                        for r in rows if r["index"] == index)
        sizes = [p[0] for p in points]
        decode.plot(sizes, [p[1] for p in points], marker="o", color=color, label=index)
        prefill.plot(sizes, [p[2] for p in points], marker="o", color=color, label=index)
        recall.scatter([p[1] for p in points], [p[3] for p in points], color=color, label=index)
    decode.set(yscale="log", ylabel="decode ms / token", title="Decode latency")
    prefill.set(yscale="log", ylabel="window prefill tokens / s", title="Prefill throughput")
    recall.set(xscale="log", xlabel="decode ms / token", ylabel="recall@k (real queries)", title="Recall vs latency")
    sizes = sorted({r["memory_tokens"] for r in rows})
    for axis in (decode, prefill):
        axis.set(xscale="log", xlabel="memory tokens")
        axis.minorticks_off()
        axis.set_xticks(sizes, [f"{size // 1024:,}k" if size < 1 << 20 else f"{size / (1 << 20):g}M" for size in sizes])
    for axis in (decode.yaxis, prefill.yaxis, recall.xaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    decode.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536,262144,1048576", help="memory sizes in tokens, comma-separated")
    parser.add_argument(
        "--index", action="append", help="index spec with search settings, e.g. 'HNSW32:efSearch=16;efSearch=64' or "
        "'IVF1024,PQ17+l2@bfloat16/pq4-keys:nprobe=32' (codec after @, -keys: no keys kept; see `build`; repeatable)"
    )
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    specs = dict(parse_spec(text) for text in args.index) if args.index else DEFAULT_SPECS
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "memory_sweep.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["memory_tokens"], r["index"]) for r in rows}
    model, tokenizer = knnmem.load_pretrained(args.model, "cpu")
    # The prompt leaves room in the local window for the decode steps, so nothing is written to memory.
    prompt_length = model.config.max_position_embeddings - args.decode_steps
    prompt = torch.tensor([stdlib_documents(tokenizer, 4096 * 4, 4096)[-1][:prompt_length]])
    for size in (int(s) for s in args.sizes.split(",")):
        todo = {spec: [p for p in settings if (size, label(spec, p)) not in done] for spec, settings in specs.items()}
        if not any(todo.values()):
            continue
        source = knnmem.Memory.create(model)
        knnmem.encode_documents(model, stdlib_documents(tokenizer, size), source)
        for spec, settings in todo.items():
            if not settings:
                continue
            memory, probe, cost = build(model, source, spec, args.k)
            for params in settings:
                rows.append({**measure(model, spec, memory, probe, params, prompt, args.decode_steps), **cost})
                results_path.write_text(json.dumps(rows, indent=1))  # resumable: finished points are kept
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
            del memory
        del source
    print(markdown(rows))
    plot(rows, args.out / "memory_sweep.png")


if __name__ == "__main__":
    main()

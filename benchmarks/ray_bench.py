"""Sharded memory on Ray, on the shipped model's geometry: per-token decode latency of a 1M-token memory held
in one process or split over Ray actors (by documents: 2 and 4 shards; by key/value head: 4 actors), with
the breakdown of each memory search, then indexing throughput with 1 and 2 Ray workers.

    python benchmarks/ray_bench.py --out benchmarks/results

The memory's keys and values are random Gaussian vectors (the shipped model has one memory layer with 4
key/value heads of 32 dimensions, float32); the queries are the model's own while it generates. Indexing
encodes real text (standard-library sources) with the shipped model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import SHIPPED_MODEL, stdlib_documents
from transformers import StoppingCriteria, StoppingCriteriaList

import knnmem
from knnmem.cluster.actors import RayShards, ShardActor, pack
from knnmem.cluster.indexing import encode_in_tasks
from knnmem.ingest.encode import encode_shard, split_documents
from knnmem.store.shards import sharded_writer

CHUNK = 1 << 16  # entries generated (and added) at a time; chunk c is the same random data in every layout


def add_random(memory: knnmem.Memory, chunks: range) -> None:
    for c in chunks:
        generator = torch.Generator().manual_seed(c)
        keys, values = (torch.randn(1, memory.num_heads, CHUNK, memory.head_dim, generator=generator) for _ in "kv")
        for layer in memory.layers:
            memory.add(layer, keys, values, torch.ones(1, CHUNK, dtype=torch.bool))


def build(model, spec: str, path: Path, chunks: int, shards: int) -> None:
    """A store of `chunks` random chunks under `spec`, in `shards` shards (1: a store without shards)."""
    if shards == 1:
        memory = knnmem.Memory.create(model, index=spec, k=128)
        add_random(memory, range(chunks))
        memory.save(path)
        return
    with sharded_writer(path, shards) as directories:
        per_shard = chunks // shards
        for i, directory in enumerate(directories):
            memory = knnmem.Memory.create(model, index=spec, k=128)
            add_random(memory, range(i * per_shard, (i + 1) * per_shard))
            memory.save(directory)


class TokenClock(StoppingCriteria):
    """Notes when each token is generated (generation calls its stopping criteria once per token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.no_grad()
def decode_ms(model, memory, prompt: torch.Tensor, tokens: int) -> float:
    """Median milliseconds between consecutive generated tokens (the first, which follows the prompt, excluded)."""
    memory.reset()  # the overlay of a read-only memory
    model.generate(prompt, memory=memory, max_new_tokens=2, do_sample=False)  # warm: indexes read, actors searched
    memory.reset()
    clock = TokenClock()
    model.generate(prompt, memory=memory, max_new_tokens=1 + tokens, min_new_tokens=1 + tokens, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([clock]))
    return 1000 * statistics.median(b - a for a, b in zip(clock.times, clock.times[1:]))


def serialization_ms(request: tuple, reply: tuple, reps: int = 50) -> float:
    """Pickling and unpickling one request and one reply, as Ray does for these Python objects (cloudpickle, protocol
    5), median of `reps`."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for payload in (request, reply):
            ray.cloudpickle.loads(ray.cloudpickle.dumps(payload, protocol=5))
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def search_breakdown(memory, layer: int, queries: torch.Tensor, reps: int) -> dict:
    """Per search (one token of one memory layer, every head): wall time in this process and, for Ray shards, the
    slowest shard's own search, the serialization of every shard's request and reply, and the rest (Ray's call)."""
    heads, walls, searches, trips = slice(0, memory.num_heads), [], [], []
    memory.search(layer, queries, heads)
    for _ in range(reps):
        start = time.perf_counter()
        memory.search(layer, queries, heads)
        walls.append(1000 * (time.perf_counter() - start))
        if not isinstance(getattr(memory, "shards", None), RayShards):
            searches.append(walls[-1])  # in this process: the search is all there is
        else:
            trip, shard_s = memory.shards.last_call
            trips.append(1000 * trip)
            searches.append(1000 * max(shard_s))
    row = dict(search_ms=statistics.median(walls), shard_search_ms=statistics.median(searches))
    if trips:
        hits = memory.shards.search(layer, queries, heads, k=memory.k, search_params=memory.search_params())[0]
        request = (layer, pack(queries), heads, memory.k, memory.search_params())  # as RayShards sends them
        row["serialization_ms"] = len(memory.shards.sizes) * serialization_ms(request, (tuple(map(pack, hits)), 0.0))
        row["reply_bytes"] = sum(t.numel() * t.element_size() for t in hits if t is not None)
        row["ray_call_ms"] = statistics.median(trips) - row["shard_search_ms"] - row["serialization_ms"]
    return row


def by_head_breakdown(model, store: Path, layer: int, queries: torch.Tensor, reps: int) -> dict:
    """The other split: one actor per key/value head, each holding the whole memory and searching its head only."""
    config, fingerprint = model.config, knnmem.store.model_fingerprint(model)
    heads = config.num_key_value_heads
    actors = [ShardActor.remote(str(store), config, fingerprint, False) for _ in range(heads)]
    params = knnmem.Memory.load(store, model=model).search_params()

    def call():
        start = time.perf_counter()
        answers = ray.get([actor.search.remote(layer, pack(queries[:, h:h + 1]), slice(h, h + 1), 128, params)
                           for h, actor in enumerate(actors)])
        return 1000 * (time.perf_counter() - start), 1000 * max(seconds for _, seconds in answers), answers

    call()
    trips, searches = zip(*[call()[:2] for _ in range(reps)])
    answers = call()[2]
    request = (layer, pack(queries[:, :1]), slice(0, 1), 128, params)
    row = dict(search_ms=statistics.median(trips), shard_search_ms=statistics.median(searches),
               serialization_ms=heads * serialization_ms(request, answers[0]),
               reply_bytes=sum(p[0].nbytes for p in answers[0][0] if p is not None))
    row["ray_call_ms"] = row["search_ms"] - row["shard_search_ms"] - row["serialization_ms"]
    for actor in actors:
        ray.kill(actor)
    return row


def indexing_rates(model, tokenizer, work: Path, tokens: int, spec: str) -> dict:
    """Tokens per second encoding a corpus into 2 shards: in this process, then by Ray tasks with 1 and 2 workers."""
    docs = stdlib_documents(tokenizer, tokens)
    ranges = split_documents([len(d) for d in docs], 2)

    def jobs(directories):
        return [([docs[i] for i in r], [str(i) for i in r], d) for r, d in zip(ranges, directories)]

    def timed(index):
        target = work / "indexed"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        with sharded_writer(target, 2) as directories:
            index(jobs(directories))
        return tokens / (time.perf_counter() - start)

    rates = {"this process (2 threads)": timed(lambda js: [encode_shard(model, *j, index=spec) for j in js])}
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        warm = [(d[:1], n[:1], p) for d, n, p in jobs([work / "warm-a", work / "warm-b"])]
        encode_in_tasks(model, warm, index="dense")  # start the workers and import knnmem in them
        rates[f"Ray, {workers} worker{'s' * (workers > 1)} (1 thread each)"] = timed(
            lambda js: encode_in_tasks(model, js, index=spec))
        ray.shutdown()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--index", action="append", help="index spec (repeatable; default IVF1024,Flat and Flat)")
    parser.add_argument("--chunks", type=int, default=16, help=f"memory size in chunks of {CHUNK:,} entries")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens timed per layout")
    parser.add_argument("--reps", type=int, default=30, help="searches timed per layout")
    parser.add_argument("--index-tokens", type=int, default=1 << 17, help="corpus tokens for indexing throughput")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    specs = args.index or ["IVF1024,Flat", "Flat"]
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="knnmem-ray-bench-"))
    model, tokenizer = knnmem.load_pretrained(args.model, "cpu")
    layer = model.config.mem_layers[0]
    prompt = torch.tensor([stdlib_documents(tokenizer, 64)[0][:64]])
    queries = torch.randn(1, model.config.num_key_value_heads, 1, model.config.head_dim)
    rows = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for spec in specs:
        name = spec.replace(",", "_")
        for shards in (1, 2, 4):
            build(model, spec, work / f"{name}-{shards}", args.chunks, shards)
        layouts = [("one process, 1 store", 1, False), ("one process, 2 shards in turn", 2, False),
                   ("Ray, 2 shard actors", 2, True), ("Ray, 4 shard actors", 4, True)]
        for label, shards, on_ray in layouts:
            with knnmem.Memory.load(work / f"{name}-{shards}", model=model, ray=on_ray) as memory:
                row = dict(index=spec, layout=label, entries=len(memory), decode_ms=decode_ms(model, memory, prompt, args.tokens),
                           **search_breakdown(memory, layer, queries, args.reps))
            rows.append(row)
            print(row, flush=True)
        row = dict(index=spec, layout="Ray, 4 actors by key/value head", entries=args.chunks * CHUNK, decode_ms=None,
                   **by_head_breakdown(model, work / f"{name}-1", layer, queries, args.reps))
        rows.append(row)
        print(row, flush=True)
        for shards in (1, 2, 4):
            shutil.rmtree(work / f"{name}-{shards}")
    ray.shutdown()
    rates = indexing_rates(model, tokenizer, work, args.index_tokens, knnmem.memory.DEFAULT_INDEX)
    shutil.rmtree(work)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_bench.json").write_text(json.dumps(dict(rows=rows, indexing_tok_s=rates), indent=1))
    fmt = lambda v, spec=".2f": "—" if v is None else format(v, spec)  # noqa: E731
    lines = [f"Memory of {args.chunks * CHUNK:,} random entries (1 memory layer, 4 KV heads x 32 dims, float32), "
             f"k=128; {args.tokens} generated tokens, {args.reps} searches per row (medians)", "",
             "| index | layout | decode ms/token | memory search ms | shard search ms | serialization ms "
             "| Ray call ms | reply bytes/shard |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['layout']} | {fmt(r['decode_ms'])} | {fmt(r['search_ms'])} "
                     f"| {fmt(r['shard_search_ms'])} | {fmt(r.get('serialization_ms'))} | {fmt(r.get('ray_call_ms'))} "
                     f"| {fmt(r.get('reply_bytes'), ',')} |")
    lines += ["", f"Indexing {args.index_tokens:,} tokens into 2 shards ({knnmem.memory.DEFAULT_INDEX}), shipped model:",
              "", "| encoded by | tokens/s |", "|---|---|"]
    lines += [f"| {where} | {rate:,.0f} |" for where, rate in rates.items()]
    (args.out / "ray_bench.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Large stores on the shipped model: indexing throughput next to the plain forward pass, then, for each corpus
size, bytes on disk per memory token, save time, and in a fresh process the time to open the store, resident
memory after opening and after the first query, and decode speed (ms per generated token); finally bytes on disk
per memory token for each index type and codec on a small corpus.

One memory is built for the largest size and saved at each smaller size on the way (so the sizes share their
first entries). Corpus: standard-library sources, then the installed packages' Python sources.

    python benchmarks/store_bench.py --sizes 1M,10M --index IVF1024,PQ17 --codec bfloat16/pq4 --keep-keys false
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SHIPPED_MODEL, stdlib_documents

import knnmem
from knnmem.ingest import stdlib_texts
from knnmem.cli import _parse_bool, parse_token_list

# (index, codec, keep_keys) of the bytes-on-disk table
DISK_CONFIGS = [("dense", None, True), ("Flat", None, True), ("HNSW32", None, True), ("IVF1024,Flat", None, True),
                ("IVF1024,Flat", "bfloat16/pq4", False), ("IVF1024,PQ16x4fs", "bfloat16/pq4", False),
                ("IVF1024,PQ17", "bfloat16/pq4", False), ("IVF1024,PQ16x10", "bfloat16/pq2", False)]

OPEN_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from common import rss_bytes
import knnmem
torch.set_num_threads({threads})
model = knnmem.LongLlamaForCausalLM.from_pretrained({model!r}).eval()
query = torch.tensor([{query!r}])
before = rss_bytes()
start = time.perf_counter()
memory = knnmem.Memory.load({store!r}, model=model)
open_s = time.perf_counter() - start
after_open = rss_bytes()
with torch.no_grad():
    start = time.perf_counter()
    model(query, memory=memory, use_cache=True, last_context_length=query.shape[1])
    query_s = time.perf_counter() - start
    after_query = rss_bytes()
    prompt = query[:, -64:]
    def generate(tokens):
        memory.reset()  # the overlay of the previous generation
        searched, start = memory.search_seconds, time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, memory=memory)
        return time.perf_counter() - start, memory.search_seconds - searched
    generate(2)
    (short, short_search), (long, long_search) = (min(generate(n) for _ in range(3)) for n in (1, {decode} + 1))
print(json.dumps(dict(entries=len(memory), open_s=open_s, rss_open_mb=(after_open - before) / 2**20,
                      rss_query_mb=(after_query - before) / 2**20, first_query_s=query_s,
                      rss_decode_mb=(rss_bytes() - before) / 2**20, decode_ms=1000 * (long - short) / {decode},
                      search_ms=1000 * (long_search - short_search) / {decode})))
"""


@torch.no_grad()
def throughput(model, docs) -> float:
    start = time.perf_counter()
    for tokens in docs:
        model(torch.tensor([tokens]), use_cache=False)
    return sum(map(len, docs)) / (time.perf_counter() - start)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def opened(model: Path, store: Path, query: list[int], decode: int, threads: int) -> dict:
    """Open `store` in a fresh process: time, resident memory, first query and decode speed."""
    script = OPEN_SCRIPT.format(bench=str(Path(__file__).parent), model=str(model), store=str(store), query=query,
                                decode=decode, threads=threads)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"opening {store} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--sizes", type=parse_token_list, default=parse_token_list("1M"), help="corpus sizes in tokens")
    parser.add_argument("--index", default=knnmem.memory.DEFAULT_INDEX, help="index spec of the large stores")
    parser.add_argument("--codec", default=None, help="codec of the large stores")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: knnmem's, nlist/32)")
    parser.add_argument("--keep-keys", type=_parse_bool, default=True, help="the large stores keep full keys")
    parser.add_argument("--forward-tokens", type=int, default=1 << 18, help="tokens of the plain forward timing")
    parser.add_argument("--disk-tokens", type=int, default=1 << 16, help="corpus size for bytes on disk per spec")
    parser.add_argument("--decode", type=int, default=32, help="tokens generated to time decoding")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads when opened")
    parser.add_argument("--work", type=Path, default=None, help="directory for the stores (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reopen", type=Path, nargs="+", default=None, metavar="STORE",
                        help="only open these stores again, each in a fresh process, and print what opening them costs")
    args = parser.parse_args()
    model, tokenizer = knnmem.load_pretrained(args.model, "cpu")
    query = tokenizer(stdlib_texts("heldout")[0][1])["input_ids"][:512]  # text of none of the stores
    if args.reopen:
        for store in args.reopen:
            print(json.dumps(dict(store=str(store), **opened(args.model, store, query, args.decode, args.threads))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="knnmem-bench-"))
    plain, _ = knnmem.load_pretrained(args.model, "cpu", mem_layers=[])  # same weights, no memory layers
    sizes = sorted(args.sizes)
    docs = stdlib_documents(tokenizer, sizes[-1], packages=True)
    plain_tok_s = throughput(plain, stdlib_documents(tokenizer, args.forward_tokens))

    probes = {} if args.nprobe is None else {"nprobe": args.nprobe}
    memory = knnmem.Memory.create(model, index=args.index, k=128, codec=args.codec, keep_keys=args.keep_keys, **probes)
    config = (f"{args.index}" + (f" nprobe={args.nprobe}" if probes else "") + (f" {args.codec}" if args.codec else "")
              + ("" if args.keep_keys else " no keys"))
    rows, done, encode_s = [], 0, 0.0
    for size in sizes:
        chunk, total = [], len(memory)
        while done < len(docs) and total < size:
            chunk.append(docs[done])
            total, done = total + len(docs[done]), done + 1
        start = time.perf_counter()
        knnmem.encode_documents(model, chunk, memory, names=[f"doc{i}" for i in range(done - len(chunk), done)])
        encode_s += time.perf_counter() - start
        store = work / f"store-{size}"
        start = time.perf_counter()
        memory.save(store)
        save_s = time.perf_counter() - start
        row = dict(config=config, tokens=len(memory), index_tok_s=len(memory) / encode_s, save_s=save_s,
                   disk_bytes_per_token=directory_bytes(store) / len(memory),
                   **opened(args.model, store, query, args.decode, args.threads))
        rows.append(row)
        print(json.dumps(row), flush=True)
    del memory

    small = knnmem.Memory.create(model)
    knnmem.encode_documents(model, stdlib_documents(tokenizer, args.disk_tokens), small, progress=False)
    disk = []
    for spec, codec, keep_keys in DISK_CONFIGS:
        target = work / f"disk-{spec.replace(',', '_')}-{codec}-{keep_keys}".replace("/", "_")
        built = small if spec == "dense" else small.reindex(spec, k=128, codec=codec, keep_keys=keep_keys)
        built.save(target)
        disk.append(dict(index=spec, codec=built.codec, keep_keys=keep_keys, bytes=directory_bytes(target) / len(small)))

    result = dict(plain_tok_s=plain_tok_s, sizes=rows, disk=disk, disk_tokens=len(small))
    (args.out / "store_bench.json").write_text(json.dumps(result, indent=1))
    print(f"| memory | corpus tokens | bytes on disk / token | indexing tok/s (vs forward {plain_tok_s:,.0f}) | save s "
          "| open s | RSS after open MiB | RSS after first query MiB | first query s | decode ms/token | of it searching |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['tokens']:,} | {r['disk_bytes_per_token']:,.0f} | {r['index_tok_s']:,.0f} "
              f"({r['index_tok_s'] / plain_tok_s:.2f}) | {r['save_s']:.1f} | {r['open_s']:.3f} | {r['rss_open_mb']:.0f} "
              f"| {r['rss_query_mb']:.0f} | {r['first_query_s']:.2f} | {r['decode_ms']:.1f} | {r['search_ms']:.1f} |")
    print(f"\n| index spec | codec | keys kept | bytes on disk per memory token ({len(small):,} tokens) |\n|---|---|---|---|")
    for d in disk:
        print(f"| {d['index']} | {d['codec']} | {d['keep_keys']} | {d['bytes']:,.0f} |")


if __name__ == "__main__":
    main()

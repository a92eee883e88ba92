"""Store benchmark on the shipped model: indexing throughput next to plain forward throughput,
opening a large store (time and resident memory), and bytes on disk per memory token for each index type.

    python benchmarks/store_bench.py --tokens 1048576 --out benchmarks/results
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

DISK_SPECS = ["dense", "Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ16x4fs"]

OPEN_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from common import rss_bytes
import knnmem
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
print(json.dumps(dict(entries=len(memory), open_s=open_s, rss_open_mb=(after_open - before) / 2**20,
                      rss_query_mb=(rss_bytes() - before) / 2**20, first_query_s=query_s)))
"""


@torch.no_grad()
def throughput(model, docs) -> float:
    start = time.perf_counter()
    for tokens in docs:
        model(torch.tensor([tokens]), use_cache=False)
    return sum(map(len, docs)) / (time.perf_counter() - start)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--index", default=knnmem.memory.DEFAULT_INDEX, help="index spec of the large store")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="corpus size for indexing and opening")
    parser.add_argument("--disk-tokens", type=int, default=1 << 16, help="corpus size for bytes on disk per spec")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="knnmem-bench-"))
    model, tokenizer = knnmem.load_pretrained(args.model, "cpu")
    plain, _ = knnmem.load_pretrained(args.model, "cpu", mem_layers=[])  # same weights, no memory layers
    docs = stdlib_documents(tokenizer, args.tokens)

    plain_tok_s = throughput(plain, docs)
    memory = knnmem.Memory.create(model, index=args.index, k=128)
    start = time.perf_counter()
    knnmem.encode_documents(model, docs, memory, names=[f"doc{i}" for i in range(len(docs))])
    index_tok_s = len(memory) / (time.perf_counter() - start)
    start = time.perf_counter()
    memory.save(work / "store")
    save_s = time.perf_counter() - start
    del memory

    script = OPEN_SCRIPT.format(bench=str(Path(__file__).parent), model=str(args.model),
                                store=str(work / "store"), query=docs[-1][:200])
    opened = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])

    small = knnmem.Memory.create(model)
    knnmem.encode_documents(model, stdlib_documents(tokenizer, args.disk_tokens), small, progress=False)
    disk = {}
    for spec in DISK_SPECS:
        target = work / f"disk-{spec.replace(',', '_')}"
        (small if spec == "dense" else small.reindex(spec, k=128)).save(target)
        disk[spec] = directory_bytes(target) / len(small)

    result = dict(index=args.index, tokens=opened["entries"], plain_tok_s=plain_tok_s, index_tok_s=index_tok_s, save_s=save_s,
                  **opened, disk_bytes_per_token=disk, disk_tokens=len(small))
    (args.out / "store_bench.json").write_text(json.dumps(result, indent=1))
    print(f"| corpus tokens | plain forward tok/s | indexing tok/s ({args.index}) | ratio | save s | open s "
          f"| RSS after open MiB | RSS after first query MiB | first query s |\n|---|---|---|---|---|---|---|---|---|\n"
          f"| {result['tokens']:,} | {plain_tok_s:,.0f} | {index_tok_s:,.0f} | {index_tok_s / plain_tok_s:.2f} "
          f"| {save_s:.1f} | {opened['open_s']:.3f} | {opened['rss_open_mb']:.0f} | {opened['rss_query_mb']:.0f} "
          f"| {opened['first_query_s']:.2f} |")
    print(f"\n| index spec | bytes on disk per memory token ({len(small):,} tokens) |\n|---|---|")
    for spec, size in disk.items():
        print(f"| {spec} | {size:,.0f} |")


if __name__ == "__main__":
    main()

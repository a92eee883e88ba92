"""What Faiss's OpenMP threads cost the model: the plain forward pass of the shipped model, timed in a fresh process
before and after Faiss searches run in a thread pool, once with each worker left at OpenMP's default thread count
and once in knnmem's pool (whose workers set it to one; see `knnmem.memory.faiss_index`).

    python benchmarks/openmp_threads.py --tokens 65536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# knnmem imports torch before Faiss, which makes torch's OpenMP runtime the one both use.
SCRIPT = """
import sys, time, json
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {bench!r})
import knnmem
import faiss, numpy as np, torch
from common import SHIPPED_MODEL, stdlib_documents
from knnmem.memory import faiss_index

plain, tokenizer = knnmem.load_pretrained(SHIPPED_MODEL, "cpu", mem_layers=[])
documents = stdlib_documents(tokenizer, {tokens})

def tokens_per_second():
    with torch.no_grad():
        start = time.perf_counter()
        for tokens in documents:
            plain(torch.tensor([tokens]), use_cache=False)
        return sum(map(len, documents)) / (time.perf_counter() - start)

tokens_per_second()  # warm-up
before = max(tokens_per_second() for _ in range(3))
quantizer = faiss.IndexFlatL2(64)
quantizer.add(np.random.default_rng(0).random((1024, 64), dtype=np.float32))
keys = np.random.default_rng(1).random((4096, 64), dtype=np.float32)
pool = faiss_index._POOL if {pool!r} == "knnmem" else ThreadPoolExecutor(faiss_index._POOL._max_workers)
list(pool.map(lambda _: quantizer.search(keys, 1), range(8)))
print(json.dumps(dict(before=before, after=max(tokens_per_second() for _ in range(3)))))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 16, help="tokens of each forward timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = {}
    for pool in ("default", "knnmem"):
        script = SCRIPT.format(bench=str(Path(__file__).parent), tokens=args.tokens, pool=pool)
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        rows[pool] = json.loads(run.stdout.strip().splitlines()[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openmp_threads.json").write_text(json.dumps(rows, indent=1))
    print("plain forward tokens/s (best of 3), before and after Faiss searches in a pool of a worker per core\n")
    print("| pool workers' OpenMP threads | before | after | after / before |")
    print("|---|---|---|---|")
    for pool, row in rows.items():
        label = "OpenMP's default (all cores)" if pool == "default" else "knnmem's pool (one)"
        print(f"| {label} | {row['before']:,.0f} | {row['after']:,.0f} | {row['after'] / row['before']:.2f} |")


if __name__ == "__main__":
    main()

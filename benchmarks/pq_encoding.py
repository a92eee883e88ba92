"""How long Faiss takes to encode a vector into product-quantizer codes, by sub-vector width and code bits, on one
thread: what decides the padded layout of reduced keys (`knnmem.memory.faiss_index.reduced_widths`).

    python benchmarks/pq_encoding.py --sub-quantizers 16 --widths 1,2,3,4,5,6,8 --bits 8,10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np


def encode_us(sub_quantizers: int, width: int, bits: int, vectors: int, rng: np.random.Generator) -> float:
    """Microseconds per vector for `ProductQuantizer.compute_codes`, trained on 40 points per centroid."""
    dim = sub_quantizers * width
    train = rng.standard_normal((40 * 2**bits, dim)).astype(np.float32)
    pq = faiss.ProductQuantizer(dim, sub_quantizers, bits)
    pq.cp.niter = 10
    pq.train(train)
    queries = rng.standard_normal((vectors, dim)).astype(np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        pq.compute_codes(queries)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sub-quantizers", type=int, default=16)
    parser.add_argument("--widths", default="1,2,3,4,5,6,8,12,16", help="sub-vector dimensions")
    parser.add_argument("--bits", default="8,10", help="bits per sub-quantizer code")
    parser.add_argument("--vectors", type=int, default=2048, help="vectors encoded per timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    widths, bits = [int(w) for w in args.widths.split(",")], [int(b) for b in args.bits.split(",")]
    table = {b: {w: encode_us(args.sub_quantizers, w, b, args.vectors, rng) for w in widths} for b in bits}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pq_encoding.json").write_text(json.dumps(dict(sub_quantizers=args.sub_quantizers, us_per_vector={
        str(b): {str(w): us for w, us in row.items()} for b, row in table.items()}), indent=1))
    print(f"µs to encode one vector, {args.sub_quantizers} sub-quantizers, one thread\n")
    print("| sub-vector dimensions | " + " | ".join(f"{b}-bit codes" for b in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for w in widths:
        print(f"| {w} | " + " | ".join(f"{table[b][w]:.1f}" for b in bits) + " |")


if __name__ == "__main__":
    main()

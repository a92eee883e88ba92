#!/bin/sh
# The compression measurements of the README, one after the other (each writes its own results directory).
set -e
cd "$(dirname "$0")/.."
BIN=.venv/bin
$BIN/python benchmarks/store_bench.py --sizes 1M,10M --index IVF1024,PQ16x10 --codec bfloat16/pq2 --keep-keys false \
    --threads 1 --work /tmp/knnmem-large --out benchmarks/results/store_bench
$BIN/python benchmarks/compression.py --tokens 65536 --text-tokens 2048 --out benchmarks/results/compression-64k
$BIN/python benchmarks/compression.py --tokens 1048576 --text-tokens 1024 --config IVF1024,Flat@float32 \
    --config "IVF1024,PQ16x10@bfloat16/pq2-keys" --config "IVF1024,PQ17@bfloat16/pq4-keys" \
    --out benchmarks/results/compression-1M

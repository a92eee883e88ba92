#!/bin/sh
# Pass key with the recommended compressed memory, at the prompts (seeds) of the README's uncompressed table.
set -e
cd "$(dirname "$0")/.."
for spec in "64k 10" "256k 5"; do
    set -- $spec
    .venv/bin/knnmem passkey --model model/tiny --lengths "$1" --index IVF1024,PQ17 --codec bfloat16/pq4 \
        --keep-keys false --exact-up-to 1 --trials "$2" --report "benchmarks/results/passkey_compressed/$1"
done

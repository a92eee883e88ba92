#!/bin/sh
# Pass key at 64k tokens with compressed memories, at the prompts (seeds) of the README's uncompressed table:
# the recommended configuration, then its keys and its values compressed alone.
set -e
cd "$(dirname "$0")/.."
run() {
    .venv/bin/knnmem passkey --model model/tiny --lengths 64k --index "$1" --codec "$2" --keep-keys false \
        --exact-up-to 1 --trials "$3" --report "benchmarks/results/passkey_compressed/$4"
}
[ -f benchmarks/results/passkey_compressed/64k/passkey.json ] || run IVF1024,PQ17 bfloat16/pq4 10 64k
run IVF1024,PQ17 bfloat16 5 64k-keys-only
run IVF1024,Flat bfloat16/pq4 5 64k-values-only
.venv/bin/knnmem passkey --model model/tiny --lengths 64k --index IVF1024,Flat --codec int8 --exact-up-to 1 --trials 5 \
    --report benchmarks/results/passkey_compressed/64k-int8
# The recommended configuration since entries are ranked by inner product, and its keys compressed alone.
run IVF1024,PQ16x10 bfloat16/pq2 5 64k-pq16x10
run IVF1024,PQ16x10 bfloat16 5 64k-pq16x10-keys-only
# Since the worst-coded 0.1% of keys and values are kept exactly: the recommended configuration again, at 64k and,
# at the prompts of the uncompressed 256k runs (one trial per seed), at 256k.
run IVF1024,PQ16x10 bfloat16/pq2 5 64k-pq16x10-pq2-exact
for seed in 0 1 2 3 4; do
    .venv/bin/knnmem passkey --model model/tiny --lengths 256k --index IVF1024,PQ16x10 --codec bfloat16/pq2 \
        --keep-keys false --exact-up-to 1 --trials 1 --seed "$seed" \
        --report "benchmarks/results/passkey_compressed/256k-pq16x10-pq2-exact/seed$seed"
done

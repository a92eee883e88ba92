#!/bin/sh
# FoT fine-tuning of the default model's memory-layer attention (resumable: rerun to continue).
cd "$(dirname "$0")/.." && exec .venv/bin/knnmem train --out runs/smollm2-fot --init-from model/smollm2 \
  --mem-layers 8,16,24 --window 512 --rows 8 --k-pack 4 --cross-batch-range 3 --train-only memory_attention \
  --lr 3e-4 --warmup-steps 20 --steps 600 --synthetic-fraction 0.8 --answer-weight 4 \
  --log-every 2 --eval-every 50 --eval-batches 2 --save-every 10 --passkey-length 2048 --passkey-trials 4 --threads 1

"""Train a small LongLLaMA with FoT cross-batch attention (resumable: run it again to continue).

    python examples/train_fot.py --out runs/small --steps 200
"""

import argparse

from knnmem.train.trainer import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="runs/small")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--hidden-size", type=int, default=64)
parser.add_argument("--window", type=int, default=64)
args = parser.parse_args()

config = TrainConfig(
    steps=args.steps, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size, num_hidden_layers=4,
    num_attention_heads=2, mem_layers=[2], window=args.window, rows=8, cross_batch_range=2, k_pack=3,
    vocab_size=512, real_chars=500_000, eval_every=max(args.steps // 4, 1), save_every=max(args.steps // 4, 1),
    log_every=max(args.steps // 20, 1), passkey_trials=2,
    passkey_length=max(4 * args.window, 256),  # the prompt alone, without filler, is about 160 tokens
)
model = train(config, args.out)
print(f"trained {sum(p.numel() for p in model.parameters()):,} parameters; metrics and loss.png in {args.out}")

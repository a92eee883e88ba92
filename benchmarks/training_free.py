"""Training-free memory on a model not trained with FoT: which position scheme, k and memory layers find
a pass key, per prompt length.

Each configuration runs the landmark pass-key prompt in the chat template (the answer begun with "The
pass key is") with exact top-k memory (`torch`) or dense memory, windows of `--window` tokens, and
either only the question in the last window or a full last window. Results go to a JSON file, one
record per (configuration, length), so an interrupted run resumes where it stopped.

    python benchmarks/training_free.py --lengths 8k --trials 5 --out benchmarks/results/training_free.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import knnmem
from knnmem.cli import parse_token_list
from knnmem.eval.passkey import question_tokens, run_passkey

LAYERS = {"all": lambda n: list(range(n)), "2..": lambda n: list(range(2, n))}
# (name, layers, scheme, distance, index, k, question only in the last window)
CONFIGS = [
    ("longllama all k32 question", "all", "longllama", None, "torch", 32, True),
    ("longllama all k32 full-window", "all", "longllama", None, "torch", 32, False),
    ("longllama 2.. k32 question", "2..", "longllama", None, "torch", 32, True),
    ("longllama all k128 question", "all", "longllama", None, "torch", 128, True),
    ("longllama all dense question", "all", "longllama", None, "dense", 0, True),
    ("fixed D=window all k32 question", "all", "fixed_distance", None, "torch", 32, True),
    ("fixed D=0 all k32 question", "all", "fixed_distance", 0, "torch", 32, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--lengths", type=parse_token_list, default=parse_token_list("8k"))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--configs", default=None, help="comma-separated indices into CONFIGS (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_free.json"))
    args = parser.parse_args()
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    chosen = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    for name, layers, scheme, distance, index, k, question_only in chosen:
        num_layers = knnmem.model.read_checkpoint_config(knnmem.model.resolve_checkpoint(args.model)).num_hidden_layers
        model, tokenizer = knnmem.load_pretrained(
            args.model, device="cpu", mem_layers=LAYERS[layers](num_layers),
            max_position_embeddings=args.window, mem_position_scheme=scheme, mem_position_distance=distance,
            mem_dtype="float32", torch_attention=True)
        last = question_tokens(tokenizer, chat=True) if question_only else args.window
        for length in args.lengths:
            if any(r["config"] == name and r["length"] == length for r in done):
                continue
            trials = run_passkey(model, tokenizer, length, trials=args.trials, chat=True, last_context_length=last,
                                 memory_factory=lambda: knnmem.Memory.create(model, index=index, k=max(k, 1)))
            record = dict(config=name, length=length, found=sum(t.correct for t in trials), trials=len(trials),
                          seconds_per_trial=sum(t.seconds for t in trials) / len(trials),
                          answers=[t.answer for t in trials], keys=[t.pass_key for t in trials])
            done.append(record)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(done, indent=1) + "\n")
            print(f"| {name} | {length:,} | {record['found']}/{record['trials']} | {record['seconds_per_trial']:.0f} s |",
                  flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""The pass-key test: accuracy per prompt length with dense and kNN memory.

    python examples/passkey.py --model model/tiny --lengths 4096 16384 --trials 20
"""

import argparse

from transformers import AutoTokenizer

import knnmem
from knnmem.eval.passkey import passkey_sweep, passkey_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="model/tiny")
parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
parser.add_argument("--index", default=knnmem.memory.DEFAULT_INDEX)
parser.add_argument("--trials", type=int, default=10)
args = parser.parse_args()

model = knnmem.LongLlamaForCausalLM.from_pretrained(args.model).eval()
tokenizer = AutoTokenizer.from_pretrained(args.model)
results = passkey_sweep(model, tokenizer, args.lengths, index=args.index, k=knnmem.memory.DEFAULT_K,
                        exact_up_to=max(args.lengths), trials=args.trials)
print(passkey_table(results))

"""Persist a memory in one process and reload it in another: the answers are identical.

    python examples/persist_and_reload.py --model model/tiny
"""

import argparse
import subprocess
import sys

import torch
from transformers import AutoTokenizer

import knnmem
from knnmem.eval.demo import DATA

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="model/tiny")
parser.add_argument("--corpus", nargs="+", default=[str(DATA / "corpus.jsonl")])
parser.add_argument("--store", default="indexes/persisted")
parser.add_argument("--prompt", default="Recall the batch id of Kadra. It is")
parser.add_argument("--answer-only", action="store_true", help="(internal) reload the store and print the answer")
args = parser.parse_args()

model = knnmem.LongLlamaForCausalLM.from_pretrained(args.model).eval()
tokenizer = AutoTokenizer.from_pretrained(args.model)


def answer(memory: knnmem.Memory) -> str:
    ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
    out = model.generate(ids, memory=memory, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


if args.answer_only:
    print(answer(knnmem.Memory.load(args.store, model=model)), end="")
    sys.exit()

built = knnmem.index_corpus(model, tokenizer, args.corpus, path=args.store, index="HNSW32")
here = answer(built)
there = subprocess.run(
    [sys.executable, __file__, "--model", args.model, "--store", args.store, "--prompt", args.prompt, "--answer-only"],
    check=True, capture_output=True, text=True,
).stdout
print(f"built in this process:    {here!r}")
print(f"reloaded in another one:  {there!r}")
print("identical" if here == there else "DIFFERENT")
sys.exit(0 if here == there else 1)

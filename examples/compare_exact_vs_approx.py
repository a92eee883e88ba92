"""Exact dense memory against approximate indexes on the same long text.

    python examples/compare_exact_vs_approx.py --model model/tiny --report reports/compare
"""

import argparse
import json

import torch
from transformers import AutoTokenizer

import knnmem
from knnmem.eval.compare import compare_memories, markdown_table, write_report
from knnmem.eval.demo import DATA

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="model/tiny")
parser.add_argument("--tokens", type=int, default=8192, help="length of the text read")
parser.add_argument("--index", nargs="+", default=["Flat", "HNSW32", "IVF64,Flat"])
parser.add_argument("--k", type=int, nargs="+", default=[16, 128])
parser.add_argument("--report", default=None)
args = parser.parse_args()

model = knnmem.LongLlamaForCausalLM.from_pretrained(args.model).eval()
tokenizer = AutoTokenizer.from_pretrained(args.model)
corpus = [json.loads(line)["text"] for line in open(DATA / "corpus.jsonl")]
ids = tokenizer("\n".join(corpus))["input_ids"][: args.tokens]
rows = compare_memories(model, torch.tensor([ids]), args.index, ks=args.k)
print(markdown_table(rows))
if args.report:
    print("\n".join(f"wrote {p}" for p in write_report(rows, args.report)))

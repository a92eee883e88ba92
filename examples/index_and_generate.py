"""Index a corpus once, then answer a question whose answer is somewhere in it.

    python examples/index_and_generate.py --model model/tiny --corpus knnmem/eval/demo_data/corpus.jsonl
"""

import argparse

import torch
from transformers import AutoTokenizer

import knnmem
from knnmem.eval.demo import DATA

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="model/tiny")
parser.add_argument("--corpus", nargs="+", default=[str(DATA / "corpus.jsonl")])
parser.add_argument("--store", default="indexes/example")
parser.add_argument("--index", default=knnmem.memory.DEFAULT_INDEX)
parser.add_argument("--prompt", default="What is the code of Roulnex Sumiote? The code of Roulnex Sumiote is")
args = parser.parse_args()

model = knnmem.LongLlamaForCausalLM.from_pretrained(args.model).eval()
tokenizer = AutoTokenizer.from_pretrained(args.model)
memory = knnmem.index_corpus(model, tokenizer, args.corpus, path=args.store, index=args.index)
print(f"stored {len(memory):,} tokens of {len(memory.documents)} documents in {args.store}")

ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
out = model.generate(ids, memory=memory, max_new_tokens=8, do_sample=False)
print(args.prompt, "->", tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])

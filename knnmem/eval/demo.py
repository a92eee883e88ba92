"""The end-to-end demonstration: index a corpus, persist it, reload it, answer questions from memory.

The embedded corpus (`knnmem/demo_data/`) is real text, held-out Python standard-library modules
that the shipped model never trained on, with facts stated at random depths; each question's answer
is one of those facts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..ingest import index_corpus
from ..memory import Memory
from .compare import compare_memories, markdown_table

DATA = Path(__file__).parent / "demo_data"


def matches(generated: str, expected: str) -> bool:
    """Whether `generated` begins with the whole of `expected` (not merely a prefix of a longer number)."""
    rest = generated[len(expected):]
    return generated.startswith(expected) and not (rest[:1].isalnum())


@torch.no_grad()
def answer_tokens_predicted(model, tokenizer, question: str, answer: str, memory) -> tuple[int, int]:
    """(correct, total): answer tokens that are the greedy next token after the question and the answer so far."""
    text = f"{question} {answer}"
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]], device=model.device)
    # Answer tokens: those ending inside the answer (a leading space token belongs to the question).
    positions = [i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(question) + 1 and i > 0]
    logits = model(input_ids=ids, memory=memory, use_cache=False).logits[0]
    predicted = logits[[i - 1 for i in positions]].argmax(-1)
    return int((predicted == ids[0, positions]).sum()), len(positions)


def run_demo(model, tokenizer, store_dir: str | Path, *, index: str, k: int, compare_specs: list[str]) -> None:
    """Index the embedded corpus into `store_dir` with `model`, reload it, answer its questions, compare with
    exact memory."""
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()]

    corpus = DATA / "corpus.jsonl"
    shown = corpus.relative_to(Path.cwd()) if corpus.is_relative_to(Path.cwd()) else corpus
    print(f"1. Indexing the demo corpus ({shown}) with {index} (k={k}) into {store_dir}")
    started = time.perf_counter()
    built = index_corpus(model, tokenizer, [corpus], path=store_dir, index=index, k=k)
    print(f"   {len(built.documents)} documents, {len(built):,} tokens, {time.perf_counter() - started:.0f} s")
    if built.train_size > len(built):
        print(f"   {index} trains once a memory holds {built.train_size:,} entries: until then it is searched exactly")
    print()

    started = time.perf_counter()
    memory = Memory.load(store_dir, model=model)
    print(f"2. Reloaded {store_dir} in {time.perf_counter() - started:.2f} s: {memory}\n")

    print("3. Questions whose answers lie in the stored documents (greedy decoding):")
    print(f"   {'question':<62} {'expected':>10} {index:>10} {'dense':>10}")
    labels = (index, "dense", "no memory")
    correct = dict.fromkeys(labels[:2], 0)
    forced = dict.fromkeys(labels, 0)
    answer_tokens = 0

    def fresh(label: str) -> Memory:
        """A fresh view of the store (or none) for each use: nothing read before is remembered."""
        if label == index:
            return Memory.load(store_dir, model=model)
        return memory.reindex("dense") if label == "dense" else Memory.create(model)

    for q in questions:
        ids = torch.tensor([tokenizer(q["question"])["input_ids"]], device=model.device)
        answers = {}
        for label in labels:
            hits, count = answer_tokens_predicted(model, tokenizer, q["question"], q["answer"], fresh(label))
            forced[label] += hits
            if label == "no memory":
                answer_tokens += count
                continue
            out = model.generate(ids, memory=fresh(label), max_new_tokens=len(tokenizer(q["answer"])["input_ids"]) + 1,
                                 do_sample=False)
            answers[label] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0]
            correct[label] += matches(answers[label], q["answer"])
        marks = {label: ("✓ " if matches(a, q["answer"]) else "✗ ") + a[:8] for label, a in answers.items()}
        print(f"   {q['question'][:62]:<62} {q['answer']:>10} {marks[index]:>10} {marks['dense']:>10}")
    print(f"   exact answers: {index} {correct[index]}/{len(questions)}, dense {correct['dense']}/{len(questions)}")
    print("   answer tokens predicted given the question and the answer so far: "
          + ", ".join(f"{label} {forced[label]}/{answer_tokens}" for label in labels) + "\n")

    print("4. Exact dense memory against approximate indexes, reading all questions against the store:")
    text = "\n".join(f"{q['question']} {q['answer']}." for q in questions)
    rows = compare_memories(model, torch.tensor([tokenizer(text)["input_ids"]]), compare_specs, ks=[k],
                            base=memory.reindex("dense"))
    print(markdown_table(rows))

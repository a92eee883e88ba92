"""The end-to-end demonstration: index a corpus, persist it, reload it, answer questions from it.

The embedded corpus (`demo_data/`, made by `demo_corpus.py`) is real prose, the Python language
reference, with one invented fact planted in each document. Every question is asked through the chat
template and answered by greedy decoding, five ways, with the same model:

    no memory      the question alone
    <index>        the question, with the store as memory (the default index)
    dense          the question, with exact memory over every stored entry
    BM25 top-3     no memory; the three chunks BM25 ranks best are placed in the prompt
    ceiling        no memory; the chunk that holds the answer is placed in the prompt

so memory is measured against what a user would pick instead and against what the model can do at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..chat import encode_prompt
from ..decoding import Sampling, generate
from ..ingest import index_corpus
from ..memory import Memory
from .rag import Bm25Chunks, answered, chunks, passage_prompt

DATA = Path(__file__).parent / "demo_data"
QUESTION_PROMPT = "Answer briefly. {question}"
BM25_TOP = 3


@dataclass
class Answer:
    question: str
    expected: str
    approach: str
    answer: str
    correct: bool
    seconds: float


def demo_documents() -> list[tuple[str, str]]:
    return [(row["name"], row["text"]) for row in map(json.loads, (DATA / "corpus.jsonl").read_text().splitlines())]


def demo_questions() -> list[dict]:
    return [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()]


@torch.no_grad()
def answer(model, tokenizer, prompt: str, memory: Memory | None, max_new_tokens: int) -> str:
    """The first line of the model's greedy answer to the user message `prompt`."""
    generated = generate(model, tokenizer, memory, encode_prompt(tokenizer, prompt),
                         Sampling(max_new_tokens=max_new_tokens))
    return generated.text.strip().split("\n")[0]


def ask_all(model, tokenizer, store_dir: str | Path, *, index: str, questions: list[dict],
            documents: list[tuple[str, str]], max_new_tokens: int = 24, show=print,
            report: str | Path | None = None) -> list[Answer]:
    """Every question answered by every approach (see the module docstring); `show` gets one line each,
    and `report` (a JSON file) is rewritten after each question, so an interrupted run keeps its answers."""
    texts = dict(documents)
    bm25 = Bm25Chunks(documents)
    stored = Memory.load(store_dir, model=model)
    dense = stored.reindex("dense")
    # Both memories keep what an answer adds in an overlay that `reset` drops: every question starts
    # from the store alone.
    dense.read_only = True
    memories = {index: stored, "dense": dense}

    results = []
    for q in questions:
        holding = next(c for c in chunks(texts[q["document"]]) if q["fact"] in c)
        prompts = {
            "no memory": QUESTION_PROMPT.format(question=q["question"]),
            index: QUESTION_PROMPT.format(question=q["question"]),
            "dense": QUESTION_PROMPT.format(question=q["question"]),
            f"BM25 top-{BM25_TOP}": passage_prompt([c for _, c in bm25.search(q["question"], BM25_TOP)], q["question"]),
            "ceiling": passage_prompt([holding], q["question"]),
        }
        row = []
        for approach, prompt in prompts.items():
            started = time.perf_counter()
            memory = memories.get(approach)
            if memory is not None:
                memory.reset()
            text = answer(model, tokenizer, prompt, memory, max_new_tokens)
            results.append(Answer(q["question"], q["answer"], approach, text, answered(text, q["answer"]),
                                  time.perf_counter() - started))
            row.append(("✓ " if results[-1].correct else "✗ ") + text[:14])
        show(f"   {q['question'][:58]:<58} {q['answer'][:14]:>14} " + " ".join(f"{cell:<16}" for cell in row))
        if report:
            Path(report).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    stored.close()
    return results


def summary_table(results: list[Answer]) -> str:
    """Markdown: per approach, questions answered exactly and mean seconds per answer."""
    approaches = list(dict.fromkeys(r.approach for r in results))
    lines = ["| approach | answered | s / answer |", "|---|---:|---:|"]
    for approach in approaches:
        mine = [r for r in results if r.approach == approach]
        lines.append(f"| {approach} | {sum(r.correct for r in mine)} / {len(mine)} "
                     f"| {sum(r.seconds for r in mine) / len(mine):.1f} |")
    return "\n".join(lines)


def run_demo(model, tokenizer, store_dir: str | Path, *, index: str, k: int, limit: int | None = None,
             report: str | Path | None = None) -> list[Answer]:
    """Index the embedded corpus into `store_dir`, reload it, answer its questions every way (see the module
    docstring), print each answer and the summary; `report`: also write the answers there as JSON."""
    documents, questions = demo_documents(), demo_questions()[:limit]
    corpus = DATA / "corpus.jsonl"
    shown = corpus.relative_to(Path.cwd()) if corpus.is_relative_to(Path.cwd()) else corpus
    print(f"1. Indexing the demo corpus ({shown}) with {index} (k={k}) into {store_dir}")
    started = time.perf_counter()
    built = index_corpus(model, tokenizer, [corpus], path=store_dir, index=index, k=k)
    print(f"   {len(built.documents)} documents, {len(built):,} tokens in memory, "
          f"{time.perf_counter() - started:.0f} s")
    if built.train_size > len(built):
        print(f"   {index} trains once a memory holds {built.train_size:,} entries: until then it is searched exactly")
    built.close()

    started = time.perf_counter()
    with Memory.load(store_dir, model=model) as memory:
        print(f"\n2. Reloaded {store_dir} in {time.perf_counter() - started:.2f} s: {memory}\n")
    print(f"3. {len(questions)} questions whose answers lie only in the stored documents (greedy decoding):")
    approaches = ["no memory", index, "dense", f"BM25 top-{BM25_TOP}", "ceiling"]
    print(f"   {'question':<58} {'expected':>14} " + " ".join(f"{a[:16]:<16}" for a in approaches))
    results = ask_all(model, tokenizer, store_dir, index=index, questions=questions, documents=documents,
                      report=report)
    print("\n4. Summary\n")
    print(summary_table(results))
    if report:
        print(f"\nwrote {report}")
    return results

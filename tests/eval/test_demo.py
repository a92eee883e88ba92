"""The demo's corpus keeps its promise (each answer only in its own document), and every approach of the
demo runs and is scored against the expected answer."""

from pathlib import Path

import pytest

import knnmem
from knnmem.eval import demo
from knnmem.eval.rag import Bm25Chunks, answered, chunks, passage_prompt

MODEL = Path(__file__).resolve().parents[2] / "model" / "tiny"


def test_each_answer_lies_only_in_its_own_document_and_not_in_its_question():
    documents, questions = dict(demo.demo_documents()), demo.demo_questions()
    assert len(questions) >= 36 and len(set(q["question"] for q in questions)) == len(questions)
    for q in questions:
        assert documents[q["document"]].count(q["fact"]) == 1 and answered(q["fact"], q["answer"])
        assert not answered(q["question"], q["answer"])
        found = [name for name, text in documents.items() if answered(text, q["answer"])]
        assert found == [q["document"]], q["answer"]


def test_answer_matching_takes_whole_words_only():
    assert answered("The ship departs from Pier 17.", "17") and answered("it is TOBIAS RELL", "Tobias Rell")
    assert not answered("Pier 170", "17") and not answered("x17", "17") and not answered("", "17")


def test_chunks_keep_paragraphs_whole_and_bm25_ranks_the_chunk_with_the_fact_first():
    documents, questions = demo.demo_documents(), demo.demo_questions()
    text = documents[0][1]
    pieces = chunks(text)
    assert "\n\n".join(pieces) == text and all(len(p) <= 900 or "\n\n" not in p for p in pieces)
    bm25 = Bm25Chunks(documents)
    top = [bm25.search(q["question"], 3) for q in questions]
    # The invented names make the questions easy for BM25: the fact's chunk is found nearly always.
    assert sum(any(q["fact"] in chunk for _, chunk in found) for q, found in zip(questions, top)) >= 0.9 * len(questions)
    assert passage_prompt(["a", "b"], "Q?").startswith("Text:\na\n\nb\n\n")


def test_every_approach_answers_every_question_and_is_scored(tmp_path):
    model, tokenizer = knnmem.load_pretrained(MODEL, "cpu")
    documents, questions = demo.demo_documents()[:2], demo.demo_questions()[:2]
    memory = knnmem.Memory.create(model, index="Flat", k=8)
    from knnmem.ingest.encode import encode_documents

    encode_documents(model, [tokenizer(t)["input_ids"] for _, t in documents], memory,
                     names=[n for n, _ in documents], progress=False)
    memory.save(tmp_path / "s")
    lines = []
    results = demo.ask_all(model, tokenizer, tmp_path / "s", index="Flat", questions=questions, documents=documents,
                           max_new_tokens=4, show=lines.append)
    assert len(lines) == 2 and [r.approach for r in results[:5]] == ["no memory", "Flat", "dense", "BM25 top-3", "ceiling"]
    for r in results:
        assert r.correct == answered(r.answer, r.expected) and r.seconds > 0
    table = demo.summary_table(results)
    assert "| ceiling |" in table and "/ 2 |" in table

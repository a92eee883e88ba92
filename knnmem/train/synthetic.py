"""Synthetic long-range retrieval documents: facts stated among filler text and asked about later.

Each document interleaves statements ("The locker code of Varo Mekin is 40817."), filler passages
and questions whose answer is the value of an earlier statement, in many templates, so that the only
way to predict an answer is to find the statement again, possibly many windows back. Copy tasks
(a sequence to repeat, up to three times) are mixed in. Everything is drawn from a `numpy` generator: a seed fixes
the documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

ATTRIBUTES = (
    "code", "number", "room number", "locker code", "ticket number", "serial number", "PIN", "account number",
    "order id", "badge number", "phone extension", "seat number", "port", "score", "batch id", "secret number",
    "lucky number", "access code", "zip code", "license number", "flight number", "table number", "year",
    "password", "magic number", "favourite number", "shelf", "gate",
)
SYLLABLES = (
    "ka", "ro", "mi", "tal", "ven", "su", "do", "rik", "an", "el", "mor", "ti", "zu", "ba", "ler", "no", "qui",
    "sha", "fen", "go", "ia", "wel", "dra", "po", "nex", "ul", "cy", "ham", "ote", "bri", "las", "ve", "jor",
)
WORDS = (
    "apple", "river", "stone", "cloud", "lamp", "tiger", "paper", "window", "garden", "silver", "candle", "bridge",
    "forest", "planet", "rocket", "violin", "marble", "pepper", "winter", "copper", "anchor", "harbor", "meadow",
    "castle", "falcon", "ribbon", "saddle", "tunnel", "velvet", "walnut", "yellow", "zebra", "orange", "purple",
)
# Heads of made-up attribute names ("walnut token", "kavo code"), so that any noun phrase can name a value.
NOUNS = ("key", "code", "word", "number", "id", "name", "value", "tag", "token", "label", "secret", "phrase")
# Simple sentences for haystack filler: a few of them repeated, the way long-context probes pad a prompt.
# Some end in a word or number that can also be a value ("The door is copper.", "The door key is 4417."):
# distractors that match the last tokens of a question ("... is"), so that an answer must be found by
# the whole attribute name. No subject's noun is in WORDS: "door key" is never a fact's attribute.
SUBJECTS = ("The chair", "The road", "The house", "The cat", "The book", "The door", "The wind", "The city",
            "The boat", "The field", "The clock", "The tree", "The night", "The hill", "The wall", "The bell")
PREDICATES = ("is quiet", "is old", "is warm", "is open", "is far away", "is small", "is bright", "is empty",
              "is heavy", "is calm", "moves slowly", "stays still", "looks tired", "feels cold", "is round")
# (statement, question prefix); the answer, the value, follows the prefix after one space.
TEMPLATES = (
    ("The {a} of {e} is {v}.", "What is the {a} of {e}? The {a} of {e} is"),
    ("{e} has the {a} {v}.", "Which {a} does {e} have? {e} has the {a}"),
    ("Remember this: the {a} for {e} is {v}.", "Question: what was the {a} for {e}? Answer: the {a} for {e} is"),
    ("{e}: {a} = {v}", "Lookup {e}: {a} ="),
    ("Note that {v} is the {a} of {e}.", "Recall the {a} of {e}. It is"),
    ("The {a} is {v}. Do not lose it.", "What was the {a}? The {a} is"),
    ("{e} wrote down the {a}, which is {v}.", "What {a} did {e} write down? It is"),
    ("# {a} of {e}: {v}", "# {a} of {e}:"),
    ('{e}_{a} = "{v}"', 'assert {e}_{a} == "'),
    ("Keep in mind: {e} -> {v} ({a}).", "{e} -> "),
    ("Today {e} got the {a} {v}.", "Earlier, {e} got the {a}"),
    ("My {a} is {v}, said {e}.", "{e} said the {a} was"),
    ("Write down the {a}: {v}.", "The {a} you wrote down was"),
    ("Here is the {a}. It is {v}.", "Tell me the {a}. The {a} is"),
)


@dataclass
class Span:
    """Character span of an answer and of the statement value it copies."""

    answer: tuple[int, int]
    source: tuple[int, int]


def entity(rng: np.random.Generator) -> str:
    def word() -> str:
        return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()

    return word() if rng.random() < 0.4 else f"{word()} {word()}"


def attribute(rng: np.random.Generator) -> str:
    """A listed attribute, or a made-up one: a word or name followed by a noun."""
    if rng.random() < 0.5:
        return str(rng.choice(ATTRIBUTES))
    head = str(rng.choice(WORDS)) if rng.random() < 0.5 else entity(rng).split()[0].lower()
    return f"{head} {rng.choice(NOUNS)}"


def haystack(rng: np.random.Generator) -> Callable[[int], str]:
    """A filler of a few simple sentences repeated in order, returning about `n` characters when called."""

    def sentence() -> str:
        subject, draw = str(rng.choice(SUBJECTS)), rng.random()
        if draw < 0.3:
            return f"{subject} {rng.choice(PREDICATES)}."
        if draw < 0.6:
            return f"{subject} is {rng.choice(WORDS)}."
        # A statement of a value that no question asks for: its attribute ("door code") is never a fact's.
        return f"{subject} {rng.choice(NOUNS)} is {value(rng)}."

    count = int(rng.integers(2, 6))
    sentences = " ".join(sentence() for _ in range(count))

    def filler(num_chars: int) -> str:
        return (sentences + " ") * (num_chars // (len(sentences) + 1)) + sentences[: num_chars % (len(sentences) + 1)]

    return filler


def value(rng: np.random.Generator) -> str:
    if rng.random() < 0.15:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 3))))
    digits = int(rng.integers(1, 8))
    return str(int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10**digits)))


def retrieval_document(
    rng: np.random.Generator, filler: Callable[[int], str], num_chars: int, reach: int, max_gap: int = 400
) -> tuple[str, list[Span]]:
    """A document of about `num_chars` characters and the spans of its answers.

    Args:
        filler: returns a passage of about the given number of characters of ordinary text.
        reach: questions ask only about statements at most this many characters back (a curriculum
            grows it from within one window to the whole document).
        max_gap: largest filler passage between two events, in characters.
    """
    parts: list[str] = []
    size = 0
    spans: list[Span] = []
    facts: list[tuple[int, tuple[int, int], str, str, str]] = []  # template, value span, entity, attr, value
    used: set[str] = set()

    def emit(text: str) -> int:
        nonlocal size
        start = size
        parts.append(text)
        size += len(text)
        return start

    while size < num_chars:
        draw = rng.random()
        reachable = [fact for fact in facts if size - fact[1][0] <= reach]
        if reachable and draw < 0.3:
            template, source, name, attr, val = reachable[int(rng.integers(len(reachable)))]
            prefix = TEMPLATES[template][1].format(a=attr, e=name) + " "
            start = emit(prefix) + len(prefix)
            emit(val + "\n")
            spans.append(Span((start, start + len(val)), source))
        elif draw < 0.5:
            template = int(rng.integers(len(TEMPLATES)))
            name, attr, val = entity(rng), attribute(rng), value(rng)
            if name in used:
                continue
            used.add(name)
            text = TEMPLATES[template][0].format(a=attr, e=name, v=val)
            start = emit(text + "\n") + text.index(val)
            facts.append((template, (start, start + len(val)), name, attr, val))
        elif draw < 0.8:
            # A sequence repeated one to three times: plain copying, the simplest retrieval there is.
            tag = entity(rng)
            seq = " ".join(value(rng) for _ in range(int(rng.integers(3, 13))))
            source = emit(f"Sequence {tag}: ") + len(f"Sequence {tag}: ")
            emit(seq + ".\n")
            for _ in range(int(rng.integers(1, 4))):
                emit(filler(int(rng.integers(1, min(max_gap, reach) + 1))) + "\n")
                prefix = f"Repeat sequence {tag}: "
                start = emit(prefix) + len(prefix)
                emit(seq + ".\n")
                # Its source is the nearest earlier copy, so the reach bounds every repetition.
                spans.append(Span((start, start + len(seq)), (source, source + len(seq))))
                source = start
        else:
            emit(filler(int(rng.integers(1, max_gap + 1))) + "\n")
    return "".join(parts), spans

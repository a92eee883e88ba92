"""The landmark-attention pass-key test: a pass key hidden at a random depth inside filler text.

The prompt is the one of the landmark-attention paper: a task line, repeated filler sentences with
the key sentence at the chosen depth, and the question; the model must continue with the key.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat import encode_prompt, user_turn_end
from ..memory import Memory
from ..plotting import pyplot

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000  # keys are drawn from 1..MAX_KEY


def key_sentence(pass_key: int) -> str:
    return f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."


def _encode(tokenizer, pass_key: int, before: int, after: int, chat: bool) -> list[int]:
    """A pass-key prompt with `before` and `after` filler sentences around the key sentence."""
    parts = [TASK, " ".join([FILLER] * before), key_sentence(pass_key), " ".join([FILLER] * after)]
    if not chat:
        return tokenizer("\n".join(parts + [QUESTION]))["input_ids"]
    question, answer = QUESTION.split("? ")
    return encode_prompt(tokenizer, "\n".join(parts + [question + "?"]), chat=True, answer_prefix=answer)


def shortest_prompt(tokenizer, pass_key: int = MAX_KEY, *, chat: bool = False) -> int:
    """Tokens of a pass-key prompt with no filler: the shortest length a prompt can have."""
    return len(_encode(tokenizer, pass_key, 0, 0, chat))


def passkey_prompt(tokenizer, length: int, depth: float, pass_key: int, *, chat: bool = False) -> list[int]:
    """Token ids of a prompt of about `length` tokens with the key sentence at `depth` (0 = start, 1 = end).

    With `chat`, the task, text and question ("What is the pass key?") are the user's turn of the
    tokenizer's chat template and the assistant's answer begins "The pass key is".
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    fixed = shortest_prompt(tokenizer, pass_key, chat=chat)
    if length < fixed:
        raise ValueError(f"a pass-key prompt takes at least {fixed} tokens with this tokenizer, not {length}")
    per_filler = len(tokenizer(" ".join([FILLER] * 16))["input_ids"]) / 16
    repeats = max(math.ceil((length - fixed) / per_filler), 0)
    before = round(repeats * depth)
    return _encode(tokenizer, pass_key, before, repeats - before, chat)


def question_tokens(tokenizer, *, chat: bool = False) -> int:
    """About how many tokens end a pass-key prompt after its text: the question (and, with `chat`, the
    end of the user's turn and the start of the answer)."""
    if not chat:
        return len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    question, answer = QUESTION.split("? ")
    return len(tokenizer(question + "?" + user_turn_end(tokenizer) + answer, add_special_tokens=False)["input_ids"])


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    pass_key: int
    answer: str
    correct: bool
    seconds: float


def run_passkey(model, tokenizer, length: int, *, trials: int, memory_factory, seed: int = 0,
                progress: bool = True, chat: bool = False, last_context_length: int | None = None
                ) -> list[PasskeyTrial]:
    """Greedy-decode the key for `trials` prompts of about `length` tokens, depths uniform in [0, 1].

    Args:
        memory_factory: called with no arguments for each trial; returns the `knnmem.Memory` to use.
        progress: show a progress bar over the trials.
        chat: prompts in the chat template (see `passkey_prompt`).
        last_context_length: tokens at the end of the prompt kept out of memory (default: the model's).
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    rng = np.random.default_rng([seed, length])
    results = []
    for _ in tqdm(range(trials), desc=f"pass key, {length:,} tokens", unit="trial", leave=False, disable=not progress):
        depth, pass_key = float(rng.uniform()), int(rng.integers(1, MAX_KEY + 1))
        ids = torch.tensor([passkey_prompt(tokenizer, length, depth, pass_key, chat=chat)], device=model.device)
        digits = len(str(pass_key))
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=digits + 1, do_sample=False, memory=memory_factory(),
                                 last_context_length=last_context_length)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        number = re.match(r"\d+", answer)
        correct = number is not None and number.group() == str(pass_key)
        results.append(PasskeyTrial(ids.shape[1], depth, pass_key, answer, correct, time.perf_counter() - start))
    return results


@dataclass
class PasskeyResult:
    length: int
    memory: str  # "dense" or an index spec
    accuracy: float
    trials: int
    seconds_per_trial: float
    attempts: list[PasskeyTrial]  # each trial: depth, key, answer, outcome

    @classmethod
    def of(cls, length: int, memory: str, attempts: list[PasskeyTrial]) -> PasskeyResult:
        """The result of `attempts`: their accuracy, count and mean time."""
        return cls(length, memory, float(np.mean([t.correct for t in attempts])), len(attempts),
                   float(np.mean([t.seconds for t in attempts])), attempts)


def passkey_sweep(model, tokenizer, lengths: list[int], *, index: str, k: int, exact_up_to: int, trials: int,
                  seed: int = 0, codec: str | None = None, keep_keys: bool = True) -> list[PasskeyResult]:
    """Pass-key accuracy per length with dense memory (lengths up to `exact_up_to`) and with `index`, whose
    entries are stored with `codec` (and without their keys unless `keep_keys`; see `Memory`)."""
    too_short = [length for length in lengths if length < shortest_prompt(tokenizer)]
    if too_short:  # refused before any trial runs, rather than reported for a longer prompt
        raise ValueError(f"lengths {too_short} are shorter than a pass-key prompt without filler "
                         f"({shortest_prompt(tokenizer)} tokens with this tokenizer)")
    options = dict(codec=codec, keep_keys=keep_keys)
    Memory.create(model, index=index, k=k, **options)  # refuses a bad codec or option before any trial
    label = index + (f" {codec}" if codec else "") + ("" if keep_keys else " no keys")
    results = []
    for length in lengths:
        for spec, name, chosen in ([("dense", "dense", {})] if length <= exact_up_to else []) + [(index, label, options)]:
            done = run_passkey(model, tokenizer, length, trials=trials, seed=seed,
                               memory_factory=lambda: Memory.create(model, index=spec, k=k, **chosen))
            results.append(PasskeyResult.of(length, name, done))
    return results


def merge_results(results: list[PasskeyResult]) -> list[PasskeyResult]:
    """One result per (length, memory) from results of separate runs, e.g. one per seed or machine.

    Accuracy and time per trial are recomputed from the pooled trials. A trial that appears twice (the
    same length, memory, depth and key: two runs with the same seed) is refused rather than counted twice.
    """
    groups: dict[tuple[int, str], list[PasskeyTrial]] = {}
    for r in results:
        trials = groups.setdefault((r.length, r.memory), [])
        for t in r.attempts:
            if any(t.depth == u.depth and t.pass_key == u.pass_key for u in trials):
                raise ValueError(f"the trial with key {t.pass_key} at depth {t.depth:.4f} ({r.memory}, {r.length:,} "
                                 "tokens) appears in two of the reports: were they run with the same seed?")
            trials.append(t)
    return [PasskeyResult.of(length, memory, trials)
            for (length, memory), trials in sorted(groups.items(), key=lambda item: item[0][0])]


def write_report(results: list[PasskeyResult], directory) -> list[Path]:
    """`passkey.json` (every trial) and `passkey.png` in `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "passkey.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    plot_passkey(results, directory / "passkey.png")
    return [directory / "passkey.json", directory / "passkey.png"]


def read_report(path) -> list[PasskeyResult]:
    """The results in a `passkey.json` written by `write_report` (a report directory or the file itself)."""
    path = Path(path)
    path = path / "passkey.json" if path.is_dir() else path
    try:
        rows = json.loads(path.read_text())
        return [PasskeyResult(**{**row, "attempts": [PasskeyTrial(**t) for t in row["attempts"]]}) for row in rows]
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: expected a pass-key report (passkey.json)") from None
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise ValueError(f"{path} is not a pass-key report with every trial on record ({error})") from None


def passkey_table(results: list[PasskeyResult]) -> str:
    lines = ["| memory | tokens | accuracy | trials | s/trial |", "|---|---|---|---|---|"]
    lines += [f"| {r.memory} | {r.length:,} | {100 * r.accuracy:.0f}% | {r.trials} | {r.seconds_per_trial:.1f} |"
              for r in results]
    return "\n".join(lines)


def passkey_misses(results: list[PasskeyResult]) -> list[str]:
    """One line per missed trial: where the key was and what the model answered instead."""
    return [f"missed: {r.memory}, {t.length:,} tokens, depth {t.depth:.2f}, key {t.pass_key}, answered {t.answer!r}"
            for r in results for t in r.attempts if not t.correct]


def plot_passkey(results: list[PasskeyResult], path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in dict.fromkeys(r.memory for r in results):
        points = [(r.length, 100 * r.accuracy) for r in results if r.memory == spec]
        wide = dict(linewidth=7, alpha=0.35, markersize=11) if spec == "dense" else {}  # visible under overlaps
        ax.plot(*zip(*points), marker="o", label=spec, **wide)
    most = max(r.trials for r in results)
    for r in results:  # a point from fewer trials than the others says so
        if r.trials < most:
            ax.annotate(f"{r.trials} trials", (r.length, 100 * r.accuracy), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=8)
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="pass keys retrieved (%)", ylim=(-5, 105),
           title="Pass-key retrieval")
    lengths = sorted({r.length for r in results})
    ax.minorticks_off()
    ax.set_xticks(lengths, [f"{length:,}" for length in lengths])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Decoding with a memory: one call to `model.generate` that samples, stops and streams as a caller asks.

`generate` is what `knnmem generate`, `explain_generation` and the server run. It keeps transformers'
generation loop (so the tokens are exactly `model.generate`'s) and adds, through its hooks: sampling
with the caller's own random generator, stop strings, a callback with the text of each new token, and
cancellation between tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when decoding ends.

    Args:
        max_new_tokens: tokens to generate at most.
        temperature: 0 decodes greedily; above 0 samples from softmax(logits / temperature).
        top_p: sample from the smallest set of tokens whose probability reaches `top_p` (nucleus sampling).
        seed: seed of the sampler's random generator (None: a fresh random one).
        stop: strings that end the answer; the answer ends before the first one that appears.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class Generated:
    tokens: list[int]  # generated token ids, end-of-turn excluded
    text: str  # their text, cut before the first stop string
    finish_reason: str  # "stop" (end-of-turn or a stop string), "length" (max_new_tokens) or "cancelled"


class _Sampler(LogitsProcessor):
    """Samples the next token and leaves only it selectable, so the greedy loop of `generate` takes it.

    transformers samples from torch's global random generator, which concurrent generations share; a
    generator of one's own makes a seeded answer the same whatever else runs.
    """

    def __init__(self, sampling: Sampling):
        self.temperature, self.top_p = sampling.temperature, sampling.top_p
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep a token while the mass of the tokens ranked above it is below top_p (the first always stays).
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        token = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)


class _Progress(StoppingCriteria):
    """Sees every new token: reports its text, ends decoding at a stop string or on cancellation."""

    def __init__(self, tokenizer, sampling: Sampling, end_ids: set[int],
                 on_text: Callable[[str], None] | None, cancelled: Callable[[], bool] | None):
        self.tokenizer, self.stops, self.end_ids = tokenizer, sampling.stop, end_ids
        self.on_text, self.cancelled = on_text, cancelled
        self.tokens: list[int] = []
        self.text, self.sent, self.reason = "", 0, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        token = int(input_ids[0, -1])
        done = token in self.end_ids
        if done:
            self.reason = "stop"
        else:
            self.tokens.append(token)
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.reason, done = self.text[:cut], "stop", True
        if self.on_text is not None:
            self.on_text(self._unsent(final=done))
        if not done and self.cancelled is not None and self.cancelled():
            self.reason, done = "cancelled", True
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def _unsent(self, *, final: bool) -> str:
        """Text not reported yet that is sure to stay: not the start of a stop string, nor half a character."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # a multi-byte character whose remaining bytes come with the next token
                end -= 1
            for stop in self.stops:
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:size]):
                        end -= size
                        break
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def finish(self) -> str:
        """What is left to report once decoding has ended (at max_new_tokens, the last token's held-back text)."""
        return self._unsent(final=True)


@torch.no_grad()
def generate(model, tokenizer, memory, prompt_ids: Sequence[int], sampling: Sampling = Sampling(), *,
             on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] | None = None,
             logits_processors: Sequence[LogitsProcessor] = ()) -> Generated:
    """Generate from `prompt_ids` with `memory` (None: the model's default, empty dense memory).

    Args:
        on_text: called after every token with the text it adds to the answer ("" while it is held back,
            such as the beginning of a stop string); the pieces concatenate to `Generated.text`.
        cancelled: polled after every token; decoding ends when it returns True.
        logits_processors: observers or modifiers of each step's scores (e.g. `AttentionRecorder`), run
            before the sampler.
    """
    end = model.generation_config.eos_token_id
    end_ids = set(end if isinstance(end, list) else [] if end is None else [end])
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    progress = _Progress(tokenizer, sampling, end_ids, on_text, cancelled)
    processors = list(logits_processors) + ([_Sampler(sampling)] if sampling.temperature > 0 else [])
    model.generate(ids, memory=memory, max_new_tokens=sampling.max_new_tokens, do_sample=False,
                   logits_processor=LogitsProcessorList(processors), stopping_criteria=StoppingCriteriaList([progress]))
    if on_text is not None:
        tail = progress.finish()
        if tail:
            on_text(tail)
    return Generated(progress.tokens, progress.text, progress.reason or "length")

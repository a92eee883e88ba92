"""The model and its memories as the server uses them: names, prompts, limits, and one request's generation.

Every store is opened once, read-only and memory-mapped, and shared by all requests. A request reads a
`Memory.view()` of it: what its generation adds (prompt windows beyond the local cache, tokens that
overflow it) goes to the view's own overlay and is gone when the request ends, so no request sees
another's. The model name alone reads no stored memory; `MODEL+MEMORY` (or the `memory` field) picks one.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..chat import encode_messages
from ..decoding import Generated, Sampling, generate
from ..eval.explain import AttentionRecorder, explain
from ..memory import Memory
from .errors import APIError
from .schema import ChatRequest, CompletionRequest

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions; chat answers may run to the server's limit


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Args:
        max_prompt_tokens: longest prompt accepted (the model reads longer ones window by window, at the cost
            of one forward pass per window, so this bounds a request's time).
        max_tokens: most tokens one answer may generate (the default answer length of chat requests).
    """

    max_prompt_tokens: int = 8192
    max_tokens: int = 256

    def __post_init__(self):
        if self.max_prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError(f"limits must be positive, got {self}")


@dataclass
class Job:
    """A validated request, ready to run."""

    model: str  # the name it asked for, as responses echo it
    memory: str | None
    prompt_ids: list[int]
    sampling: Sampling
    provenance: bool


@dataclass
class Outcome:
    generated: Generated
    prompt_tokens: int
    provenance: list[dict] | None
    search_seconds: float


def model_name(source: str | None) -> str:
    """The name a model is served under: its directory or file name (`tiny`, `SmolLM2-135M-Instruct.Q4_1`),
    the name part of a hub id, or `smollm2` for the default model."""
    if source is None:
        return "smollm2"
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else path.name


class Engine:
    """Runs requests with `model` and the named read-only `memories` (see `Memory.view`)."""

    def __init__(self, model, tokenizer, memories: dict[str, Memory], *, name: str, limits: Limits = Limits(),
                 provenance_passages: int = 3):
        if "+" in name or any("+" in m for m in memories):
            raise ValueError(f"model and memory names must not contain '+' (it joins them): {name!r}, {list(memories)}")
        self.model, self.tokenizer, self.memories, self.name, self.limits = model, tokenizer, memories, name, limits
        self.provenance_passages = provenance_passages
        config = model.config
        self.groups = config.num_attention_heads // config.num_key_value_heads

    def model_ids(self) -> list[str]:
        """What `GET /v1/models` lists: the model alone, then the model with each memory."""
        return [self.name] + [f"{self.name}+{memory}" for memory in self.memories]

    def prepare(self, request: ChatRequest | CompletionRequest) -> Job:
        """The job for a validated request; `APIError` for an unknown model or memory, or a limit exceeded."""
        memory = self._memory(request)
        if isinstance(request, ChatRequest):
            ids = encode_messages(self.tokenizer, [{"role": m.role, "content": m.text()} for m in request.messages])
            default, field = self.limits.max_tokens, "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
            default, field = COMPLETION_DEFAULT_TOKENS, "max_tokens"
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids):,} tokens; this server accepts at most "
                           f"{self.limits.max_prompt_tokens:,} (--max-prompt-tokens)",
                           param="messages" if isinstance(request, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        tokens = request.requested_tokens()
        if tokens is not None and tokens > self.limits.max_tokens:
            raise APIError(400, f"{field} is {tokens:,}; this server generates at most {self.limits.max_tokens:,} "
                           "tokens per answer (--max-tokens)", param=field, code="invalid_value")
        temperature = 1.0 if request.temperature is None else request.temperature  # OpenAI's defaults
        sampling = Sampling(max_new_tokens=min(default, self.limits.max_tokens) if tokens is None else tokens,
                            temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
                            seed=request.seed, stop=request.stop_strings())
        return Job(request.model, memory, ids, sampling, request.provenance)

    def _memory(self, request) -> str | None:
        base, plus, suffix = request.model.partition("+")
        if base != self.name or (plus and suffix not in self.memories):
            raise APIError(404, f"the model {request.model!r} does not exist here; GET /v1/models lists "
                           f"{', '.join(self.model_ids())}", param="model", code="model_not_found")
        named = suffix or None
        if request.memory is not None:
            if request.memory not in self.memories:
                raise APIError(404, f"no memory named {request.memory!r}; this server has "
                               f"{', '.join(self.memories) or 'none'}", param="memory", code="memory_not_found")
            if named is not None and named != request.memory:
                raise APIError(400, f"the model {request.model!r} names memory {named!r} but the memory field asks "
                               f"for {request.memory!r}: give one", param="memory", code="invalid_value")
            named = request.memory
        return named

    def run(self, job: Job, *, on_text: Callable[[str], None] | None = None,
            cancel: threading.Event | None = None) -> Outcome:
        """Generate the answer to `job` in a view of its memory (blocking: called on a worker thread)."""
        # Without a stored memory, an empty one: the memory layers still read what the prompt writes.
        memory = self.memories[job.memory].view() if job.memory else Memory.create(self.model.config)
        with ExitStack() as stack:
            stack.callback(memory.close)
            processors = []
            if job.provenance:
                recorder = stack.enter_context(AttentionRecorder(memory, self.groups))
                processors.append(recorder)
            generated = generate(self.model, self.tokenizer, memory, job.prompt_ids, job.sampling, on_text=on_text,
                                 cancelled=cancel.is_set if cancel is not None else None, logits_processors=processors)
            passages = None
            if job.provenance:
                explanation = explain(recorder, self.tokenizer, generated, top=self.provenance_passages)
                passages = [{"document": p.document, "position": p.position, "text": p.text, "weight": round(p.weight, 6)}
                            for p in explanation.overall]
            return Outcome(generated, len(job.prompt_ids), passages, memory.search_seconds)

    def warm_up(self) -> None:
        """One short generation with each memory, before requests share them: a store's indexes are read on
        first search, which must not happen in two threads at once."""
        ids = self.tokenizer("Hello")["input_ids"] or [self.tokenizer.eos_token_id]
        for name in [None, *self.memories]:
            self.run(Job(self.name, name, ids, Sampling(max_new_tokens=1), provenance=False))

    def close(self) -> None:
        for memory in self.memories.values():
            memory.close()

"""The requests the server accepts, validated strictly: a wrong type, an unknown field or a value out of
range is a 400 naming the field, before anything runs.

Fields follow OpenAI's chat and completion APIs; `memory` and `provenance` are knnmem's extensions (the
`openai` client sends them with `extra_body=`).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import APIError

MAX_STOP_STRINGS = 4  # as OpenAI's API


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1  # one choice per request
    user: str | None = None  # OpenAI's end-user tag: accepted, not used
    memory: str | None = None  # a memory by name instead of "model+memory"
    provenance: bool = False  # add the stored passages attended to most

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"give one prompt (a string), got a list of {len(prompt)}")
        return prompt if isinstance(prompt, str) else prompt[0]

    def requested_tokens(self) -> int | None:
        return self.max_tokens


def parse(model: type[_Generation], body: bytes) -> _Generation:
    """The request `body` as `model`; `APIError` 400 naming what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in _field_path(data, first["loc"], missing=first["type"] == "missing"))
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        elif first["type"] == "missing":
            message = f"{param}: required"
        else:
            shown = json.dumps(first.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            message = f"{param or 'request'}: {first['msg'].removeprefix('Value error, ')} (got {shown})"
        code = "unknown_parameter" if first["type"] == "extra_forbidden" else "invalid_value"
        raise APIError(400, message, param=param or None, code=code) from None


def _field_path(data, loc: tuple, *, missing: bool) -> list:
    """The part of a validation error's location that names the request's field: pydantic also appends the
    member of a union it tried (`content.str`), which is no field of the request."""
    path = []
    for part in loc:
        present = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data))
        if not present:
            return path + [part] if missing else path
        path.append(part)
        data = data[part]
    return path

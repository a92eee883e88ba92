"""Errors the server answers with: an HTTP status and OpenAI's error body, never a traceback."""

from __future__ import annotations

from starlette.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it: `{"error": {"message", "type", "param", "code"}}`.

    Args:
        status: HTTP status (400 bad request, 401, 404 unknown model, 413, 429 queue full, 503 shutting down).
        message: what was wrong and what to do instead.
        type: OpenAI's error type, e.g. "invalid_request_error".
        param: the request field at fault, if one is.
        code: a machine-readable name such as "context_length_exceeded".
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

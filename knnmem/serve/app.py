"""The ASGI app: OpenAI's chat and completion endpoints (plain or streamed as server-sent events), the model
list, health and metrics, behind an optional API key.

Routes only translate HTTP to `Engine` jobs run by the `Scheduler` and back; every refusal is an `APIError`
answered with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job, Outcome
from .errors import APIError
from .metrics import CONTENT_TYPE, Metrics
from .schema import ChatRequest, CompletionRequest, parse
from .scheduler import Scheduler

log = logging.getLogger("knnmem.serve")
MAX_BODY_BYTES = 1 << 20  # far above the longest prompt a server accepts by default; bounds what one request reads
CLIENT_GONE = 499  # the client closed the connection before the answer (nginx's convention): counted, never sent
OPEN_PATHS = ("/health",)  # answered without the API key, for load balancers and probes
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/health": "health", "/metrics": "metrics"}


class _Gate:
    """ASGI middleware: the API key check (constant-time) and the request counter by endpoint and status."""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = ENDPOINTS.get(path, "models" if path.startswith("/v1/models/") else "other")
        status, failed = [], CLIENT_GONE  # no response started: the client left first, unless an error escapes

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    problem = "invalid API key" if given else "missing API key"
                    error = APIError(401, f"{problem}: send the header 'Authorization: Bearer KEY' with the key the "
                                     "server was started with (--api-key)", code="invalid_api_key")
                    return await error.response()(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        except Exception:  # answered by the outer error middleware (see `internal_error`)
            failed = 500
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status[0] if status else failed)).inc()


def create_app(engine: Engine, *, workers: int = 1, max_queue: int = 16, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The server for `engine`: `workers` generations at once, `max_queue` more waiting, then 429.

    `app.state.scheduler` and `app.state.metrics` are the app's own; the engine's memories are closed when
    the app shuts down.
    """
    metrics = Metrics()
    scheduler = Scheduler(workers=workers, max_queue=max_queue, metrics=metrics)
    created = int(time.time())

    async def health(request: Request) -> Response:
        if not scheduler.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": engine.name, "memories": list(engine.memories)})

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(model_id: str) -> dict:
        memory = model_id.partition("+")[2] or None
        entries = engine.memories[memory].stored_entries if memory else 0
        return {"id": model_id, "object": "model", "created": created, "owned_by": "knnmem", "memory": memory,
                "memory_entries": entries}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(m) for m in engine.model_ids()]})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model"]
        if model_id not in engine.model_ids():
            raise APIError(404, f"the model {model_id!r} does not exist here; GET /v1/models lists "
                           f"{', '.join(engine.model_ids())}", param="model", code="model_not_found")
        return JSONResponse(model_card(model_id))

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(int(declared), max_body_bytes)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise _too_large(len(body), max_body_bytes)
        return body

    async def generation(request: Request, schema, endpoint: str) -> Response:
        arrived = time.perf_counter()
        parsed = parse(schema, await read_body(request))
        job = engine.prepare(parsed)
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        first: list[float] = []

        def on_text(piece: str) -> None:  # on the worker thread
            if not first:
                first.append(time.perf_counter())
            if parsed.stream:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

        task = scheduler.submit(lambda: engine.run(job, on_text=on_text, cancel=cancel), cancel)
        answer = _Answer(endpoint, job, created=int(time.time()))

        def record(outcome: Outcome) -> None:
            done = time.perf_counter()
            metrics.prompt_tokens.inc(outcome.prompt_tokens)
            metrics.completion_tokens.inc(len(outcome.generated.tokens))
            metrics.latency.labels(endpoint).observe(done - arrived)
            metrics.first_token.labels(endpoint).observe((first[0] if first else done) - arrived)
            metrics.search.observe(outcome.search_seconds)

        if parsed.stream:
            task.add_done_callback(lambda _: pieces.put_nowait(None))
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(_events(answer, task, pieces, record, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outcome = await _unless_client_leaves(task, request)
        if outcome is None:
            return Response(status_code=CLIENT_GONE)
        record(outcome)
        return JSONResponse(answer.whole(outcome))

    async def chat(request: Request) -> Response:
        return await generation(request, ChatRequest, "chat")

    async def completions(request: Request) -> Response:
        return await generation(request, CompletionRequest, "completions")

    async def api_error(request: Request, error: APIError) -> Response:
        return error.response()

    async def http_error(request: Request, error: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return APIError(error.status_code, message, code=code).response()

    async def internal_error(request: Request, error: Exception) -> Response:
        log.exception("request to %s failed", request.url.path)  # the traceback goes to the log, not the client
        return APIError(500, f"internal error ({type(error).__name__}); the server log has the details",
                        type="server_error", code="internal_error").response()

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.stop_accepting()
        await asyncio.to_thread(scheduler.close)
        engine.close()

    routes = [
        Route("/health", health), Route("/metrics", metrics_text),
        Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.scheduler, app.state.metrics, app.state.engine, app.state.api_key = scheduler, metrics, engine, api_key
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    return app


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size:,} bytes or more; this server reads at most {limit:,}",
                    code="request_too_large")


async def _unless_client_leaves(task: asyncio.Task, request: Request) -> Outcome | None:
    """The task's outcome, or None (the task cancelled) if the client disconnects first."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left, or this handler was cancelled (shutdown)
            task.cancel()
    return task.result() if task in done else None


class _Answer:
    """OpenAI's response objects for one job: the whole answer, or its stream of chunks."""

    def __init__(self, endpoint: str, job: Job, *, created: int):
        self.chat, self.job, self.created = endpoint == "chat", job, created
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.model}

    @staticmethod
    def usage(outcome: Outcome) -> dict:
        completion = len(outcome.generated.tokens)
        return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": completion,
                "total_tokens": outcome.prompt_tokens + completion}

    def _extensions(self, outcome: Outcome) -> dict:
        return {"provenance": outcome.provenance} if outcome.provenance is not None else {}

    def whole(self, outcome: Outcome) -> dict:
        text, reason = outcome.generated.text, outcome.generated.finish_reason
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._envelope("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage(outcome), **self._extensions(outcome)}

    def chunk(self, text: str | None = None, *, reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def last_chunk(self, outcome: Outcome) -> dict:
        return {**self.chunk(reason=outcome.generated.finish_reason), **self._extensions(outcome)}

    def usage_chunk(self, outcome: Outcome) -> dict:
        envelope = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        return {**envelope, "choices": [], "usage": self.usage(outcome)}


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _events(answer: _Answer, task: asyncio.Task, pieces: asyncio.Queue, record, include_usage: bool):
    """The server-sent events of a streamed answer; leaving early (client gone) cancels the generation."""
    try:
        if answer.chat:
            yield _event(answer.chunk(first=True))
        while (piece := await pieces.get()) is not None:
            if piece:
                yield _event(answer.chunk(piece))
        try:
            outcome = task.result()
        except APIError as error:  # refused after admission: the server began shutting down
            yield _event(error.body())
        except Exception as error:  # the status line is sent: the error can only be an event
            log.exception("streamed generation failed")
            yield _event(APIError(500, f"internal error ({type(error).__name__}); the server log has the details",
                                  type="server_error", code="internal_error").body())
        else:
            record(outcome)
            yield _event(answer.last_chunk(outcome))
            if include_usage:
                yield _event(answer.usage_chunk(outcome))
        yield _event("[DONE]")
    finally:
        if not task.done():
            task.cancel()

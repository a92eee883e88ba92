"""`knnmem serve`: an OpenAI-compatible HTTP server whose answers read persistent memories.

Modules, from the wire inwards: `server` (uvicorn, start and shutdown), `app` (routes, streaming, API key),
`schema` (request validation), `errors` (OpenAI error bodies), `scheduler` (bounded queue, worker threads,
cancellation), `engine` (model, memories, one request's generation), `metrics` (Prometheus).
"""

from .app import create_app
from .engine import Engine, Limits, model_name
from .server import run_server

__all__ = ["Engine", "Limits", "create_app", "model_name", "run_server"]

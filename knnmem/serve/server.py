"""Running the app under uvicorn: where it listens, what it says on start, and a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections and new requests (503), lets running
generations finish for up to `shutdown_timeout` seconds, cancels those still running (they stop at their
next token), closes the stores and exits.
"""

from __future__ import annotations

import ipaddress
import sys

import uvicorn

from .app import create_app
from .engine import Engine


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        self.app.state.scheduler.stop_accepting()
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, to die by it; a graceful stop exits with 0.
        self._captured_signals.clear()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        engine = self.app.state.engine
        local = ipaddress.ip_address(host).is_loopback
        reach = ("loopback only: pass --host 0.0.0.0 to accept other machines" if local
                 else "reachable from other machines" + ("" if self.app.state.api_key else ", without an API key"))
        print(f"knnmem serve: listening on http://{host}:{port} ({reach})", file=sys.stderr)
        print(f"knnmem serve: models {', '.join(engine.model_ids())}", file=sys.stderr, flush=True)


def run_server(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, max_queue: int = 16,
               api_key: str | None = None, shutdown_timeout: float = 30.0, log_level: str = "warning") -> None:
    """Serve `engine` until SIGTERM or Ctrl-C (see `create_app` for `workers`, `max_queue` and `api_key`)."""
    app = create_app(engine, workers=workers, max_queue=max_queue, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    _Server(config, app).run()
    print("knnmem serve: stopped", file=sys.stderr)

"""A server on a free loopback port in this process: the test model `model/tiny` and a small store built here.

Test modules import these fixtures (a second conftest.py would shadow `tests/conftest.py`, which other
test modules import by name).
"""

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import uvicorn

import knnmem
from knnmem.ingest import stdlib_texts
from knnmem.serve import Engine, Limits, create_app

TINY = Path(__file__).resolve().parents[2] / "model" / "tiny"


@pytest.fixture(scope="session")
def tiny():
    return knnmem.load_pretrained(TINY, "cpu")


@pytest.fixture(scope="session")
def store(tiny, tmp_path_factory):
    model, tokenizer = tiny
    corpus = tmp_path_factory.mktemp("corpus")
    for i, (_, text) in enumerate(stdlib_texts("heldout")[:3]):
        (corpus / f"doc{i}.txt").write_text(text[:1500])
    path = tmp_path_factory.mktemp("indexes") / "docs"
    knnmem.index_corpus(model, tokenizer, [corpus], path=path, index="Flat", k=8).close()
    return path


@pytest.fixture
def engine(tiny, store):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, {"docs": knnmem.Memory.load(store, model=model)}, name="tiny",
                    limits=Limits(max_prompt_tokens=600, max_tokens=64))
    yield engine
    engine.close()


class Running:
    def __init__(self, app, url: str):
        self.app, self.url = app, url

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=options.pop("api_key", "unused"), max_retries=0,
                             **options)

    def metric(self, name: str, **labels) -> float:
        """The value of one series on /metrics' registry (0 if it has not been observed)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


@contextmanager
def running(engine, **options):
    app = create_app(engine, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Running(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def server(engine):
    with running(engine) as server:
        yield server

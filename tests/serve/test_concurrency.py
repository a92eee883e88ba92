"""Requests at once: overlays kept apart, a full queue refused at once, clients that leave cancel their work."""

import threading
import time

import httpx
import pytest

from knnmem.serve.engine import Engine

from serving import engine, running, server, store, tiny  # noqa: F401 (fixtures)

# Longer than the test model's last context (128 tokens): its first windows go to the request's overlay.
LONG_PROMPT = "def handler(request):\n    return request.body\n" * 20  # 361 tokens


def gated(engine, monkeypatch, gate=None, after_first_token=None):
    """Record what each `engine.run` returns, and make it wait on `gate` (a Barrier or an Event) first, and
    on the Event `after_first_token` once its first text is out (so that a fast machine cannot finish a
    generation before the test has left it)."""
    outcomes, original = [], Engine.run

    def run(self, job, **kwargs):
        if gate is not None:
            gate.wait(timeout=30)
        if after_first_token is not None:
            on_text = kwargs["on_text"]

            def paused(text):
                if on_text is not None:
                    on_text(text)
                after_first_token.wait(timeout=30)

            kwargs["on_text"] = paused
        outcome = original(self, job, **kwargs)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(engine, "run", run.__get__(engine))
    return outcomes


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_see_no_overlay_but_their_own(engine, monkeypatch):
    short = {"model": "tiny+docs", "prompt": "import os", "max_tokens": 8, "temperature": 0, "provenance": True}
    long = {**short, "prompt": LONG_PROMPT}
    engine.provenance_passages = 50  # enough to list the overlay's entries beside the store's
    with running(engine, workers=2) as server:
        alone = httpx.post(server.url + "/v1/completions", json=short, timeout=60).json()
        gated(engine, monkeypatch, threading.Barrier(2))  # both generate at the same time
        answers = {}
        threads = [threading.Thread(target=lambda name, body: answers.__setitem__(
            name, httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()), args=args)
            for args in (("long", long), ("short", short))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # The long prompt's own windows are in its overlay, and it attends to them ...
    assert any(p["document"] == "(prompt)" for p in answers["long"]["provenance"])
    # ... while the short request, generating at the same time, reads the store alone, as when it ran by itself.
    assert answers["short"]["choices"] == alone["choices"] and answers["short"]["provenance"] == alone["provenance"]
    shared = engine.memories["docs"]
    assert shared.overlay is None and len(shared) == shared.stored_entries


def test_a_full_queue_is_answered_429_at_once(engine, monkeypatch):
    gate = threading.Event()
    gated(engine, monkeypatch, gate)
    body = {"model": "tiny+docs", "prompt": "import os", "max_tokens": 2}
    with running(engine, workers=1, max_queue=1) as server:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code)) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: server.metric("knnmem_queue_depth") == 1 and server.metric("knnmem_in_flight") == 1)
        started = time.perf_counter()
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert time.perf_counter() - started < 2
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
        streamed = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
        assert streamed.status_code == 429  # refused before the stream starts
        assert httpx.get(server.url + "/health").status_code == 200  # the event loop is free meanwhile
        gate.set()
        for thread in threads:
            thread.join()
        assert results == [200, 200]
        assert server.metric("knnmem_rejected_total", reason="queue_full") == 2
        assert server.metric("knnmem_queue_depth") == 0


def test_a_client_that_leaves_a_stream_cancels_its_generation(engine, monkeypatch):
    left = threading.Event()
    outcomes = gated(engine, monkeypatch, after_first_token=left)
    body = {"model": "tiny+docs", "prompt": "import os", "max_tokens": 64, "stream": True}
    with running(engine) as server:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            next(response.iter_lines())  # the first token arrived: leave
        wait_for(lambda: server.metric("knnmem_cancelled_total") == 1)  # the server saw the client go
        left.set()
        wait_for(lambda: outcomes)
        assert outcomes[0].generated.finish_reason == "cancelled" and len(outcomes[0].generated.tokens) < 64
        wait_for(lambda: server.metric("knnmem_in_flight") == 0)


def test_a_client_that_times_out_cancels_a_whole_answer(engine, monkeypatch):
    timed_out = threading.Event()
    outcomes = gated(engine, monkeypatch, after_first_token=timed_out)
    body = {"model": "tiny+docs", "prompt": "import os", "max_tokens": 64}
    with running(engine) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
        wait_for(lambda: server.metric("knnmem_cancelled_total") == 1)
        timed_out.set()
        wait_for(lambda: outcomes)
        assert outcomes[0].generated.finish_reason == "cancelled"
        wait_for(lambda: server.metric("knnmem_requests_total", endpoint="completions", status="499") == 1)


def test_after_a_shutdown_signal_new_requests_get_503(server):
    server.app.state.scheduler.stop_accepting()
    response = httpx.post(server.url + "/v1/completions", json={"model": "tiny+docs", "prompt": "import os"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert httpx.get(server.url + "/health").json() == {"status": "shutting_down"}

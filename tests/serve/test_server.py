"""`knnmem serve` as a process: where it listens, SIGTERM, and a restart after kill -9."""

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from knnmem.cli import main, parse_memory

from serving import TINY, store, tiny  # noqa: F401 (fixtures)


def start(store, *options) -> tuple[subprocess.Popen, str, str]:
    """`knnmem serve` on a free port: the process, its URL and what it printed on start."""
    process = subprocess.Popen([sys.executable, "-m", "knnmem.cli", "serve", "--model", str(TINY), "--memory",
                                f"docs={store}", "--port", "0", "--device", "cpu", *options],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    printed = ""
    while "models" not in printed:
        line = process.stderr.readline()
        assert line, f"the server exited: {printed}"
        printed += line
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
    return process, re.search(r"http://[\d.]+:\d+", printed).group(0), printed


def answer(url: str) -> dict:
    body = {"model": "tiny+docs", "prompt": "import os", "max_tokens": 8, "temperature": 0, "provenance": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return {key: response.json()[key] for key in ("choices", "provenance")}


@pytest.mark.slow
def test_sigterm_finishes_the_running_answer_then_exits(store):
    process, url, printed = start(store)
    assert "127.0.0.1" in url and "loopback only" in printed and "tiny, tiny+docs" in printed
    body = {"model": "tiny+docs", "prompt": "import os", "max_tokens": 48, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        events.append(next(lines))
        process.send_signal(signal.SIGTERM)
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
    assert process.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


@pytest.mark.slow
def test_after_kill_9_the_store_opens_and_answers_the_same(store):
    process, url, _ = start(store)
    before = answer(url)
    process.kill()
    process.wait(timeout=10)
    process, url, _ = start(store)
    try:
        assert answer(url) == before
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_memories_are_named_by_directory_or_name():
    assert parse_memory("indexes/docs/") == ("docs", "indexes/docs/")
    assert parse_memory("code=indexes/stdlib") == ("code", "indexes/stdlib")
    assert parse_memory("runs/a=b/store") == ("store", "runs/a=b/store")


def test_bad_serve_arguments_are_one_line(store, tmp_path, capsys):
    assert main(["serve", "--model", str(TINY), "--memory", f"a={store}", "--memory", f"a={store}"]) == 2
    assert "memory names must differ" in capsys.readouterr().err
    assert main(["serve", "--model", str(TINY), "--memory", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--memory", "a+b=store"])

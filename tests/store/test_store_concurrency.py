"""A store under concurrent use: a second writer, readers during commits, and writers killed at random points.

Writers are forked from the test process (no interpreter start-up per writer), save in a loop and are
killed with SIGKILL, so they die wherever they happen to be.
"""

import os
import random
import signal
import time
from contextlib import contextmanager

import pytest
import torch

import knnmem
from conftest import sharp_model, tiny_config
from test_store import documents, read


@pytest.fixture
def model():
    return sharp_model(tiny_config())


@pytest.fixture
def memories(model):
    """Two memories of different sizes (so a reader can tell which generation it opened)."""
    out = []
    for length in (120, 240):
        memory = knnmem.Memory.create(model, index="HNSW32", k=16)
        knnmem.encode_documents(model, [documents(1, length)[0]], memory, progress=False)
        out.append(memory)
    return out


@contextmanager
def forked_writer(store, memories):
    """A child process saving `memories` to `store` in turn, forever; refused saves (another writer holds the
    store) are retried. Killed with SIGKILL on exit; yields its pid."""
    pid = os.fork()
    if pid == 0:  # the writer: never returns into the test
        try:
            torch.set_num_threads(1)  # no thread pools across the fork
            while True:
                for memory in memories:
                    try:
                        memory.save(store)
                    except knnmem.StoreError as error:
                        if "is being written by process" not in str(error):
                            raise
        finally:
            os._exit(1)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer failed"


def test_two_writers_never_destroy_the_store(model, memories, tmp_path):
    store = tmp_path / "store"
    memories[0].save(store)
    saved = refused = 0
    with forked_writer(store, memories):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline or not refused:
            try:
                memories[1].save(store)
                saved += 1
            except knnmem.StoreError as error:
                assert "is being written by process" in str(error)
                refused += 1
            assert time.monotonic() < deadline + 30, "the other writer never held the lock"
    assert saved and refused
    assert len(knnmem.Memory.load(store, model=model, verify=True)) in (120, 240)
    # The writer was killed, perhaps mid-save: the next save removes what it left, and only that.
    memories[0].save(store)
    assert len([p for p in store.iterdir() if p.name.startswith("data-")]) == 1


def test_readers_open_while_a_writer_commits(model, memories, tmp_path):
    store = tmp_path / "store"
    memories[0].save(store)
    query = torch.randint(1, 96, (1, 8))
    expected = {len(m): read(model, m, query) for m in memories}
    opened = set()
    with forked_writer(store, memories):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or len(opened) < 2:
            with knnmem.Memory.load(store, model=model) as memory:  # never a failed open
                assert torch.equal(read(model, memory, query), expected[len(memory)])
                opened.add(len(memory))
            assert time.monotonic() < deadline + 30
    assert opened == {120, 240}


def test_writers_killed_at_random_points_leave_the_old_or_the_new_store(model, memories, tmp_path):
    store = tmp_path / "store"
    memories[0].save(store)
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        with forked_writer(store, memories):
            time.sleep(rng.uniform(0.0, 0.25))
        with knnmem.Memory.load(store, model=model) as memory:
            seen.add(len(memory))
        assert len(knnmem.Memory.load(store, model=model, verify=True)) in (120, 240)
    assert seen == {120, 240}
    memories[0].save(store)  # the next save removes what killed writers left
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith("data-")) == ["manifest.json", "write.lock"]
    assert len([p for p in store.iterdir() if p.name.startswith("data-")]) == 1

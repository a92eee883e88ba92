"""Sharded memories on a local Ray cluster: shards served by actors, corpora encoded by tasks, and the failures of both."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

import knnmem
from conftest import sharp_model, tiny_config
from knnmem.cluster.actors import ShardUnavailable
from knnmem.store.manifest import MANIFEST

pytestmark = pytest.mark.slow  # a Ray cluster and its workers take seconds to start on a small machine


class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 95 for c in text]}


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return sharp_model(tiny_config())


def write_corpus(path: Path, documents: int, length: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    lines = [json.dumps({"id": f"doc{i}", "text": "".join(chr(33 + int(c)) for c in torch.randint(
        0, 90, (length + 17 * i,), generator=generator))}) for i in range(documents)]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def stores(model, tmp_path_factory):
    """(one store, the same corpus in 2 shards), Flat, written in this process."""
    root = tmp_path_factory.mktemp("stores")
    corpus = write_corpus(root / "docs.jsonl", 4, 60)
    paths = root / "whole", root / "sharded"
    for path, shards in zip(paths, (1, 2)):
        knnmem.index_corpus(model, CharTokenizer(), [corpus], path=path, index="Flat", k=16, shards=shards,
                            progress=False)
    return paths


def queries():
    return torch.randn(1, 4, 7, 8, generator=torch.Generator().manual_seed(1))


def ranked(hits):
    """Ids and scores per query, best first and equal scores by id."""
    ids, order = hits.ids.sort(dim=-1)
    scores, order = hits.scores.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), scores


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def processes(title: str) -> set[int]:
    """Workers of this test's Ray cluster (descendants of this process: its raylet started them) whose title (Ray
    names a worker by what it runs: ray::ShardActor, ray::<task name>) starts with `title`."""
    found = set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                continue
            ancestor = pid
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = parent(ancestor)
            if ancestor == os.getpid():
                found.add(pid)
        except OSError:  # ended meanwhile
            pass
    return found


def test_ray_served_shards_return_the_ids_and_scores_of_one_store(model, stores):
    whole, sharded = knnmem.Memory.load(stores[0], model=model), knnmem.Memory.load(stores[1], model=model, ray=True)
    with sharded:
        assert isinstance(sharded, knnmem.Memory) and len(sharded) == len(whole)
        assert sharded.documents == whole.documents and torch.equal(sharded.provenance, whole.provenance)
        assert sharded.nbytes == knnmem.Memory.load(stores[1], model=model).nbytes
        for layer in model.config.mem_layers:
            for a, b in zip(ranked(sharded.search(layer, queries(), slice(0, 4))),
                            ranked(whole.search(layer, queries(), slice(0, 4)))):
                assert torch.equal(a, b)
        round_trip, searches = sharded.shards.last_call  # one request per shard, answered together
        assert len(searches) == 2 and round_trip >= max(searches)
        sharded.k = 4  # k travels with each request
        assert sharded.search(1, queries(), slice(0, 4)).ids.shape[-1] == 4
        sharded.k = 16
        prompt = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(2))
        assert torch.equal(model.generate(prompt, memory=sharded, max_new_tokens=8, do_sample=False),
                           model.generate(prompt, memory=whole, max_new_tokens=8, do_sample=False))


def test_a_killed_shard_actor_is_restarted_from_its_shard(model, stores):
    with knnmem.Memory.load(stores[1], model=model, ray=True) as sharded:
        expected = sharded.search(1, queries(), slice(0, 4))
        actors = processes("ray::ShardActor")
        assert len(actors) == 2
        os.kill(min(actors), signal.SIGKILL)
        found = sharded.search(1, queries(), slice(0, 4))  # waits for the restart, then asks it again
        assert torch.equal(found.ids, expected.ids) and torch.equal(found.scores, expected.scores)
        assert len(processes("ray::ShardActor") - actors) == 1  # a new process holds the shard


def test_a_shard_that_cannot_be_reopened_is_an_error_naming_it(model, stores, tmp_path):
    with knnmem.Memory.load(stores[1], model=model, ray={"timeout_s": 120, "max_restarts": 1}) as sharded:
        second = stores[1] / json.loads((stores[1] / MANIFEST).read_text())["shards"][1]["name"]
        second.rename(tmp_path / "elsewhere")
        try:
            for pid in processes("ray::ShardActor"):  # both restart; the second finds no shard
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(ShardUnavailable, match=rf"{second}: shard 1 of 2 cannot be reached: its actor died"):
                sharded.search(1, queries(), slice(0, 4))
        finally:
            (tmp_path / "elsewhere").rename(second)
    (second / MANIFEST).rename(tmp_path / MANIFEST)  # checked before any actor starts
    try:
        with pytest.raises(knnmem.StoreError, match=rf"{second.name}: shard 1 of 2 cannot be opened: .*missing"):
            knnmem.Memory.load(stores[1], model=model, ray=True)
    finally:
        (tmp_path / MANIFEST).rename(second / MANIFEST)


def test_a_killed_indexing_worker_leaves_a_complete_store(model, stores, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", 4, 1500)  # a second of encoding per shard: time to kill one
    path, errors = tmp_path / "sharded", []

    def index():
        try:
            knnmem.index_corpus(model, CharTokenizer(), [corpus], path=path, index="Flat", k=16, shards=2, ray=True)
        except BaseException as error:  # noqa: BLE001  (reported by the test below)
            errors.append(error)

    indexing = threading.Thread(target=index)
    indexing.start()
    killed = None
    while indexing.is_alive() and killed is None:
        running = processes("ray::encode shard-")
        if running:
            killed = min(running)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    indexing.join()
    assert killed is not None and not errors
    local = tmp_path / "local"
    knnmem.index_corpus(model, CharTokenizer(), [corpus], path=local, index="Flat", k=16, progress=False)
    written, expected = knnmem.Memory.load(path, model=model), knnmem.Memory.load(local, model=model)
    assert len(written) == len(expected) == sum(d.end - d.start for d in expected.documents)
    assert written.documents == expected.documents
    for a, b in zip(ranked(written.search(2, queries(), slice(0, 4))), ranked(expected.search(2, queries(), slice(0, 4)))):
        assert torch.equal(a, b)

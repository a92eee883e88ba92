"""Shards of a memory served by Ray actors: each holds one shard memory-mapped and answers its searches.

For every search of the sharded memory (a memory layer's queries for a window or a generated token,
every key/value head at once) `RayShards.search` sends one request to each actor, all in flight
together, and the sharded memory merges the answers exactly (`knnmem.memory.sharded`). Requests carry
`k` and the search parameters, so an actor holds nothing but its shard: when one dies, Ray restarts it
(`max_restarts`), it opens its shard from disk again, and the requests in flight are sent again
(`max_task_retries`). A shard that does not answer (its actor cannot be restarted, or `timeout_s`
passed) raises `ShardUnavailable` naming it: never a search with silently fewer entries.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from ..memory.protocol import MemoryHits
from ..memory.sharded import search_shard
from ..store.persist import open_memory
from . import connect


class ShardUnavailable(RuntimeError):
    """A shard of a Ray-served memory did not answer; the message names it and says why."""


@ray.remote
class ShardActor:
    """One shard, opened read-only from its store directory (again when Ray restarts the actor)."""

    def __init__(self, path: str, config, fingerprint: dict, verify: bool):
        self.memory = open_memory(path, config=config, fingerprint=fingerprint, device=torch.device("cpu"),
                                  verify=verify)

    def entries(self) -> int:
        return self.memory.stored_entries

    def nbytes(self) -> int:
        return self.memory.nbytes

    def search(self, layer: int, queries: torch.Tensor, heads: slice, k: int,
               search_params: dict) -> tuple[tuple | None, float]:
        """The shard's hits (a tuple, as Ray serializes it) and the seconds the search took."""
        start = time.perf_counter()
        hits = search_shard(self.memory, layer, queries, heads, k=k, search_params=search_params)
        return (tuple(hits) if hits is not None else None), time.perf_counter() - start


class RayShards:
    """The shards of a sharded store, one Ray actor each, placed by Ray's scheduler (`knnmem.memory.sharded.ShardSet`).

    Args:
        shards: the shard directories, in order.
        config, fingerprint: the model's config and fingerprint, which each shard must match.
        verify: hash every byte of each shard when its actor opens it.
        timeout_s: how long a search waits for a shard (restarting a dead actor takes seconds).
        max_restarts: how often Ray restarts a shard's actor that died.
        actor_options: Ray actor options, e.g. `num_cpus=1` to give each shard a CPU of its own, or `resources`.

    `last_call` holds the timing of the latest search: (round trip seconds, each shard's search seconds).
    """

    def __init__(self, shards: Sequence[Path], *, config, fingerprint: dict, verify: bool = False,
                 timeout_s: float = 60.0, max_restarts: int = 3, **actor_options):
        connect()
        self.names, self.timeout_s = [str(shard) for shard in shards], timeout_s
        options = {"max_restarts": max_restarts, "max_task_retries": max_restarts, **actor_options}
        self.actors = [ShardActor.options(**options).remote(str(shard), config, fingerprint, verify) for shard in shards]
        try:
            self.sizes = self._gather([actor.entries.remote() for actor in self.actors])  # opened, or why not
        except BaseException:
            self.close()
            raise
        self.last_call: tuple[float, list[float]] | None = None

    def search(self, layer, queries, heads, *, k, search_params) -> list[MemoryHits | None]:
        start = time.perf_counter()
        sent = queries.detach().cpu()
        answers = self._gather([actor.search.remote(layer, sent, heads, k, search_params) for actor in self.actors])
        self.last_call = time.perf_counter() - start, [seconds for _, seconds in answers]
        return [None if hits is None else MemoryHits(*(None if t is None else t.to(queries.device) for t in hits))
                for hits, _ in answers]

    def nbytes(self) -> int:
        return sum(self._gather([actor.nbytes.remote() for actor in self.actors]))

    def _gather(self, refs: list) -> list:
        """Each shard's answer, or `ShardUnavailable` naming the first shard that gave none."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        ready, answers = set(ready), []
        for number, ref in enumerate(refs):
            where = f"{self.names[number]}: shard {number} of {len(refs)}"
            if ref not in ready:
                raise ShardUnavailable(f"{where} did not answer within {self.timeout_s:g} s (its actor may be "
                                       "restarting, or its node unreachable)")
            try:
                answers.append(ray.get(ref))
            except RayTaskError as error:  # the shard's own error, e.g. a StoreError on a damaged index file
                raise error.cause from None
            except RayActorError as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise ShardUnavailable(f"{where} cannot be reached: its actor died and was not restarted "
                                       f"({reason})") from None
        return answers

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

"""Shards of a memory served by Ray actors: each holds one shard memory-mapped and answers its searches.

For every search of the sharded memory (a memory layer's queries for a window or a generated token,
every key/value head at once) `RayShards.search` sends one request to each actor, all in flight
together, and the sharded memory merges the answers exactly (`knnmem.memory.sharded`). Requests carry
`k` and the search parameters, so an actor holds nothing but its shard: when one dies, Ray restarts it
(`max_restarts`), it opens its shard from disk again, and the requests in flight are sent again
(`max_task_retries`). A shard that does not answer (its actor cannot be restarted, or `timeout_s`
passed) raises `ShardUnavailable` naming it: never a search with silently fewer entries.

Tensors travel as numpy arrays, which Ray serializes out of band, several times faster than torch
tensors, which go through pickle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from ..memory.protocol import MemoryHits
from ..memory.sharded import search_shard
from ..store.persist import open_memory
from . import connect


Packed = tuple[np.ndarray, bool]  # a tensor as a numpy array, and whether it holds bfloat16 bits


def pack(tensor: torch.Tensor | None) -> Packed | None:
    """A CPU tensor as `Packed`: numpy has no bfloat16, so such a tensor travels as its bits (int16)."""
    if tensor is None:
        return None
    bits = tensor.dtype == torch.bfloat16
    return (tensor.view(torch.int16) if bits else tensor).numpy(), bits


def unpack(packed: Packed | None) -> torch.Tensor | None:
    if packed is None:
        return None
    array, bits = packed
    # Arrays Ray hands over without a copy are read-only views of its object store; torch tensors must be writable.
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    return tensor.view(torch.bfloat16) if bits else tensor


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

    def provenance(self) -> Packed:
        return pack(self.memory.provenance)

    def search(self, layer: int, queries: Packed, heads: slice, k: int,
               search_params: dict) -> tuple[tuple[Packed | None, ...] | None, float]:
        """The shard's hits (packed) and the seconds the search took."""
        start = time.perf_counter()
        hits = search_shard(self.memory, layer, unpack(queries), heads, k=k, search_params=search_params)
        return (None if hits is None else tuple(map(pack, hits))), time.perf_counter() - start


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
        sent = pack(queries.detach().cpu())
        answers = self._gather([actor.search.remote(layer, sent, heads, k, search_params) for actor in self.actors])
        self.last_call = time.perf_counter() - start, [seconds for _, seconds in answers]
        return [None if hits is None else MemoryHits(*(None if p is None else unpack(p).to(queries.device) for p in hits))
                for hits, _ in answers]

    def nbytes(self) -> int:
        return sum(self._gather([actor.nbytes.remote() for actor in self.actors]))

    def provenance(self) -> list[torch.Tensor]:
        return [unpack(part) for part in self._gather([actor.provenance.remote() for actor in self.actors])]

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

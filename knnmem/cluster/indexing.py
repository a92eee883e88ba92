"""Encoding a corpus in parallel: one Ray task per shard, each with its own replica of the model, writing its shard.

The model goes into Ray's object store once; each task's worker deserializes its own replica. A task
whose worker dies (killed, out of memory, its node lost) is run again by Ray (`max_retries`) and
writes its shard from the start: a shard is an ordinary store, so a half-written one is simply
replaced. The sharded store is committed by the caller (`knnmem.store.shards.sharded_writer`) only
once every task has returned, so it is complete and consistent, or not written at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ray
from ray.exceptions import RayError, RayTaskError

from ..ingest.encode import encode_shard
from . import connect


@ray.remote
def _encode_shard(model, documents, names, path: str, index: str, options: dict) -> None:
    encode_shard(model, documents, names, Path(path), index=index, **options)


def encode_in_tasks(model, jobs: Sequence[tuple[list, list, Path]], *, index: str, max_retries: int = 3,
                    **options) -> None:
    """Run `knnmem.ingest.encode.encode_shard` for every (documents, names, shard directory) of `jobs` in Ray tasks.

    Raises:
        RuntimeError: a shard's worker died more than `max_retries` times (the message names the shard).
        whatever encoding raised in a task (e.g. `ValueError` for an empty document), as it was raised.
    """
    connect()
    replica = ray.put(model)
    refs = [_encode_shard.options(max_retries=max_retries, name=f"encode {Path(path).name}")
            .remote(replica, documents, names, str(path), index, options) for documents, names, path in jobs]
    try:
        for (_, _, path), ref in zip(jobs, refs):
            try:
                ray.get(ref)
            except RayTaskError as error:
                raise error.cause from None
            except RayError as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise RuntimeError(f"{path}: the worker encoding this shard died {max_retries + 1} times ({reason})") from None
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise

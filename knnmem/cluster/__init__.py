"""A memory beyond one machine, on Ray: shards of a sharded store served by actors (`actors.py`), and corpora
encoded into shards by parallel tasks (`indexing.py`).

Every machine of the cluster must see the store at the same path (a shared file system): actors open their
shard, and tasks write theirs, where the sharded store's manifest says.
"""

try:
    import ray
except ImportError:
    raise ImportError("knnmem's Ray support needs Ray: pip install 'knnmem[ray]'") from None


def connect() -> None:
    """Join the Ray cluster this process is connected to, or the one `RAY_ADDRESS` names, or start a local one."""
    if not ray.is_initialized():
        ray.init()

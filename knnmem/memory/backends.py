"""The registry of memory backends: an index spec names one, and this is the only place that reads it.

`"dense"` and `"torch"` are served by torch (exact); any other spec is a Faiss factory string,
whose backend is imported only when such a spec is used, so exact memory never loads Faiss.
"""

from __future__ import annotations

from .entries import EntryStore
from .exact import DenseBackend, TorchTopKBackend
from .protocol import LayerMemory

BACKENDS = {"dense": DenseBackend, "torch": TorchTopKBackend}


def make_backend(spec: str, entries: EntryStore, *, k: int, **options) -> LayerMemory:
    """The backend of one layer for `spec` over `entries`; `options` are those of `FaissBackend`.

    Raises:
        ValueError: the spec is not a backend, or options were given to an exact backend.
    """
    if spec in BACKENDS:
        if not entries.keep_keys:
            raise ValueError(f"index {spec!r} searches the stored keys exactly: it needs keep_keys=True")
        given = sorted(name for name, value in options.items() if value not in (None, {}))
        if given:
            raise ValueError(f"index {spec!r} takes no Faiss options, got {given}")
        return BACKENDS[spec](entries, k=k)
    from .faiss_index import FaissBackend

    return FaissBackend(entries, spec=spec, k=k, **options)


def check_spec(spec: str, head_dim: int) -> str:
    """`spec` if it names a backend for keys of `head_dim` dimensions, else `ValueError` saying what to use."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index spec must be a non-empty string, got {spec!r}")
    if spec not in BACKENDS:
        from .faiss_index import probe_index

        try:
            probe_index(spec, head_dim)
        except ValueError as error:
            raise ValueError(f"unknown index spec {spec!r} ({error}): use dense, torch or a Faiss factory string "
                             "such as Flat, HNSW32 or IVF1024,Flat") from None
    return spec

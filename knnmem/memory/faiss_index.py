"""Faiss-backed memory of one layer: one inner-product index per (batch row, head) over stored keys.

Index specs are Faiss factory strings ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ16", ...) built
with METRIC_INNER_PRODUCT, so retrieval ranks entries by q·k, the attention score before scaling.
Indexes that need training (IVF, PQ) are trained once a row holds `train_size` valid entries; until
then that row is searched exactly, as is a row holding no more than k entries. Index ids are the
entry ids of the layer's `EntryStore`, from which the indexes are filled: CPU IVF indexes hold them in
their lists (8 bytes an entry), every other kind through an id map around it. For a model on CUDA with faiss-gpu
installed, index types Faiss supports on GPU are built there.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import faiss
import numpy as np
import torch

from .codecs import RECONSTRUCTION_SHARE
from .entries import EntryStore
from .exact import top_k_hits
from .protocol import MemoryHits

# Entries searched exactly beside the IVF lists (see FaissBackend._insert) are worth a warning when they
# are both many (more than the 32 probed lists of 39 entries scan at training size) and over this share
# of a row's entries in one head: the lists then describe the memory poorly and each query pays for it.
OUTLIER_WARNING_SHARE, OUTLIER_WARNING_MIN = 0.1, 1000

# Search parameters that count candidates (lists probed, graph neighbours kept, reranked results).
_COUNT_PARAMS = ("nprobe", "efSearch", "max_codes", "k_factor", "k_factor_rf", "efConstruction")


def _single_threaded_worker() -> None:
    """Searches, insertions and training run in parallel across (row, head): OpenMP threads inside each of them only
    slow them down, and once started they take the cores from the model's forward pass (it ran at half speed).
    The OpenMP thread count is a per-thread setting, which torch (sharing Faiss's OpenMP runtime) sets once in each
    thread at its first use: that comes first, or it would undo this."""
    torch.get_num_threads()
    faiss.omp_set_num_threads(1)


_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="knnmem-faiss",
                           initializer=_single_threaded_worker)


def new_index(spec: str, head_dim: int, l2_reduction: bool = False, width: int | None = None) -> faiss.Index:
    """An empty index for `spec` ranking by inner product; `ValueError` if Faiss cannot build it.

    With `l2_reduction`, the index is an L2 index over vectors with one extra coordinate (see
    `FaissBackend`), whose L2 ranking equals the inner-product ranking of the original vectors, laid out
    as `reduced_layout` says (in `width` dimensions if given).
    """
    # Faiss accepts some specs it later aborts the process on (HNSW0 at the first add) or cannot search
    # (IVF0): every count in a spec must be positive. Ids are knnmem's: it wraps each index in its own id map.
    if re.search(r"(?<![0-9])0+(?![0-9])", spec):
        raise ValueError(f"invalid Faiss index spec {spec!r}: its sizes (lists, links, sub-quantizers) must be positive")
    if "IDMAP" in spec.upper():
        raise ValueError(f"invalid Faiss index spec {spec!r}: knnmem maps index ids to entries itself; drop IDMap")
    if l2_reduction:
        index = faiss.index_factory(reduced_layout(spec, head_dim, width)[0], spec, faiss.METRIC_L2)
    else:
        try:
            index = faiss.index_factory(head_dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[-1]
            raise ValueError(f"invalid Faiss index spec {spec!r} for dimension {head_dim}: {first_line}") from None
    ivf = faiss.try_extract_index_ivf(index)
    codes = faiss.downcast_index(index if ivf is None else ivf)
    if getattr(codes, "do_polysemous_training", False):
        # Searches here never filter by Hamming distance, which is what ordering PQ codes (polysemous training)
        # is for; it made training an IVF1024,PQ17 index on 40k keys take minutes instead of seconds.
        codes.do_polysemous_training = False
    l2_tables(index)  # before training, which would build them
    if isinstance(codes, faiss.IndexIVFPQ):
        # Faiss's k-means is slow on sub-vectors of 2-3 dimensions (49 s for PQ17 on 40k vectors, one thread);
        # 64 points per centroid and 10 iterations place 256 centroids in so few dimensions well, in 8 s.
        codes.pq.cp.max_points_per_centroid, codes.pq.cp.niter = 64, 10
    return index


def l2_tables(index: faiss.Index) -> None:
    """Give an L2 IVF-PQ index the table Faiss precomputes for its searches only if they read it: nlist × M ×
    2^nbits floats, 512 MiB a head for IVF8192,PQ16x10 (64 MiB for IVF1024). Lists knnmem ranks through
    `_inner_product_view` (IVF-PQ under the L2 reduction, not under a transform) never read it; stores are read
    without it, so others get theirs here."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or type(ivf := faiss.downcast_index(ivf)) is not faiss.IndexIVFPQ or ivf.metric_type != faiss.METRIC_L2:
        return
    if type(faiss.downcast_index(index)) is faiss.IndexIVFPQ:
        ivf.use_precomputed_table = -1  # none, now or when trained
    if ivf.is_trained:
        ivf.precompute_table()  # builds one (when Faiss's size rule allows) or, at -1, frees it


# Sub-vector widths for which Faiss finds a vector's nearest codebook centroid with vectorised code: on one thread,
# 10-bit codes of 16 sub-quantizers take 4-12 µs a vector at widths 2, 4 and 8 against 106-123 µs at 1, 3, 5, 6
# and 12 (8-bit codes: 1-4 µs against 28-34; `benchmarks/pq_encoding.py`). Encoding keys is most of what indexing
# into PQ memory costs.
_FAST_SUBVECTOR_WIDTHS = (2, 4, 8)


@lru_cache(maxsize=None)
def reduced_widths(spec: str, head_dim: int) -> tuple[int, ...]:
    """Dimensions an L2-reduced index of `spec` may have for keys of `head_dim`, the one new indexes get first.

    The reduced vectors have head_dim + 1 coordinates; product quantizers need a multiple of their sub-quantizers,
    and new indexes pad sub-vectors to a width Faiss encodes fast when one is within twice that (PQ16 of 33
    coordinates: 64, sub-vectors of 4). Indexes written before this rule have the smallest multiple (48).
    """
    dim = head_dim + 1
    for smallest in range(dim, 2 * dim + 1):
        try:
            index = faiss.index_factory(smallest, spec, faiss.METRIC_L2)
            break
        except RuntimeError as error:
            if smallest == dim:
                first_line = str(error).strip().splitlines()[-1]
    else:
        raise ValueError(f"invalid Faiss index spec {spec!r} for dimension {dim} (head dimension + 1, for the L2 "
                         f"reduction): {first_line}")
    pq = _product_quantizer(index)
    if pq is None or smallest // pq.M in _FAST_SUBVECTOR_WIDTHS:
        return (smallest,)
    fast = [pq.M * width for width in _FAST_SUBVECTOR_WIDTHS if smallest <= pq.M * width <= 2 * dim]
    return tuple(fast[:1]) + (smallest,)


@lru_cache(maxsize=None)
def reduced_layout(spec: str, head_dim: int, width: int | None = None) -> tuple[int, np.ndarray]:
    """(dimension, positions) of the L2-reduced vectors (head_dim + 1 coordinates) in an index of `spec`, of
    dimension `width` (default: what new indexes get; see `reduced_widths`).

    Padding zeros are spread so that every sub-vector of a product quantizer holds about as many real coordinates
    (32 + 1 coordinates in PQ16: fifteen sub-vectors of 2 and one of 3, not eleven of 3 and five of zeros). Zeros
    change no inner product or L2 distance, and queries are laid out the same way.
    """
    widths, dim = reduced_widths(spec, head_dim), head_dim + 1
    width = widths[0] if width is None else width
    if width not in widths:
        raise ValueError(f"an index of {spec!r} over {dim} coordinates (head dimension + 1) has dimension "
                         f"{' or '.join(map(str, widths))}, not {width}")
    if width == dim:
        return width, np.arange(dim)
    sub_quantizers = _product_quantizer(faiss.index_factory(width, spec, faiss.METRIC_L2)).M
    step = width // sub_quantizers
    counts = [dim // sub_quantizers + (j < dim % sub_quantizers) for j in range(sub_quantizers)]
    return width, np.concatenate([j * step + np.arange(count) for j, count in enumerate(counts)])


def _product_quantizer(index: faiss.Index):
    """The product quantizer of `index` (directly or in its IVF index), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    return getattr(faiss.downcast_index(index if ivf is None else ivf), "pq", None)


def centroids(index: faiss.Index, spec: str) -> int:
    """The most centroids training must place (IVF lists, PQ codebooks); 0 if `index` needs no training."""
    if index.is_trained:
        return 0
    ivf, pq = faiss.try_extract_index_ivf(index), _product_quantizer(index)
    codebook = 2 ** pq.nbits if pq is not None else 256 if "PQ" in spec.upper() else 1  # PQ under a transform: 8 bits
    return max(ivf.nlist if ivf is not None else 1, codebook)


def default_search_params(index: faiss.Index, k: int) -> dict:
    """What knnmem searches `index` with unless told: enough candidates for k results (see `FaissBackend`)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": max(1, ivf.nlist // 32)}
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return {"efSearch": k}
    return {}


def probe_index(spec: str, head_dim: int, l2_reduction: bool | None = None) -> tuple[faiss.Index, bool]:
    """An empty index of `spec` and whether it uses the L2 reduction: as given, else (None) for IVF indexes, which
    are IVF indexes in either build. `ValueError` if Faiss cannot build it."""
    if l2_reduction is not None:
        return new_index(spec, head_dim, l2_reduction), l2_reduction
    try:
        probe = new_index(spec, head_dim, True)
    except ValueError:  # Faiss cannot build it at any dimension: say so for the keys' own
        return new_index(spec, head_dim), False
    if faiss.try_extract_index_ivf(probe) is not None:
        return probe, True
    return new_index(spec, head_dim), False


def index_dimensions(spec: str, head_dim: int, l2_reduction: bool) -> tuple[int, ...]:
    """Dimensions of the vectors an index of `spec` may hold for keys of `head_dim`, that of new indexes first."""
    return reduced_widths(spec, head_dim) if l2_reduction else (head_dim,)


def _parallel(work: Callable, tasks) -> None:
    """`work(task)` for every task, in the thread pool: one per (row, head) index, as Faiss releases the GIL."""
    list(_POOL.map(work, tasks))


class FaissBackend:
    """Top-k retrieval from Faiss indexes, one per (batch row, head).

    Args:
        entries: the layer's entry store, whose ids the indexes use.
        spec: Faiss factory string.
        k: entries retrieved per query and head.
        train_size: valid entries a row needs before its indexes are trained (IVF/PQ only).
        search_params: Faiss search parameters such as `efSearch` or `nprobe`. Unless given, HNSW
            indexes search with `efSearch=k` and IVF indexes probe `nprobe=nlist/32` lists: Faiss's
            defaults (16 and 1) keep far too few candidates for k=128 (the README's index measurements
            show what they cost).
        rerank: candidates fetched from the index per result, scored exactly from the stored keys, the best
            k kept. 1 (default) fetches k: the index picks the entries and stored keys only score them.
        Entries that reach an IVF index after its training and lie farther from their list's centroid than
        any training entry did (content unlike everything the lists were trained on, such as a number
        in a memory of prose) are also searched exactly with every query, and merged by score: probing
        the lists nearest a query could miss them. (CPU indexes; an IVF index on a GPU does not track them.)
        l2_reduction: index keys k as [k, sqrt(R² - |k|²)] and queries q as [q, 0] under L2, where R is
            the largest key norm when the index first receives keys: |q' - k'|² = |q|² + R² - 2 q·k, so
            L2 order is inner-product order, and L2 k-means partitions suit inner-product queries. Keys
            arriving later with a norm above R get 0 as extra coordinate, which ranks them as if their
            score were lower by (|k|² - R²) / 2. Product quantizers get the reduced vectors padded with
            zeros to a multiple of their sub-quantizers (see `reduced_layout`). Default: on for IVF indexes,
            where it raises recall@128 on the shipped model's queries from 0.6 to 0.95 for `IVF1024,Flat`
            and from 0.42 to 0.88 for `IVF1024,PQ16` at the same cost; off otherwise.

    When the entry store does not keep its keys (`keep_keys=False`), it drops them once every row's index is
    trained and holds them; retrieved entries are then scored by the index (exactly for `Flat` codes,
    approximately for PQ/SQ codes), and the keys of IVF outliers are kept in a small flat index per head.
    Rows then always search their index, even when it holds no more than k entries.
    """

    def __init__(
        self,
        entries: EntryStore,
        *,
        spec: str,
        k: int,
        train_size: int | None = None,
        search_params: dict | None = None,
        l2_reduction: bool | None = None,
        rerank: int = 1,
    ):
        if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 1:
            raise ValueError(f"rerank must be a positive integer (candidates per result), got {rerank!r}")
        if rerank > 1 and not entries.keep_keys:
            raise ValueError(f"rerank={rerank} scores candidates from stored keys: it needs keep_keys=True")
        self.entries, self.rerank = entries, rerank
        probe, l2_reduction = probe_index(spec, entries.head_dim, l2_reduction)
        self.spec, self.k, self.l2_reduction = spec, k, l2_reduction
        self._index_dim = index_dimensions(spec, entries.head_dim, l2_reduction)[0]  # a loaded index's own, once read
        self.train_size = 39 * centroids(probe, spec) if train_size is None else train_size  # Faiss's advice
        ivf = faiss.try_extract_index_ivf(probe)
        if ivf is not None and self.train_size < ivf.nlist:
            raise ValueError(f"train_size {self.train_size} is below the {ivf.nlist} lists of {spec!r}: "
                             "k-means needs at least one entry per list")
        self._loaded_rows: list[list[faiss.Index]] = []  # [row][head], holding entry ids (see `_with_ids`)
        self._bounds: list[list[float | None]] = []  # [row][head]: R of the L2 reduction
        self._radii: list[list[float | None]] = []  # [row][head]: farthest training entry from its IVF centroid
        self._errors: list[list[float | None]] = []  # [row][head]: reconstruction error bound (RECONSTRUCTION_SHARE)
        self._outliers: list[list[np.ndarray]] = []  # [row][head]: ids of entries beyond the radius or that bound
        self._outlier_errors: list[list[np.ndarray]] = []  # [row][head]: their code errors, NaN beyond the radius
        self._outlier_keys: list[list[faiss.Index]] = []  # [row][head]: their keys as indexed, without keep_keys
        self._pending: Callable[[], tuple] | None = None
        self._source: str | None = None  # where imported indexes came from
        self._warned_outliers = False
        self._search_params: dict = {}
        defaults = default_search_params(probe, k)
        self.set_search_params(**{**defaults, **(search_params or {})})  # validates names before any entry arrives

    @property
    def _rows(self) -> list[list[faiss.Index]]:
        if self._pending is not None:  # indexes of a store, read on first use
            load, self._pending = self._pending, None
            self._adopt(*load())
        return self._loaded_rows

    @_rows.setter
    def _rows(self, rows: list[list[faiss.Index]]) -> None:
        self._loaded_rows = rows

    def nbytes(self) -> int:
        """Bytes of every index of this layer, serialized (memory-mapped lists counted as what they hold)."""
        total = 0
        for row in self._rows:
            for index in row:
                lists = mapped_lists(index)
                total += faiss.serialize_index(index).nbytes  # without the lists of a mapped index
                if lists is not None:
                    total += sum(lists.list_size(i) for i in range(lists.nlist)) * (lists.code_size + 8)
        return total

    def reset(self) -> None:
        self._rows, self._bounds, self._radii, self._errors, self._outliers, self._outlier_keys = [], [], [], [], [], []
        self._outlier_errors = []
        self._pending = None

    def close(self) -> None:
        self.reset()  # drops the indexes and with them any memory-mapped index file

    def _new_row(self, device: torch.device) -> list[faiss.Index]:
        row, width = [], self._index_dim if self.l2_reduction else None  # a loaded store's rows and new ones alike
        for _ in range(self.entries.num_heads):
            inner = _on_device(new_index(self.spec, self.entries.head_dim, self.l2_reduction, width), device)
            _apply_params(inner, self._search_params)
            row.append(_with_ids(inner))
        return row

    def search_params(self) -> dict:
        return dict(self._search_params)

    def options(self) -> dict:
        rerank = {"rerank": self.rerank} if self.rerank > 1 else {}
        return dict(train_size=self.train_size, l2_reduction=self.l2_reduction, **rerank, **self._search_params)

    def set_search_params(self, **params) -> None:
        """Set Faiss search parameters (e.g. `efSearch=128`, `nprobe=64`) on every index."""
        _apply_params(new_index(self.spec, self.entries.head_dim, self.l2_reduction), params)  # raises if unknown
        self._search_params.update(params)
        for row in self._rows:
            for index in row:
                _apply_params(inner_index(index), params)

    def add(self, ids: range) -> None:
        batch, heads = self.entries.batch_size, self.entries.num_heads
        while len(self._rows) < batch:
            self._rows.append(self._new_row(self.entries.device))
            self._bounds.append([None] * heads)
            self._radii.append([None] * heads)
            self._errors.append([None] * heads)
            self._outliers.append([np.zeros(0, dtype=np.int64) for _ in range(heads)])
            self._outlier_errors.append([np.zeros(0, dtype=np.float32) for _ in range(heads)])
            self._outlier_keys.append([faiss.IndexFlatIP(self._index_dim) for _ in range(heads)])
        keys = self.entries.keys_of(ids).detach().float().cpu()  # (B, H, T, D) as stored
        valid = self.entries.valid[:, ids.start : ids.stop].cpu()
        tasks = []
        for b, row in enumerate(self._rows):
            if not row[0].is_trained:
                self._maybe_train(b)  # trains on (and inserts) everything stored so far
                continue
            sel = valid[b]
            row_ids = np.arange(ids.start, ids.stop, dtype=np.int64)[sel.numpy()]
            tasks += [(b, h, keys[b, h, sel].numpy(), row_ids) for h in range(len(row))]
        _parallel(lambda task: self._insert(*task), tasks)
        if not self.entries.keep_keys and all(row[0].is_trained for row in self._rows):
            self.entries.drop_keys()

    def _maybe_train(self, b: int) -> None:
        sel = self.entries.valid[b].cpu()
        if int(sel.sum()) < max(self.train_size, 1):
            return
        row_ids = np.flatnonzero(sel.numpy()).astype(np.int64)
        stored = self.entries.keys()[b].detach().float().cpu()  # (H, M, D)

        def train(h: int) -> None:
            index, vectors = self._rows[b][h], stored[h, sel].numpy()
            reduced = self._index_vectors(b, h, vectors)
            index.train(reduced)
            distances, errors = self._insert(b, h, vectors, row_ids)  # no bounds yet: nothing is compared
            self._radii[b][h] = None if distances is None else float(distances.max(initial=0.0))
            if errors is not None and not self.entries.keep_keys:  # stored keys would rescore them anyway
                self._errors[b][h] = float(np.quantile(errors, 1 - RECONSTRUCTION_SHARE))
                worst = errors > self._errors[b][h]
                self._track(b, h, row_ids[worst], reduced[worst], errors[worst])

        _parallel(train, range(len(self._rows[b])))

    def _index_vectors(self, b: int, h: int, keys: np.ndarray) -> np.ndarray:
        """Keys (n, D) as the index stores them."""
        if not self.l2_reduction:
            return np.ascontiguousarray(keys)
        norms_sq = (keys.astype(np.float64) ** 2).sum(1)
        if self._bounds[b][h] is None:
            self._bounds[b][h] = float(norms_sq.max(initial=0.0))
        extra = np.sqrt(np.maximum(self._bounds[b][h] - norms_sq, 0.0)).astype(np.float32)
        return self._laid_out(np.concatenate([keys, extra[:, None]], axis=1))

    def _laid_out(self, reduced: np.ndarray) -> np.ndarray:
        """Reduced vectors (..., D + 1) in the index's layout (see `reduced_layout`)."""
        dim, positions = reduced_layout(self.spec, self.entries.head_dim, self._index_dim)
        if dim == reduced.shape[-1]:
            return np.ascontiguousarray(reduced)
        out = np.zeros(reduced.shape[:-1] + (dim,), dtype=np.float32)
        out[..., positions] = reduced
        return out

    def _insert(self, b: int, h: int, keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Add keys under ids, tracking outliers once the index has bounds; their `_add_with_ids` distances and
        errors."""
        if not len(ids):
            return None, None
        reduced = self._index_vectors(b, h, keys)
        distances, errors = _add_with_ids(self._rows[b][h], reduced, ids)
        far = np.zeros(len(ids), dtype=bool)
        if self._radii[b][h] is not None and distances is not None:
            far = distances > self._radii[b][h]
        self._track(b, h, ids[far], reduced[far])
        if self._errors[b][h] is not None and errors is not None:
            poor = ~far & (errors > self._errors[b][h])
            self._track(b, h, ids[poor], reduced[poor], errors[poor])
        tracked, total = len(self._outliers[b][h]), self._rows[b][h].ntotal
        if tracked > max(OUTLIER_WARNING_SHARE * total, OUTLIER_WARNING_MIN) and not self._warned_outliers:
            self._warned_outliers = True
            warnings.warn(
                f"{tracked:,} of {total:,} entries in a row of this {self.spec} memory lie farther from its "
                f"lists, or are reconstructed worse by its codes, than all but a few of the {self.train_size:,} "
                "entries they were trained on: every query scores them exactly, so searches slow down as they "
                "grow. What followed the training entries differs from them (another kind of text?): begin the "
                "memory with representative text, or raise train_size.")
        return distances, errors

    def _track(self, b: int, h: int, ids: np.ndarray, reduced: np.ndarray, errors: np.ndarray | None = None) -> None:
        """Search entries `ids` (vectors `reduced` as indexed) exactly beside the lists; their keys too, if not stored.
        With their code `errors`, only the worst coded RECONSTRUCTION_SHARE of the head's entries stay tracked."""
        if not len(ids):
            return
        errors = np.full(len(ids), np.nan, dtype=np.float32) if errors is None else errors.astype(np.float32)
        self._outliers[b][h] = np.concatenate([self._outliers[b][h], ids])
        self._outlier_errors[b][h] = np.concatenate([self._outlier_errors[b][h], errors])
        if not self.entries.keep_keys:
            self._outlier_keys[b][h].add(np.ascontiguousarray(reduced))
        errors = self._outlier_errors[b][h]
        by_error = np.flatnonzero(~np.isnan(errors))
        excess = len(by_error) - math.ceil(RECONSTRUCTION_SHARE * self._rows[b][h].ntotal)
        if excess <= 0:
            return
        # What follows the training entries may be coded worse throughout (other text): the share stays that of the
        # training entries, the worst coded are kept, and the bound rises past those let go (they keep their codes).
        drop = by_error[np.argsort(errors[by_error], kind="stable")[:excess]]
        self._errors[b][h] = max(self._errors[b][h], float(errors[drop].max()))
        kept = np.ones(len(errors), dtype=bool)
        kept[drop] = False
        self._outliers[b][h], self._outlier_errors[b][h] = self._outliers[b][h][kept], errors[kept]
        if not self.entries.keep_keys:
            self._outlier_keys[b][h].remove_ids(faiss.IDSelectorBatch(drop.astype(np.int64)))

    def search(self, queries: torch.Tensor, heads: slice) -> MemoryHits:
        batch, num_heads, num_queries, _ = queries.shape
        k = min(self.k, len(self.entries))
        # Rows an index answers: trained, and holding more entries than k (else the top k are all of
        # them, which an approximate index such as HNSW may not return in full). Others are exact.
        # Without stored keys every trained row is searched by its index, which holds them.
        indexed = [b for b in range(batch) if self._rows[b][0].is_trained
                   and (self._rows[b][0].ntotal > self.k or not self.entries.has_keys)]
        if len(indexed) < batch:
            exact = top_k_hits(self.entries, queries, heads, k)
            if not indexed:
                return exact
        # One conversion of the queries for Faiss: float32 on the CPU, with the reduction's zero coordinate.
        queries32 = queries.detach().float().cpu()
        if self.l2_reduction:
            queries32 = self._laid_out(torch.cat([queries32, queries32.new_zeros(queries32.shape[:-1] + (1,))], -1).numpy())
        else:
            queries32 = queries32.numpy()
        first_head = heads.start or 0
        listed = k * self.rerank  # candidates the lists return per query
        found: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

        def search_one(task):
            b, j = task
            h, q = first_head + j, np.ascontiguousarray(queries32[b, j])
            scores, candidates = self._search_index(b, h, q, listed)  # (T, listed), -1 where fewer
            if candidates.size and candidates.max() >= len(self.entries):  # ids in IVF lists are checked only here
                where = f"{self._source}.head{h}.faiss" if self._source else f"the index of head {h}"
                raise ValueError(f"{where}: returned entry id {candidates.max()}, outside the {len(self.entries)} "
                                 "entries (corrupted)")
            outliers = self._outliers[b][h]
            if self.entries.has_keys:  # outliers are scored exactly with the candidates below, the best k kept
                if len(outliers):
                    candidates = np.concatenate([candidates, np.broadcast_to(outliers, (num_queries, len(outliers)))], 1)
                found[b, j] = candidates, None
                return
            if len(outliers):  # their keys are in a flat index: its best k compete with the lists' by score
                exact_scores, positions = self._outlier_keys[b][h].search(q, min(k, len(outliers)))
                candidates = np.concatenate([candidates, outliers[positions]], 1)
                scores = np.concatenate([scores, exact_scores], 1)
            found[b, j] = candidates, scores

        _parallel(search_one, [(b, j) for b in indexed for j in range(num_heads)])
        width = max(c.shape[1] for c, _ in found.values())
        ids = torch.full((batch, num_heads, num_queries, width), -1, dtype=torch.long)
        scores = torch.full(ids.shape, float("-inf"))
        for (b, j), (candidates, found_scores) in found.items():
            ids[b, j, :, : candidates.shape[1]] = torch.from_numpy(candidates)
            if found_scores is not None:
                scores[b, j, :, : candidates.shape[1]] = torch.from_numpy(found_scores)
        ids = ids.to(queries.device)
        if self.entries.has_keys:  # each candidate is scored once, in torch, as attention would score it
            keys, values, valid = self.entries.take(ids, heads, keys=True)
            scores = torch.einsum("bhtd,bhtkd->bhtk", queries, keys.to(queries.dtype)).float()
        else:  # scored by the index
            values, valid = self.entries.take(ids, heads)
            scores = scores.to(queries.device)
        if width > k:
            # Outliers may repeat an id the lists returned: keep their copy, scored exactly without stored keys.
            repeated = _repeats(ids, listed)
            scores = scores.masked_fill(~valid | repeated, float("-inf"))
            scores, order = scores.topk(k, dim=-1)
            ids, values = ids.gather(-1, order), values.gather(-2, order[..., None].expand(-1, -1, -1, -1, values.shape[-1]))
            valid = valid.gather(-1, order) & (scores > float("-inf"))
        hits = MemoryHits(None, values, valid, ids, scores)
        if len(indexed) < batch:
            rows = torch.tensor([b not in indexed for b in range(batch)], device=queries.device)
            hits = MemoryHits(None, *(torch.where(_expand(rows, mine), theirs, mine)
                                      for mine, theirs in zip(hits[1:], exact[1:])))
        return hits

    def _search_index(self, b: int, h: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of queries (T, ·) by the index: their scores q·k as the index knows them, and ids (T, k).

        Under the L2 reduction the lists are probed by L2 (what they were trained for) but, where the codes allow
        (`_inner_product_view`), ranked by the inner product of the query with the decoded key: L2 would add the
        error of the decoded key's norm, |k'|² = R² only before compression, to every score. For `IVF1024,PQ17`
        over 1M entries of the shipped model this raised recall@128 on its real queries from 0.80 to 0.87.
        """
        index = self._rows[b][h]
        found = _inner_product_view(index) if self.l2_reduction else None
        if found is not None:
            (view, centroids), ivf = found, faiss.downcast_index(index)
            # Faiss reads preassigned lists as (T, min(nprobe, nlist)): more lists than there are is all of them.
            view.nprobe, view.max_codes = min(ivf.nprobe, ivf.nlist), ivf.max_codes
            _, lists = ivf.quantizer.search(queries, view.nprobe)
            coarse = np.einsum("td,tpd->tp", queries, centroids[np.maximum(lists, 0)]).astype(np.float32)
            return view.search_preassigned(queries, k, lists, coarse)
        distances, ids = index.search(queries, k)
        if not self.l2_reduction:
            return distances, ids
        norms_sq = (queries.astype(np.float64) ** 2).sum(1, keepdims=True)  # |q'|² = |q|²: its extra coordinate is 0
        return ((norms_sq + self._bounds[b][h] - distances) / 2).astype(np.float32), ids

    def export_state(self) -> tuple[dict, dict]:
        """Per head: a CPU copy of its index (named `head<h>.faiss`), and the L2-reduction bound and
        IVF outliers ({"radius": training radius or None, "error_bound": reconstruction error bound or None,
        "ids": ids searched exactly, "errors": the code error of each, None for those beyond the radius}) as metadata.
        A store holds one row."""
        if not len(self.entries) or not self._rows:
            return {}, {}
        if len(self._rows) != 1:
            raise ValueError(f"a store holds one memory row, this memory has {len(self._rows)}")
        indexes = {f"head{h}.faiss": _to_cpu(index) for h, index in enumerate(self._rows[0])}
        if not self.entries.keep_keys:
            indexes.update({f"head{h}.outliers.faiss": index for h, index in enumerate(self._outlier_keys[0])})
        outliers = [{"radius": radius, "error_bound": bound, "ids": ids.tolist(),
                     "errors": [None if np.isnan(e) else float(e) for e in errors]}
                    for radius, bound, ids, errors in zip(self._radii[0], self._errors[0], self._outliers[0],
                                                          self._outlier_errors[0])]
        return indexes, {"l2_bounds": list(self._bounds[0]), "ivf_outliers": outliers}

    def import_state(self, load: Callable[[], tuple[dict, dict]], source: str | None = None) -> None:
        """Adopt indexes built over the entries of the entry store (one row), as `load()` returns them on first
        search: a store opens without reading them. Stores written before outliers were tracked track none; before
        reconstruction errors were, none by error.
        `source` (the files' common prefix) names them in errors."""
        self._source = source
        self._pending = lambda: _unpack_state(*load(), self.entries.num_heads)

    def _adopt(self, rows, bounds, outliers, outlier_keys) -> None:
        device = self.entries.device
        self._index_dim = rows[0][0].d  # stores written before `reduced_widths` preferred fast widths have their own
        for index in (index for row in rows for index in row):
            l2_tables(inner_index(index))
        self._rows = [[_on_device(index, device) for index in row] for row in rows]
        self._bounds = [list(b) for b in bounds]
        self._radii = [[head["radius"] for head in row] for row in outliers]
        self._errors = [[head.get("error_bound") for head in row] for row in outliers]
        self._outliers = [[np.asarray(head["ids"], dtype=np.int64) for head in row] for row in outliers]
        self._outlier_errors = [[_outlier_errors(head) for head in row] for row in outliers]
        self._outlier_keys = outlier_keys
        for row in self._rows:
            for index in row:
                _apply_params(inner_index(index), self._search_params)

    def reorder_rows(self, rows: torch.Tensor) -> None:
        self._rows = [_clone_row(self._rows[i]) for i in rows.tolist()]
        self._bounds = [list(self._bounds[i]) for i in rows.tolist()]
        self._radii = [list(self._radii[i]) for i in rows.tolist()]
        self._errors = [list(self._errors[i]) for i in rows.tolist()]
        self._outliers = [list(self._outliers[i]) for i in rows.tolist()]
        self._outlier_errors = [list(self._outlier_errors[i]) for i in rows.tolist()]
        self._outlier_keys = [_clone_row(self._outlier_keys[i]) for i in rows.tolist()]


def _unpack_state(indexes: dict, metadata: dict, heads: int) -> tuple[list, list, list, list]:
    """`export_state`'s (indexes, metadata) of one row as [row][head] lists."""
    row = [indexes[f"head{h}.faiss"] for h in range(heads)]
    # A store lists outliers for every head (checked with its manifest); the file of their keys only without keys kept.
    found = (indexes.get(f"head{h}.outliers.faiss") for h in range(heads))
    outlier_keys = [faiss.IndexFlatIP(row[0].d) if keys is None else keys for keys in found]
    return [row], [list(metadata["l2_bounds"])], [metadata["ivf_outliers"]], [outlier_keys]


def _outlier_errors(head: dict) -> np.ndarray:
    """The code error of each outlier in the metadata of one head, NaN where none is recorded (beyond the radius, or
    written before tracked entries gave way to worse coded ones: those all stay tracked)."""
    errors = head.get("errors", [None] * len(head["ids"]))
    return np.array([np.nan if error is None else error for error in errors], dtype=np.float32)


def _repeats(ids: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) True where an id among the first k (listed) is one of the last n - k (outliers, distinct)."""
    repeated = (ids[..., :k, None] == ids[..., None, k:]).any(-1)  # (..., k)
    return torch.cat([repeated, torch.zeros_like(ids[..., k:], dtype=torch.bool)], dim=-1)


def _expand(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row flags (B,) broadcast against `like` (B, ...)."""
    return rows.view(-1, *([1] * (like.dim() - 1)))


_GPU_RESOURCES = None


def _on_device(index: faiss.Index, device: torch.device) -> faiss.Index:
    """`index` moved to the GPU of `device` when it is CUDA and Faiss has GPU support for this index type."""
    global _GPU_RESOURCES
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, device.index or 0, index)
    except RuntimeError:  # e.g. HNSW, which Faiss runs on CPU only
        warnings.warn(f"Faiss has no GPU version of {type(index).__name__}; it stays on CPU", stacklevel=3)
        return index


def _centroid_distances(index: faiss.Index, vectors: np.ndarray) -> np.ndarray | None:
    """How far each vector lies from its nearest IVF centroid (larger is farther); None if `index` is not a
    CPU IVF index."""
    ivf, outer = faiss.try_extract_index_ivf(index), faiss.downcast_index(index)
    if ivf is None:
        return None
    if isinstance(outer, faiss.IndexPreTransform):  # the lists hold vectors as its transforms (PCA, OPQ) leave them
        for step in range(outer.chain.size()):
            vectors = outer.chain.at(step).apply(vectors)
    return _nearest_lists(ivf, vectors)[0]


def _nearest_lists(ivf: faiss.Index, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far each vector lies from its nearest centroid of `ivf` (larger is farther), and that list (n, 1)."""
    found, lists = ivf.quantizer.search(np.ascontiguousarray(vectors), 1)
    return (-found[:, 0] if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else found[:, 0]), lists


def _add_with_ids(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Add `vectors` under `ids`; returns `_centroid_distances` of them and, for an IVF-PQ index, the squared error of
    their codes (None otherwise). A CPU IVF index of Flat, PQ or SQ codes gets the distances from the one coarse
    search that assigns the lists: computing them apart searched the quantizer twice, a sixth of indexing time."""
    ivf = faiss.downcast_index(index)
    if type(ivf) not in (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer):  # others add their own way
        index.add_with_ids(vectors, ids)
        return _centroid_distances(index, vectors), None
    vectors, ids = np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
    distances, lists = _nearest_lists(ivf, vectors)
    if type(ivf) is not faiss.IndexIVFPQ:
        ivf.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        return distances, None
    missed = np.empty_like(vectors)  # what the codes leave of each vector, from the encoding itself
    ivf.add_core_o(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(missed), faiss.swig_ptr(lists))
    return distances, (missed.astype(np.float64) ** 2).sum(1)


def _inner_product_view(index: faiss.Index) -> tuple[faiss.Index, np.ndarray] | None:
    """An inner-product IVF index over the same quantizer, codes and lists as the L2 IVF `index` (Flat, PQ and SQ
    codes; None for other kinds), and the centroids of its lists: searched with preassigned lists and the query's inner
    products with their centroids, it scores entries by q·(centroid + decoded residual). Made once per index object
    and dropped with it; the index itself stays an L2 index, as stored."""
    if index not in _INNER_PRODUCT_VIEWS:
        _INNER_PRODUCT_VIEWS[index] = _new_inner_product_view(faiss.downcast_index(index))
    return _INNER_PRODUCT_VIEWS[index]


_INNER_PRODUCT_VIEWS: "weakref.WeakKeyDictionary[faiss.Index, tuple | None]" = weakref.WeakKeyDictionary()


def _new_inner_product_view(ivf: faiss.Index) -> tuple[faiss.Index, np.ndarray] | None:
    ip = faiss.METRIC_INNER_PRODUCT
    if type(ivf) is faiss.IndexIVFPQ:
        view = faiss.IndexIVFPQ(ivf.quantizer, ivf.d, ivf.nlist, ivf.pq.M, ivf.pq.nbits, ip)
        view.pq = ivf.pq
    elif type(ivf) is faiss.IndexIVFScalarQuantizer:
        view = faiss.IndexIVFScalarQuantizer(ivf.quantizer, ivf.d, ivf.nlist, ivf.sq.qtype, ip, ivf.by_residual)
        view.sq = ivf.sq
    elif type(ivf) is faiss.IndexIVFFlat:
        view = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, ip)
    else:
        return None
    view.by_residual, view.is_trained, view.ntotal = ivf.by_residual, True, ivf.ntotal
    view.replace_invlists(ivf.invlists, False)  # shared: entries added to `ivf` later are found by the view too
    return view, ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _with_ids(index: faiss.Index) -> faiss.Index:
    """`index` able to hold entry ids: CPU IVF lists store ids themselves (also under a pre-transform such as
    OPQ); other kinds (refined, GPU, flat, graph) get an id map (8 more bytes an entry, and a reverse map in
    memory), which keeps a reference to `index`."""
    return index if holds_ids(index) else faiss.IndexIDMap2(index)


def holds_ids(index: faiss.Index) -> bool:
    """Whether `index` keeps the ids it is given: an IVF index, or one under pre-transforms."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexIVF)


def inner_index(index: faiss.Index) -> faiss.Index:
    """The index under an id map (stores written before IVF indexes held their own ids wrap those too)."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index


def mapped_lists(index: faiss.Index):
    """The memory-mapped (read-only) inverted lists of `index`, or None."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = None if ivf is None else faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of an index that may live on a GPU, or hold its lists in memory when they are mapped from a store:
    Faiss writes mapped lists as a reference to their file, not as their entries."""
    lists = mapped_lists(index)
    if lists is not None:
        ivf = faiss.try_extract_index_ivf(index)
        array = faiss.ArrayInvertedLists(lists.nlist, lists.code_size)
        for i in range(lists.nlist):
            if lists.list_size(i):
                array.add_entries(i, lists.list_size(i), lists.get_ids(i), lists.get_codes(i))
        owned, ivf.own_invlists = ivf.own_invlists, False  # else replacing the mapped lists would free them
        ivf.replace_invlists(array, False)  # serialized with the entries, then given its mapped lists back
        try:
            return faiss.deserialize_index(faiss.serialize_index(index), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)  # to write
        finally:
            ivf.replace_invlists(lists, owned)
    if "Gpu" in type(inner_index(index)).__name__:
        return faiss.index_gpu_to_cpu(index)  # Faiss's cloner keeps an id map
    return index


def _apply_params(index: faiss.Index, params: dict) -> None:
    space = faiss.ParameterSpace()
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"search parameter {name!r} must be a number, got {value!r}")
        # Faiss aborts the process on a search with nprobe or efSearch 0: refuse it before it gets there.
        if name in _COUNT_PARAMS and (value != int(value) or value < 1):
            raise ValueError(f"search parameter {name!r} must be a positive integer, got {value!r}")
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise ValueError(f"search parameter {name!r} does not apply to index {type(index).__name__}") from None


def _clone_row(row: list[faiss.Index]) -> list[faiss.Index]:
    return [faiss.clone_index(index) for index in row]

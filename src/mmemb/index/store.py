"""A FAISS inner-product index over L2-normalised vectors, with the items' metadata beside it.

An index is a folder, always written whole and atomically::

    INDEX/config.json   model, encode settings, index kind and parameters, dimension, count
    INDEX/index.faiss   the vectors; FAISS label i is row i of items.jsonl (the id map)
    INDEX/items.jsonl   one row per vector: id, text, instruction, images, meta, reasoned, rationale

Kinds: ``flat`` (exact; the default), ``ivf`` (inverted lists, trained on the vectors it is built
from; ``nprobe`` lists searched), ``hnsw`` (graph; ``ef_search`` candidates explored) and
``ivfpq`` (inverted lists of product-quantised codes: ``pq_m`` bytes a vector instead of 4 x dim,
for corpora whose float32 vectors do not fit in memory; scores are approximate).

Vectors can be added batch by batch from disk (:meth:`VectorIndex.add_batches`): an IVF index
then trains on a random sample drawn across all of them, and memory holds one batch, the sample,
the index itself and 16 bytes a row for the metadata (:class:`~mmemb.index.rows.RowStore`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..defaults import CORPUS_MODE, MAX_REASONING_TOKENS, THINK_THRESHOLD
from ..fileio import atomic_dir, read_json, write_json
from .rows import RowStore

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
FORMAT_VERSION = 1
TRAIN_PER_LIST = 64  # IVF k-means sample: vectors per list (FAISS wants at least 39)
PQ_CENTROIDS = 256  # 8-bit codes: each sub-quantiser has 256 centroids to train
PQ_TRAIN = 64 * PQ_CENTROIDS  # PQ sample size at least
ADD_BATCH = 16_384  # vectors handed to FAISS at once


@dataclass
class IndexConfig:
    model: str  # the checkpoint the vectors come from (search defaults to it)
    dim: int
    kind: str = "flat"
    mode: str = CORPUS_MODE  # how the items were encoded
    think_threshold: float = THINK_THRESHOLD
    max_reasoning_tokens: int = MAX_REASONING_TOKENS
    nlist: int | None = None  # ivf, ivfpq: number of lists (default ~sqrt(n), at most n/39)
    nprobe: int = 8  # ivf, ivfpq: lists searched per query
    pq_m: int | None = None  # ivfpq: bytes per vector (sub-quantisers; divides dim; default dim / 8)
    hnsw_m: int = 32  # hnsw: links per node
    ef_search: int = 64  # hnsw: candidates explored per query

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "ivfpq":
            self.pq_m = self.pq_m or max(1, self.dim // 8)
            if self.dim % self.pq_m:
                raise ValueError(f"pq_m ({self.pq_m}) must divide the dimension ({self.dim})")


@dataclass
class Hit:
    rank: int
    score: float  # inner product = cosine similarity
    id: str
    row: dict[str, Any]  # the item's stored metadata


class VectorIndex:
    def __init__(self, config: IndexConfig, faiss_index: Any = None, rows: RowStore | None = None):
        self.config = config
        self.faiss = faiss_index  # None until the first vectors arrive (IVF trains on them)
        self.rows = rows if rows is not None else RowStore()

    def __len__(self) -> int:
        return len(self.rows)

    def duplicate_ids(self, ids: list[str]) -> list[str]:
        """Ids that are already in the index or repeated in ``ids``."""
        return self.rows.duplicate_ids(ids)

    def add(self, vectors: np.ndarray, rows: list[dict]) -> None:
        """Add normalised vectors and their metadata rows (each with a unique ``id``)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.config.dim or len(vectors) != len(rows):
            raise ValueError(f"expected {len(rows)} vectors of dimension {self.config.dim}, got {vectors.shape}")
        dups = self.duplicate_ids([r["id"] for r in rows])
        if dups:
            raise ValueError(f"duplicate ids: {format_ids(dups)}")
        if not len(rows):
            return
        if self.faiss is None:
            self.faiss = _new_faiss_index(self.config, vectors)
        for lo in range(0, len(vectors), ADD_BATCH):  # FAISS's working memory grows with what one call adds
            self.faiss.add(vectors[lo:lo + ADD_BATCH])
        self.rows.extend(rows)

    def add_batches(self, batches: Callable[[], Iterable[tuple[np.ndarray, list[dict]]]], count: int,
                    seed: int = 0) -> None:
        """Add ``count`` vectors given as (vectors, rows) batches, one batch in memory at a time.

        ``batches()`` yields them afresh on each call: an index that still has to train (IVF) first
        draws a random sample of them (one pass), trains, then adds them (a second pass).
        """
        if self.faiss is None and self.config.kind in ("ivf", "ivfpq") and count:
            self.config.nlist = self.config.nlist or default_nlist(count)
            want = np.sort(np.random.default_rng(seed).choice(count, training_size(self.config, count), replace=False))
            sample, seen = [], 0
            for vectors, _ in batches():
                lo, hi = np.searchsorted(want, [seen, seen + len(vectors)])
                sample.append(np.asarray(vectors, np.float32)[want[lo:hi] - seen])
                seen += len(vectors)
            if seen != count:
                raise ValueError(f"expected {count} vectors, the batches hold {seen}")
            self.faiss = _new_faiss_index(self.config, np.concatenate(sample))
        for vectors, rows in batches():
            self.add(vectors, rows)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` best items for each query vector, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.faiss is None or not len(self):
            return [[] for _ in queries]
        self._set_search_params()
        scores, labels = self.faiss.search(queries, min(k, len(self)))
        results = []
        for srow, lrow in zip(scores, labels):
            found = [(float(s), int(j)) for s, j in zip(srow, lrow) if j >= 0]  # -1: fewer than k found
            results.append([Hit(r + 1, s, self.rows[j]["id"], self.rows[j]) for r, (s, j) in enumerate(found)])
        return results

    def save(self, path: str | Path) -> None:
        import faiss

        with atomic_dir(path) as tmp:
            write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, "count": len(self),
                                             **dataclasses.asdict(self.config)})
            self.rows.write(tmp / "items.jsonl")
            if self.faiss is not None:
                faiss.write_index(self.faiss, str(tmp / "index.faiss"))

    @classmethod
    def load(cls, path: str | Path) -> "VectorIndex":
        import faiss

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an index folder (no config.json)")
        raw = read_json(path / "config.json")
        if raw.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported index format")
        count = raw.pop("count")
        config = IndexConfig(**raw)
        rows = RowStore(path / "items.jsonl")
        index = faiss.read_index(str(path / "index.faiss")) if (path / "index.faiss").exists() else None
        n = 0 if index is None else index.ntotal
        if not (len(rows) == n == count):
            raise ValueError(f"{path}: {len(rows)} metadata rows, {n} vectors, {count} recorded: the index is damaged")
        return cls(config, index, rows)

    def _set_search_params(self) -> None:
        import faiss

        if self.config.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(self.faiss).nprobe = self.config.nprobe
        elif self.config.kind == "hnsw":
            self.faiss.hnsw.efSearch = self.config.ef_search


def default_nlist(n: int) -> int:
    """About sqrt(n) lists, keeping >= 39 training vectors per list (FAISS's k-means minimum)."""
    return max(1, min(round(math.sqrt(n)), n // 39))


def training_size(config: IndexConfig, count: int) -> int:
    """How many of ``count`` vectors an IVF index trains on (a random sample when there are more)."""
    nlist = config.nlist or default_nlist(count)
    wanted = TRAIN_PER_LIST * nlist
    if config.kind == "ivfpq":
        wanted = max(wanted, PQ_TRAIN)
    return min(count, wanted)


def _new_faiss_index(config: IndexConfig, sample: np.ndarray) -> Any:
    """An empty FAISS index of the config's kind; IVF kinds are trained on ``sample``."""
    import faiss

    d = config.dim
    if config.kind == "flat":
        return faiss.IndexFlatIP(d)
    if config.kind == "hnsw":
        return faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    n = len(sample)
    config.nlist = config.nlist or default_nlist(n)
    if config.nlist > n:
        raise ValueError(f"an IVF index with {config.nlist} lists needs at least {config.nlist} vectors "
                         f"to train on, got {n}")
    quantizer = faiss.IndexFlatIP(d)
    if config.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, config.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if n < PQ_CENTROIDS:
            raise ValueError(f"an IVF-PQ index needs at least {PQ_CENTROIDS} vectors to train its codebooks, got {n} "
                             "(use flat or ivf for small corpora)")
        index = faiss.IndexIVFPQ(quantizer, d, config.nlist, config.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def format_ids(ids: list[str], n: int = 5) -> str:
    """The first ``n`` ids for a message, and how many more there are."""
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")

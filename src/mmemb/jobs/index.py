"""``mmemb index build`` / ``index add`` / ``search``: JSONL corpora into an index, queries against it.

Encoding goes through :func:`mmemb.jobs.encode.encode_parts` into a work folder beside the index
(chunks of vectors on disk), so a killed build resumes where it stopped; the chunks then stream
into the index one at a time (a corpus's float32 vectors need not fit in memory), and the index
folder is replaced atomically at the end. Launched processes (``--num-processes N``) share the
chunks; the main process builds the index. Items that fail to encode are reported and left out
(fix them and ``index add`` them).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..defaults import BATCH_SIZE, DEFAULT_MODE
from ..fileio import iter_jsonl, read_jsonl
from ..index.store import Hit, IndexConfig, VectorIndex, format_ids
from ..items import Item
from ..model.embedder import Embedder, Encoded
from ..parallel import processes
from .encode import CHUNK_SIZE, encode_parts, read_items


@dataclass
class IndexReport:
    added: int
    total: int  # vectors in the index afterwards
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    seconds: float = 0.0


def build_index(embedder: Embedder, input_path: str | Path, out: str | Path, config: IndexConfig,
                batch_size: int = BATCH_SIZE, show_progress: bool = False, chunk_size: int = CHUNK_SIZE) -> IndexReport:
    """A new index at ``out`` (replacing one there) from a JSONL file of items.

    ``chunk_size``: items per saved chunk of vectors (the unit of resuming and of sharing work)."""
    if embedder.dim != config.dim:
        raise ValueError(f"the config says dimension {config.dim}, the model gives {embedder.dim}")
    return _encode_into(VectorIndex(config), embedder, input_path, Path(out), batch_size, show_progress, chunk_size)


def add_to_index(embedder: Embedder, input_path: str | Path, path: str | Path, batch_size: int = BATCH_SIZE,
                 show_progress: bool = False, chunk_size: int = CHUNK_SIZE) -> IndexReport:
    """Add the items of a JSONL file to an existing index (earlier items keep their ids)."""
    index = VectorIndex.load(path)
    if embedder.dim != index.config.dim:
        raise ValueError(f"the index holds {index.config.dim}-dimensional vectors; this model gives {embedder.dim}")
    return _encode_into(index, embedder, input_path, Path(path), batch_size, show_progress, chunk_size)


def search(index: VectorIndex, embedder: Embedder, queries: list[Any], k: int = 10,
           mode: str = DEFAULT_MODE) -> tuple[list[list[Hit]], Encoded]:
    """Encode queries (with the index's encode settings) and find their ``k`` best items."""
    c = index.config
    # on_error="raise": a query that cannot be encoded has no results to give
    enc = embedder.encode(queries, mode=mode, think_threshold=c.think_threshold,
                          max_reasoning_tokens=c.max_reasoning_tokens, on_error="raise")
    return index.search(enc.embeddings, k), enc


def _encode_into(index: VectorIndex, embedder: Embedder, input_path: str | Path, out: Path,
                 batch_size: int, show_progress: bool, chunk_size: int) -> IndexReport:
    start = time.perf_counter()
    items = read_items(input_path)  # unreadable lines stand as BadLines: failed rows, left out
    dups = index.duplicate_ids([item.id for item in items if isinstance(item, Item)])
    if dups:  # refused before any encoding
        raise ValueError(f"{input_path}: ids already in the index or repeated in the file: {format_ids(dups)} "
                         "(rows without an \"id\" are numbered by their line: give ids when adding)")
    c = index.config
    work = out.parent / f".{out.name}.work"
    parts = encode_parts(embedder, input_path, items, work / "vectors.parts", chunk_size, mode=c.mode,
                         batch_size=batch_size, think_threshold=c.think_threshold,
                         max_reasoning_tokens=c.max_reasoning_tokens, show_progress=show_progress)
    procs = processes()
    report = None
    if procs.is_main:  # the other processes only encoded their chunks
        before = len(index)
        failed = _add_parts(index, parts, items)
        index.save(out)
        shutil.rmtree(work, ignore_errors=True)
        report = IndexReport(added=len(index) - before, total=len(index), failed=failed,
                             seconds=time.perf_counter() - start)
    return procs.share(report)


def _add_parts(index: VectorIndex, parts: list[Path], items: list[Item]) -> list[tuple[str, str]]:
    """Stream encoded chunks (``encode_parts``' files) into the index, one chunk in memory at a time;
    returns the items that failed to encode, as (id, reason)."""
    starts, count, failed, pos = [], 0, [], 0
    for part in parts:
        starts.append(pos)
        for r in iter_jsonl(part.with_suffix(".jsonl")):
            pos += 1
            count += r["ok"]
            if not r["ok"]:
                failed.append((r["id"], r.get("error", "")))

    def batches() -> Iterator[tuple[np.ndarray, list[dict]]]:
        for part, first in zip(parts, starts):
            results = read_jsonl(part.with_suffix(".jsonl"))
            ok = [k for k, r in enumerate(results) if r["ok"]]
            yield np.load(part.with_suffix(".npy"))[ok], [_metadata(items[first + k], results[k]) for k in ok]

    index.add_batches(batches, count)
    return failed


def _metadata(item: Item, result: dict) -> dict:
    row = item.to_json()
    row.pop("rationale", None)  # an input field; the stored rationale is the one the model wrote
    for key in ("images", "video"):
        if key in row:  # absolute, so the index can be used from any folder
            row[key] = [s if s.startswith("data:") else os.path.abspath(s) for s in row[key]]
    row["reasoned"] = result["reasoned"]
    row["rationale"] = result["rationale"]
    return row

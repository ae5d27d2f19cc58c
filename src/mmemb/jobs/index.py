"""``mmemb index build`` / ``index add`` / ``search``: JSONL corpora into an index, queries against it.

Encoding goes through :func:`mmemb.jobs.encode.run_encode` into a work folder beside the index,
so a killed build resumes where it stopped; the index folder itself is replaced atomically at
the end. Items that fail to encode are reported and left out (fix them and ``index add`` them).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import BATCH_SIZE, DEFAULT_MODE
from ..fileio import read_jsonl
from ..index.store import Hit, IndexConfig, VectorIndex, format_ids
from ..items import Item
from ..model.embedder import Embedder, Encoded
from .encode import output_paths, read_items, run_encode


@dataclass
class IndexReport:
    added: int
    total: int  # vectors in the index afterwards
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    seconds: float = 0.0


def build_index(embedder: Embedder, input_path: str | Path, out: str | Path, config: IndexConfig,
                batch_size: int = BATCH_SIZE, show_progress: bool = False) -> IndexReport:
    """A new index at ``out`` (replacing one there) from a JSONL file of items."""
    if embedder.dim != config.dim:
        raise ValueError(f"the config says dimension {config.dim}, the model gives {embedder.dim}")
    return _encode_into(VectorIndex(config), embedder, input_path, Path(out), batch_size, show_progress)


def add_to_index(embedder: Embedder, input_path: str | Path, path: str | Path, batch_size: int = BATCH_SIZE,
                 show_progress: bool = False) -> IndexReport:
    """Add the items of a JSONL file to an existing index (earlier items keep their ids)."""
    index = VectorIndex.load(path)
    if embedder.dim != index.config.dim:
        raise ValueError(f"the index holds {index.config.dim}-dimensional vectors; this model gives {embedder.dim}")
    return _encode_into(index, embedder, input_path, Path(path), batch_size, show_progress)


def search(index: VectorIndex, embedder: Embedder, queries: list[Any], k: int = 10,
           mode: str = DEFAULT_MODE) -> tuple[list[list[Hit]], Encoded]:
    """Encode queries (with the index's encode settings) and find their ``k`` best items."""
    c = index.config
    # on_error="raise": a query that cannot be encoded has no results to give
    enc = embedder.encode(queries, mode=mode, think_threshold=c.think_threshold,
                          max_reasoning_tokens=c.max_reasoning_tokens, on_error="raise")
    return index.search(enc.embeddings, k), enc


def _encode_into(index: VectorIndex, embedder: Embedder, input_path: str | Path, out: Path,
                 batch_size: int, show_progress: bool) -> IndexReport:
    start = time.perf_counter()
    items = read_items(input_path)  # unreadable lines stand as BadLines: failed rows, left out
    dups = index.duplicate_ids([item.id for item in items if isinstance(item, Item)])
    if dups:  # refused before any encoding
        raise ValueError(f"{input_path}: ids already in the index or repeated in the file: {format_ids(dups)} "
                         "(rows without an \"id\" are numbered by their line: give ids when adding)")
    c = index.config
    work = out.parent / f".{out.name}.work"
    run_encode(embedder, input_path, work / "vectors", items=items, mode=c.mode, batch_size=batch_size,
               think_threshold=c.think_threshold, max_reasoning_tokens=c.max_reasoning_tokens,
               show_progress=show_progress)
    npy_path, jsonl_path = output_paths(work / "vectors")
    vectors, results = np.load(npy_path), read_jsonl(jsonl_path)
    ok = [k for k, r in enumerate(results) if r["ok"]]
    index.add(vectors[ok], [_metadata(items[k], results[k]) for k in ok])
    index.save(out)
    shutil.rmtree(work, ignore_errors=True)
    failed = [(r["id"], r.get("error", "")) for r in results if not r["ok"]]
    return IndexReport(added=len(ok), total=len(index), failed=failed, seconds=time.perf_counter() - start)


def _metadata(item: Item, result: dict) -> dict:
    row = item.to_json()
    row.pop("rationale", None)  # an input field; the stored rationale is the one the model wrote
    for key in ("images", "video"):
        if key in row:  # absolute, so the index can be used from any folder
            row[key] = [s if s.startswith("data:") else os.path.abspath(s) for s in row[key]]
    row["reasoned"] = result["reasoned"]
    row["rationale"] = result["rationale"]
    return row

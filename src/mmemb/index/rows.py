"""The index's metadata rows (one JSON object per vector, in vector order), kept on disk.

Memory per row is 16 bytes whatever the row holds: its byte offset, and a 64-bit hash of its id
for the duplicate check. Rows of a loaded index are read from its ``items.jsonl`` when asked;
rows added since are spooled to a temporary file. Saving streams both into the new file, so
neither a build nor a search holds the corpus's metadata in memory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

MERGE_EVERY = 1 << 16  # id hashes kept in a set before they join the sorted array


class RowStore:
    def __init__(self, path: str | Path | None = None):
        self._files: list[BinaryIO] = []  # [items.jsonl of the loaded index], then the spool
        self._offsets: list[array] = []  # per file: the byte offset of each row
        self._sorted = np.zeros(0, np.int64)  # id hashes, sorted
        self._recent: set[int] = set()  # id hashes not merged into _sorted yet
        if path is not None:
            f = open(path, "rb")
            offsets, hashes, pos = array("q"), [], 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                    hashes.append(_hash(json.loads(line)["id"]))
                pos += len(line)
            self._add_file(f, offsets)
            self._sorted = np.sort(np.array(hashes, np.int64))
        self._spool = tempfile.TemporaryFile()
        self._add_file(self._spool, array("q"))

    def __len__(self) -> int:
        return sum(len(o) for o in self._offsets)

    def __getitem__(self, j: int | slice) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        for f, offsets in zip(self._files, self._offsets):
            if j < len(offsets):
                f.seek(offsets[j])
                return json.loads(f.readline())
            j -= len(offsets)
        raise IndexError("row index out of range")

    def __iter__(self) -> Iterator[dict]:
        for f, offsets in zip(self._files, self._offsets):
            for offset in offsets:
                f.seek(offset)  # each time: a caller may read other rows between two of these
                yield json.loads(f.readline())

    def duplicate_ids(self, ids: list[str]) -> list[str]:
        """Ids that are already stored or repeated in ``ids``."""
        hashes = np.array([_hash(i) for i in ids], np.int64)
        pos = np.searchsorted(self._sorted, hashes).clip(max=max(len(self._sorted) - 1, 0))
        known = (self._sorted[pos] == hashes) if len(self._sorted) else np.zeros(len(ids), bool)
        candidates = {i for i, h, k in zip(ids, hashes.tolist(), known) if k or h in self._recent}
        stored = self._confirm(candidates) if candidates else set()  # a shared hash is not yet a shared id
        seen, dups = set(stored), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        return dups

    def extend(self, rows: Iterable[dict]) -> None:
        spool, offsets = self._files[-1], self._offsets[-1]
        spool.seek(0, 2)
        for row in rows:
            offsets.append(spool.tell())
            spool.write((json.dumps(row) + "\n").encode("utf-8"))
            self._recent.add(_hash(row["id"]))
        if len(self._recent) >= MERGE_EVERY:
            self._sorted = np.sort(np.concatenate([self._sorted, np.fromiter(self._recent, np.int64)]))
            self._recent.clear()

    def write(self, path: str | Path) -> None:
        """Every row, in order, into the JSONL file ``path`` (streamed)."""
        with open(path, "wb") as out:
            for f, offsets in zip(self._files, self._offsets):
                if len(offsets):
                    f.flush()
                    f.seek(offsets[0])
                    shutil.copyfileobj(f, out, 1 << 20)
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":  # a hand-edited file's last row
                        out.write(b"\n")

    def _add_file(self, f: BinaryIO, offsets: array) -> None:
        self._files.append(f)
        self._offsets.append(offsets)

    def _confirm(self, ids: set[str]) -> set[str]:
        return {r["id"] for r in self if r["id"] in ids}


def _hash(item_id: str) -> int:
    return hash(item_id)  # 64-bit; salted per process, which is fine: never stored

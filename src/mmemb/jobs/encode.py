"""``mmemb encode``: a JSONL file of items in, vectors (.npy) and per-item results (.jsonl) out.

Work is saved in parts as it finishes (every ``chunk_size`` items, and at least every
``save_every_s`` seconds), so a killed job resumes where it stopped; the final files appear
atomically at the end. A line that cannot be read (not UTF-8, not JSON, an unknown field, a
field of the wrong type) is a failed row named by file and line, like an item that cannot be
encoded: every other row is still encoded. Under ``accelerate launch`` / torchrun (``mmemb
encode --num-processes N``) the processes share the work and the main process merges it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from ..defaults import BATCH_SIZE, DEFAULT_MODE, DEFAULT_ON_ERROR
from ..fileio import (
    atomic_concat,
    atomic_concat_npy,
    atomic_save_npy,
    atomic_write_text,
    file_fingerprint,
    fingerprint,
    iter_jsonl,
    read_json,
    write_json,
    write_jsonl,
)
from ..items import Item, ItemError, check_text
from ..model.embedder import WINDOW_BATCHES, Embedder, Encoded
from ..parallel import processes, run_shared

CHUNK_SIZE = 2048  # rows a unit of work holds (about): saved at its end, shared between processes
SAVE_EVERY_S = 30.0
_PART = re.compile(r"^(\d{9})-(\d{9})$")


@dataclass
class BadLine:
    """A line of an items file that could not be made into an item; it becomes a failed row."""

    id: str
    error: str  # "FILE:LINE: why"


def read_items(path: str | Path, on_error: str = DEFAULT_ON_ERROR) -> list[Item | BadLine]:
    """Rows of a JSONL file (an item object or a plain string per line; blank lines skipped), image
    paths relative to the file's folder. Rows without an ``id`` are numbered by their position.

    A line that cannot be read raises a ValueError naming ``FILE:LINE`` (``on_error="raise"``) or
    stands as a :class:`BadLine` in its place (``"skip"``).
    """
    path = Path(path)
    rows: list[Item | BadLine] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                item = _parse_line(raw, path.parent)
            except ValueError as e:
                if on_error == "raise":
                    raise ValueError(f"{path}:{n}: {e}") from None
                rows.append(BadLine(_row_id(raw, len(rows)), f"{path}:{n}: {e}"))
                continue
            if item.id is None:
                item.id = str(len(rows))
            rows.append(item)
    return rows


def _parse_line(raw: bytes, root: Path) -> Item:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    item = Item.from_json({"text": row} if isinstance(row, str) else row, root=root)
    try:
        check_text(item)
    except ItemError as e:
        raise ValueError(e.reason) from None
    return item


def _row_id(raw: bytes, position: int) -> str:
    """A bad line's own id where it can still be read, else its position (as for rows without one)."""
    try:
        row = json.loads(raw.decode("utf-8"))
        if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and not isinstance(row["id"], bool):
            return str(row["id"])
    except ValueError:
        pass
    return str(position)


def output_paths(output: str | Path) -> tuple[Path, Path]:
    out = Path(output)
    if out.suffix in (".npy", ".jsonl"):
        out = out.with_suffix("")
    return out.with_suffix(".npy"), out.with_suffix(".jsonl")


def run_encode(embedder: Embedder, input_path: str | Path, output: str | Path, chunk_size: int = CHUNK_SIZE,
               on_error: str = DEFAULT_ON_ERROR, items: list[Item | BadLine] | None = None,
               save_every_s: float = SAVE_EVERY_S, show_progress: bool = False, **encode_kw) -> dict:
    """Encode the file's rows into OUTPUT.npy and OUTPUT.jsonl; returns the summary.

    ``items``: the file's rows where the caller has read them already (:func:`read_items`). Under
    ``accelerate launch`` / torchrun every process must call it: the processes share the work
    (:func:`encode_parts`), the main process merges it, streaming, and every process returns the
    summary. The files are the same whatever the number of processes and however often the run
    was killed and resumed.
    """
    rows = read_items(input_path, on_error) if items is None else items
    npy_path, jsonl_path = output_paths(output)
    work = npy_path.with_name(npy_path.stem + ".parts")
    parts = encode_parts(embedder, input_path, rows, work, chunk_size, on_error, save_every_s, show_progress,
                         **encode_kw)
    procs = processes()
    summary = None
    if procs.is_main:
        atomic_concat_npy(npy_path, [p.with_suffix(".npy") for p in parts], embedder.dim)
        atomic_concat(jsonl_path, [p.with_suffix(".jsonl") for p in parts])
        shutil.rmtree(work)
        summary = _summary(iter_jsonl(jsonl_path))
    return procs.share(summary)


def encode_parts(embedder: Embedder, input_path: str | Path, rows: list[Item | BadLine], parts: Path,
                 chunk_size: int = CHUNK_SIZE, on_error: str = DEFAULT_ON_ERROR,
                 save_every_s: float = SAVE_EVERY_S, show_progress: bool = False, **encode_kw) -> list[Path]:
    """Encode ``rows`` into parts saved as they finish (``PARTS/<first>-<stop>.npy`` + ``.jsonl``);
    returns every part (without suffix), in row order, once all rows are encoded.

    Rows are encoded in fixed blocks (at most ``batch_size`` × 16 items, the embedder's own
    window), so the vectors depend neither on when work was saved nor on which process encoded
    it. Blocks form units of about ``chunk_size`` rows: the work launched processes share (each
    takes the next unit nobody has), saved at the unit's end and at least every ``save_every_s``
    seconds; a finished unit leaves a ``<first>-<stop>.done`` marker.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    procs = processes()
    key = fingerprint("parts-v3", file_fingerprint(input_path), chunk_size, on_error, encode_kw)
    manifest = parts / "manifest.json"
    if procs.is_main:
        if parts.exists() and (not manifest.exists() or read_json(manifest).get("key") != key):
            print(f"input or options changed since the partial run in {parts}; starting over", file=sys.stderr)
            shutil.rmtree(parts)
        parts.mkdir(parents=True, exist_ok=True)
        write_json(manifest, {"key": key, "input": str(input_path)})
    procs.wait()

    n = len(rows)
    block = min(chunk_size, encode_kw.get("batch_size", BATCH_SIZE) * WINDOW_BATCHES)
    size = block * max(1, chunk_size // block)
    units = [(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def work(u: int, progress: Callable[[int], None]) -> None:
        lo, hi = units[u]
        first = _resume_point(parts, lo, hi)
        vectors, results, last_save = [], [], time.monotonic()
        for b0 in range(first, hi, block):
            vecs, res_rows = _encode_block(embedder, rows[b0:min(hi, b0 + block)], b0, on_error, encode_kw)
            vectors.append(vecs)
            results += res_rows
            stop = b0 + len(res_rows)
            progress(len(res_rows))
            if stop == hi or time.monotonic() - last_save >= save_every_s:
                part = parts / f"{first:09d}-{stop:09d}"
                atomic_save_npy(part.with_suffix(".npy"), np.concatenate(vectors))
                write_jsonl(part.with_suffix(".jsonl"), results)  # written last: marks the part done
                vectors, results, first, last_save = [], [], stop, time.monotonic()
        atomic_write_text(parts / f"{lo:09d}-{hi:09d}.done", "")

    bar = tqdm(total=n, desc=f"encode ({encode_kw.get('mode', DEFAULT_MODE)})", unit="item",
               disable=not (show_progress and procs.is_main))
    with bar:
        run_shared([hi - lo for lo, hi in units], lambda u: (parts / "{:09d}-{:09d}.done".format(*units[u])).exists(),
                   work, procs, bar, parts)
    return _done_parts(parts)


def _done_parts(parts: Path, lo: int = 0, hi: int | None = None) -> list[Path]:
    """Finished parts (their .jsonl exists) within rows ``lo:hi``, in order; they follow each other from ``lo``."""
    done = []
    for p in sorted(p.with_suffix("") for p in parts.glob("*.jsonl") if _PART.match(p.stem)):
        first, stop = map(int, _PART.match(p.name).groups())
        if first >= lo and (hi is None or stop <= hi):
            done.append((first, stop, p))
    expected = lo
    for first, stop, p in done:
        if first != expected:
            raise RuntimeError(f"{parts}: parts do not follow each other at row {expected}; delete the folder")
        expected = stop
    return [p for _, _, p in done]


def _resume_point(parts: Path, lo: int, hi: int) -> int:
    """Where the unit of rows ``lo:hi`` continues: after its parts saved before a kill."""
    done = _done_parts(parts, lo, hi)
    return int(_PART.match(done[-1].name).group(2)) if done else lo


def _encode_block(embedder: Embedder, rows: list[Item | BadLine], offset: int, on_error: str,
                  encode_kw: dict) -> tuple[np.ndarray, list[dict]]:
    """Vectors and result rows of one block; bad lines are failed rows (zero vectors)."""
    good = [k for k, r in enumerate(rows) if isinstance(r, Item)]
    vectors = np.zeros((len(rows), embedder.dim), np.float32)
    out = [_failed_row(r) if isinstance(r, BadLine) else {} for r in rows]
    if good:
        try:
            res = embedder.encode([rows[k] for k in good], on_error=on_error, show_progress=False, **encode_kw)
        except ItemError as e:  # name the item by its row in the whole file, not in the block
            raise ItemError(offset + good[e.index], e.item_id, e.reason) from None
        vectors[good] = res.embeddings
        for k, row in zip(good, _rows([rows[k] for k in good], res)):
            out[k] = row
    return vectors, out


def _failed_row(line: BadLine) -> dict:
    return {"id": line.id, "ok": False, "reasoned": False, "rationale": None, "p_think": 0.0,
            "prompt_tokens": 0, "generated_tokens": 0, "error": line.error}


def _rows(items: list[Item], res: Encoded) -> list[dict]:
    errors = {e.index: e.reason for e in res.errors}
    rows = []
    for k, item in enumerate(items):
        row = {"id": item.id, "ok": bool(res.ok[k]), "reasoned": bool(res.reasoned[k]),
               "rationale": res.rationales[k], "p_think": round(float(res.p_think[k]), 6),
               "prompt_tokens": int(res.prompt_tokens[k]), "generated_tokens": int(res.generated_tokens[k])}
        if k in errors:
            row["error"] = errors[k]
        rows.append(row)
    return rows


def _summary(rows: Iterable[dict]) -> dict:
    """Counts over the per-item rows (read once, so the rows may stream from disk)."""
    n = reasoned = prompt = generated = 0
    failed = []
    for r in rows:
        n += 1
        if not r["ok"]:
            failed.append({"id": r["id"], "error": r.get("error")})
        reasoned += bool(r["ok"] and r["reasoned"])
        prompt += r["prompt_tokens"]
        generated += r["generated_tokens"]
    ok = n - len(failed)
    return {"items": n, "failed": len(failed), "failed_rows": failed, "reasoned_share": reasoned / ok if ok else 0.0,
            "prompt_tokens": prompt, "generated_tokens": generated}

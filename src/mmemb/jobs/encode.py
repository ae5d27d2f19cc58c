"""``mmemb encode``: a JSONL file of items in, vectors (.npy) and per-item results (.jsonl) out.

Work is done in chunks saved as they finish, so a killed job resumes where it stopped; the
final files appear atomically at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ..fileio import atomic_save_npy, file_fingerprint, fingerprint, read_json, read_jsonl, write_json, write_jsonl
from ..items import Item, ItemError
from ..model.embedder import Embedder, Encoded


def read_items(path: str | Path) -> list[Item]:
    """Items from JSONL; image paths relative to the file's folder. Bad rows are named by line."""
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, str):
                    row = {"text": row}
                item = Item.from_json(row, root=path.parent)
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            if item.id is None:
                item.id = str(len(items))
            items.append(item)
    return items


def output_paths(output: str | Path) -> tuple[Path, Path]:
    out = Path(output)
    if out.suffix in (".npy", ".jsonl"):
        out = out.with_suffix("")
    return out.with_suffix(".npy"), out.with_suffix(".jsonl")


def run_encode(embedder: Embedder, input_path: str | Path, output: str | Path, chunk_size: int = 2048,
               on_error: str = "skip", items: list[Item] | None = None, **encode_kw) -> dict:
    """``items``: the file's items where the caller has read them already."""
    items = read_items(input_path) if items is None else items
    npy_path, jsonl_path = output_paths(output)
    parts = npy_path.with_name(npy_path.stem + ".parts")
    key = fingerprint(file_fingerprint(input_path), chunk_size, on_error,
                      {k: v for k, v in encode_kw.items() if k != "show_progress"})
    manifest = parts / "manifest.json"
    if parts.exists() and (not manifest.exists() or read_json(manifest).get("key") != key):
        print(f"input or options changed since the partial run in {parts}; starting over", file=sys.stderr)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"key": key, "input": str(input_path)})

    for c, start in enumerate(range(0, len(items), chunk_size)):
        part = parts / f"{c:06d}"
        if (part.with_suffix(".jsonl")).exists():
            continue
        try:
            res = embedder.encode(items[start:start + chunk_size], on_error=on_error, **encode_kw)
        except ItemError as e:  # name the item by its line in the whole file, not in the chunk
            raise ItemError(start + e.index, e.item_id, e.reason) from None
        atomic_save_npy(part.with_suffix(".npy"), res.embeddings)
        write_jsonl(part.with_suffix(".jsonl"), _rows(items[start:start + chunk_size], res))

    vectors = [np.load(p) for p in sorted(parts.glob("*.npy"))]
    rows = [r for p in sorted(parts.glob("*.jsonl")) for r in read_jsonl(p)]
    atomic_save_npy(npy_path, np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32))
    write_jsonl(jsonl_path, rows)
    shutil.rmtree(parts)
    return _summary(rows)


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


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["ok"]]
    return {
        "items": len(rows),
        "failed": len(rows) - len(ok),
        "reasoned_share": (sum(r["reasoned"] for r in ok) / len(ok)) if ok else 0.0,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "generated_tokens": sum(r["generated_tokens"] for r in rows),
    }

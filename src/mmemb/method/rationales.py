"""``mmemb rationales``: K candidate rationales per training query, from one or more teachers.

Rows (JSONL): query_id, dataset, teacher, k, sampling, text, tokens (and type, where known).
Resumable: rows already written for (query, teacher, k) are skipped; rows are appended whole,
so a kill never leaves a partial row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..fileio import JsonlAppender, iter_jsonl
from ..items import Pair
from .teachers import Teacher


def run_rationales(pairs: Sequence[Pair], teachers: Sequence[Teacher], k: int, out: str | Path,
                   tokenizer: Any = None, batch_size: int = 32, show_progress: bool = True) -> dict[str, int]:
    out = Path(out)
    done: set[tuple[str, str, int]] = set()
    if out.exists():
        done = {(r["query_id"], r["teacher"], r["k"]) for r in iter_jsonl(out)}
    written = 0
    with JsonlAppender(out) as writer:
        for teacher in teachers:
            todo = [p for p in pairs if any((p.id, teacher.id, j) not in done for j in range(k))]
            bar = tqdm(total=len(todo), desc=f"rationales ({teacher.id})", disable=not show_progress, unit="query")
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                for pair, candidates in zip(chunk, teacher.generate(chunk, k)):
                    for j, cand in enumerate(candidates[:k]):
                        if (pair.id, teacher.id, j) in done:
                            continue
                        row = {"query_id": pair.id, "dataset": pair.dataset, "teacher": teacher.id, "k": j,
                               "sampling": teacher.sampling, "text": cand.text,
                               "tokens": _count(cand, tokenizer)}
                        if cand.type is not None:
                            row["type"] = cand.type
                        writer.write(row)
                        written += 1
                bar.update(len(chunk))
            bar.close()
    return {"written": written, "skipped": len(done)}


def _count(cand, tokenizer) -> int:
    if tokenizer is not None:
        return len(tokenizer(cand.text, add_special_tokens=False)["input_ids"])
    if cand.tokens is not None:
        return cand.tokens
    return len(cand.text.split())


def load_rationales(path: str | Path) -> dict[str, list[dict]]:
    """Rationale rows grouped by query id."""
    by_query: dict[str, list[dict]] = {}
    for row in iter_jsonl(path):
        by_query.setdefault(row["query_id"], []).append(row)
    return by_query

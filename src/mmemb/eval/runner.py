"""The evaluation runner: tasks in, per-task predictions and scores plus a summary out.

For each task: encode the queries (``mode``: direct | reason | auto) in chunks saved as they
finish; encode each distinct candidate (``candidate_mode``, direct by default) once — distinct
by content, across queries and tasks — through an on-disk cache shared by runs of the same
model; score by cosine similarity; rank (local: the query's own list; global: every candidate);
compute the metrics; write ``RUN/<TASK>/predictions.jsonl`` and ``RUN/<TASK>/score.json``. Then
``RUN/summary.json`` and ``RUN/summary.md``.

Resumable: a rerun skips finished tasks and finished chunks, and yields the same ``score.json``
except for its ``run`` field (timings and how much came from the cache). Chunks are fixed slices
of each task, so a resumed run encodes exactly the batches an uninterrupted run would have.

Items that cannot be encoded (an unreadable image) are listed in ``score.json`` and count as
misses: a failed query scores 0 on every metric; a failed candidate ranks last.
"""

from __future__ import annotations

import io
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.loaders import DataNotFound, load_task
from ..data.mmeb import TaskInfo, resolve_tasks
from ..defaults import BATCH_SIZE, CORPUS_MODE, DEFAULT_MODE, MAX_REASONING_TOKENS, THINK_THRESHOLD
from ..fileio import atomic_write_bytes, atomic_write_text, fingerprint, read_json, write_json, write_jsonl
from ..items import RankingTask
from ..model.embedder import MODES, Embedder
from . import metrics as M
from .cache import DEFAULT_CACHE, EmbeddingCache, gate_fingerprint, item_digest, model_fingerprint
from .summary import aggregate, render_markdown

TOP_K = 10  # candidates written per query in predictions.jsonl
MAX_LISTED_FAILURES = 100


class EvalError(RuntimeError):
    """The run cannot go on; the message says why (e.g. an output folder made with other settings)."""


@dataclass
class EvalConfig:
    """Everything that shapes an evaluation run (the CLI flags of ``mmemb eval``)."""

    mode: str = DEFAULT_MODE  # queries: direct | reason | auto
    candidate_mode: str = CORPUS_MODE  # candidates: direct | reason | auto
    batch_size: int = BATCH_SIZE
    think_threshold: float = THINK_THRESHOLD
    max_reasoning_tokens: int = MAX_REASONING_TOKENS
    max_reasoning_steps: int | None = None
    limit: int | None = None  # only the first `limit` queries of each task (a quick look)
    temperature: float = 0.0
    chunk_batches: int = 4  # work is saved every chunk_batches * batch_size items
    data: str | None = None  # MiniMMEB folder or local MMEB-V2 copy
    split: str = "test"
    num_frames: int = 8
    cache_dir: str | None = None  # default: ~/.cache/mmemb/eval (or $MMEMB_CACHE/eval)
    show_progress: bool = True

    def __post_init__(self) -> None:
        for side in (self.mode, self.candidate_mode):
            if side not in MODES:
                raise ValueError(f"mode must be one of {MODES}, not {side!r}")
        if self.batch_size < 1 or self.chunk_batches < 1:
            raise ValueError("batch_size and chunk_batches must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")

    @property
    def chunk(self) -> int:
        return self.batch_size * self.chunk_batches

    def result_settings(self) -> dict[str, Any]:
        """The settings the scores depend on (where the data lives, caching and display do not)."""
        skip = {"data", "cache_dir", "show_progress"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def encode_kwargs(self, mode: str) -> dict[str, Any]:
        return dict(mode=mode, batch_size=self.batch_size, think_threshold=self.think_threshold,
                    max_reasoning_tokens=self.max_reasoning_tokens, max_reasoning_steps=self.max_reasoning_steps,
                    temperature=self.temperature, on_error="skip")

    def candidate_settings(self, embedder: Embedder) -> dict[str, Any]:
        """What a cached candidate vector depends on besides the model and the content."""
        s: dict[str, Any] = {"mode": self.candidate_mode}
        if self.candidate_mode != "direct":
            s.update(max_reasoning_tokens=self.max_reasoning_tokens, max_reasoning_steps=self.max_reasoning_steps,
                     temperature=self.temperature, batch_size=self.batch_size)
        if self.candidate_mode == "auto":
            s["think_threshold"] = self.think_threshold
            s["gate"] = gate_fingerprint(embedder.gate)
        return s


def evaluate(embedder: Embedder, tasks: str | Sequence[str | TaskInfo | RankingTask], out_dir: str | Path,
             mode: str = DEFAULT_MODE, **options: Any) -> dict[str, Any]:
    """Evaluate ``embedder`` on ``tasks`` into ``out_dir``; returns the summary (also in summary.json).

    ``tasks``: RankingTasks, registry TaskInfos, or names / groups as ``mmemb eval --tasks`` takes
    them (``data=`` points at their folder). ``options`` are :class:`EvalConfig` fields. An
    embedder with a plug-in gate uses it in ``auto`` mode.
    """
    cfg = EvalConfig(mode=mode, **options)
    out = Path(out_dir)
    settings = {"model": model_fingerprint(embedder), **cfg.result_settings()}
    if "auto" in (cfg.mode, cfg.candidate_mode):  # a plug-in gate makes the think / no-think decision
        settings["gate"] = gate_fingerprint(embedder.gate)
    _claim_run_dir(out, settings)
    cache = EmbeddingCache(cfg.cache_dir or DEFAULT_CACHE, settings["model"],
                           fingerprint(cfg.candidate_settings(embedder)))
    scores, unique_keys = [], set()
    encoded = from_cache = 0
    missing: dict[str, str] = {}  # tasks whose data is not there: named, skipped, the others go on
    for spec in _task_specs(tasks, cfg):
        try:
            task = spec if isinstance(spec, RankingTask) else load_task(spec, cfg.data, cfg.split, cfg.num_frames)
        except DataNotFound as e:
            missing[spec.name] = str(e)
            print(f"skipping {spec.name}: {e}", file=sys.stderr)
            continue
        task = first_queries(task, cfg.limit)
        score, keys = _run_task(embedder, task, out / task.name, cfg, cache, settings)
        scores.append(score)
        unique_keys.update(keys)
        encoded += score["run"]["candidates_encoded"]
        from_cache += score["run"]["candidates_from_cache"]
    if not scores and missing:
        raise EvalError("no task could be loaded:\n" + "\n".join(missing.values()))
    summary = aggregate(scores)
    summary["missing_tasks"] = missing
    refs = sum(s["candidate_refs"] for s in scores)
    summary["candidates"] = {"references": refs, "unique": len(unique_keys),
                             "dedup_ratio": len(unique_keys) / refs if refs else 0.0,
                             "encoded": encoded, "from_cache": from_cache}
    summary["settings"] = {"model_source": getattr(embedder.backbone, "source", None), **settings}
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_markdown(summary, title=f"Evaluation: {out.name}"))
    return summary


def first_queries(task: RankingTask, limit: int | None) -> RankingTask:
    """The task cut to its first ``limit`` queries, with the candidates they rank (all of them where
    ranking is global)."""
    if limit is None or limit >= len(task.queries):
        return task
    queries = task.queries[:limit]
    if task.eval_type == "global":
        return replace(task, queries=queries, relevance={q.id: task.relevance.get(q.id, {}) for q in queries})
    lists = {q.id: task.candidate_lists[q.id] for q in queries}
    kept = {cid for ids in lists.values() for cid in ids}
    return replace(task, queries=queries, candidates=[c for c in task.candidates if c.id in kept],
                   candidate_lists=lists, relevance={q.id: task.relevance.get(q.id, {}) for q in queries},
                   meta={**task.meta, "candidate_refs": sum(len(ids) for ids in lists.values())})


def _task_specs(tasks, cfg: EvalConfig) -> list[TaskInfo | RankingTask]:
    if isinstance(tasks, str):
        return resolve_tasks(tasks, cfg.data)
    out: list[TaskInfo | RankingTask] = []
    for t in tasks:
        out += resolve_tasks(t, cfg.data) if isinstance(t, str) else [t]
    return out


def _claim_run_dir(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings; refuse to mix results of other settings into the same folder."""
    path = out / "run.json"
    if path.exists():
        old = read_json(path)["settings"]
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise EvalError(f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                            f"use another --out, or delete {out} to start over")
        return
    write_json(path, {"settings": settings})


# ---- one task ----------------------------------------------------------------------------------
def _run_task(embedder: Embedder, task: RankingTask, tdir: Path, cfg: EvalConfig, cache: EmbeddingCache,
              settings: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    start = time.perf_counter()
    q_keys = [item_digest(q) for q in task.queries]
    c_keys = [item_digest(c) for c in task.candidates]
    task_fp = fingerprint(settings, task.name, task.eval_type, task.metric, q_keys, c_keys,
                          task.candidate_lists, task.relevance)
    done = tdir / "score.json"
    prev = read_json(done) if done.exists() else None
    if prev is not None and prev.get("task_fingerprint") == task_fp:
        return prev, set(c_keys)
    state = tdir / "task.json"
    if tdir.exists() and (not state.exists() or read_json(state).get("task_fingerprint") != task_fp):
        print(f"{task.name}: data or settings changed since the partial run in {tdir}; starting this task over",
              file=sys.stderr)
        shutil.rmtree(tdir)
    write_json(state, {"task_fingerprint": task_fp})

    pending = cache.missing(c_keys)
    distinct = len(set(c_keys))
    first: dict[str, int] = {}  # each distinct candidate's first position
    for i, k in enumerate(c_keys):
        first.setdefault(k, i)
    bar = tqdm(total=len(task.queries) + len(pending), desc=task.name, unit="item", disable=not cfg.show_progress)
    try:
        queries = _encode_queries(embedder, task, tdir / "queries", cfg, bar)
        cand_seconds = _encode_candidates(embedder, task, first, pending, cache, cfg, bar)
    finally:
        bar.close()
    vectors, ok, errors = cache.get(c_keys, embedder.dim)
    per_query, predictions = _score(task, queries, vectors, ok)
    write_jsonl(tdir / "predictions.jsonl", predictions)

    n = len(task.queries)
    failures = [{"side": "query", "id": task.queries[i].id, "reason": r} for i, r in sorted(queries["errors"].items())]
    failures += [{"side": "candidate", "id": task.candidates[first[k]].id, "reason": r} for k, r in errors.items()]
    reasoned = int(queries["reasoned"][queries["ok"]].sum())
    tokens = int(queries["generated_tokens"].sum())
    agg = M.mean_metrics(per_query)
    score = {
        "task": task.name, **{k: task.meta.get(k) for k in ("benchmark", "modality", "meta_task", "kind")},
        "eval_type": task.eval_type, "metric": task.metric, "main": agg[task.metric], "metrics": agg,
        "num_queries": n, "num_candidates": distinct, "candidate_refs": task.meta.get("candidate_refs", distinct),
        "reasoned_queries": reasoned, "invocation_ratio": reasoned / max(1, int(queries["ok"].sum())),
        "generated_tokens": tokens, "generated_tokens_per_query": tokens / n if n else 0.0,
        "failures": {"count": len(failures), "queries": len(queries["errors"]), "candidates": len(errors),
                     "items": failures[:MAX_LISTED_FAILURES]},
        "task_fingerprint": task_fp,
        "run": {  # how this run went: differs between an interrupted-and-resumed run and a fresh one
            "wall_seconds": time.perf_counter() - start,
            "query_encode_seconds": queries["seconds"],
            "seconds_per_query": queries["seconds"] / n if n else 0.0,
            "candidate_encode_seconds": cand_seconds,
            "candidates_encoded": len(pending),
            "candidates_from_cache": distinct - len(pending),
        },
    }
    write_json(done, score)
    return score, set(c_keys)


def _encode_queries(embedder: Embedder, task: RankingTask, qdir: Path, cfg: EvalConfig, bar) -> dict[str, Any]:
    """Query vectors and reasoning records, chunk by chunk; finished chunks are read back."""
    n, chunk = len(task.queries), cfg.chunk
    parts = []
    for c, lo in enumerate(range(0, n, chunk)):
        hi = min(n, lo + chunk)
        arrays_path, meta_path = qdir / f"{c:06d}.npz", qdir / f"{c:06d}.json"
        if not meta_path.exists():
            res = embedder.encode(task.queries[lo:hi], show_progress=False, **cfg.encode_kwargs(cfg.mode))
            buf = io.BytesIO()
            np.savez(buf, embeddings=res.embeddings, reasoned=res.reasoned, p_think=res.p_think,
                     generated_tokens=res.generated_tokens, ok=res.ok)
            atomic_write_bytes(arrays_path, buf.getvalue())
            write_json(meta_path, {"rationales": res.rationales, "seconds": res.seconds,
                                   "errors": {str(lo + e.index): e.reason for e in res.errors}})
        with np.load(arrays_path) as z:
            parts.append(({k: z[k] for k in z.files}, read_json(meta_path)))
        bar.update(hi - lo)
    dim = embedder.dim
    cat = (lambda key, dtype: np.concatenate([p[0][key] for p in parts]) if parts else np.zeros(0, dtype))
    return {
        "embeddings": np.concatenate([p[0]["embeddings"] for p in parts]) if parts else np.zeros((0, dim), np.float32),
        "reasoned": cat("reasoned", bool), "p_think": cat("p_think", np.float32),
        "generated_tokens": cat("generated_tokens", np.int64), "ok": cat("ok", bool),
        "rationales": [r for p in parts for r in p[1]["rationales"]],
        "errors": {int(i): r for p in parts for i, r in p[1]["errors"].items()},
        "seconds": float(sum(p[1]["seconds"] for p in parts)),
    }


def _encode_candidates(embedder: Embedder, task: RankingTask, first: dict[str, int], pending: list[str],
                       cache: EmbeddingCache, cfg: EvalConfig, bar) -> float:
    """Encode the candidates the cache lacks (``first``: key -> a candidate with it), one chunk (= one
    cache shard) at a time."""
    seconds = 0.0
    for lo in range(0, len(pending), cfg.chunk):
        keys = pending[lo:lo + cfg.chunk]
        res = embedder.encode([task.candidates[first[k]] for k in keys], show_progress=False,
                              **cfg.encode_kwargs(cfg.candidate_mode))
        cache.add(keys, res.embeddings, res.ok, {e.index: e.reason for e in res.errors})
        seconds += res.seconds
        bar.update(len(keys))
    return seconds


# ---- scoring -----------------------------------------------------------------------------------
def _score(task: RankingTask, queries: dict[str, Any], vectors: np.ndarray, ok: np.ndarray
           ) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    """Per-query metrics and prediction rows (cosine = dot product of the normalised vectors)."""
    pos = {c.id: i for i, c in enumerate(task.candidates)}
    qvecs = queries["embeddings"]
    per_query, rows = [], []
    all_idx = np.arange(len(task.candidates))
    for qi, q in enumerate(task.queries):
        gold = task.relevance.get(q.id, {})
        if task.eval_type == "global":  # the whole pool: no per-query copy of the candidate matrix
            idx, where, cvecs, cok = all_idx, pos, vectors, ok
        else:
            ids = task.candidate_lists[q.id]
            idx, where = np.array([pos[c] for c in ids], int), {c: j for j, c in enumerate(ids)}
            cvecs, cok = vectors[idx], ok[idx]
        row: dict[str, Any] = {"query_id": q.id, "gold": gold, "reasoned": bool(queries["reasoned"][qi]),
                               "rationale": queries["rationales"][qi],
                               "p_think": round(float(queries["p_think"][qi]), 6),
                               "generated_tokens": int(queries["generated_tokens"][qi])}
        if not queries["ok"][qi]:
            m = M.zero_metrics()
            row.update(top=[], failed=queries["errors"].get(qi, "not encoded"))
        else:
            scores = (cvecs @ qvecs[qi]).astype(np.float64)
            scores[~cok] = -np.inf
            rel = np.zeros(len(idx))
            for cid, r in gold.items():
                rel[where[cid]] = r
            order = M.rank(scores, rel)
            m = M.query_metrics(rel[order].tolist(), gold.values())
            row["top"] = [[task.candidates[idx[i]].id, _round(scores[i])] for i in order[:TOP_K]]
        row[task.metric] = m[task.metric]
        per_query.append(m)
        rows.append(row)
    return per_query, rows


def _round(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)

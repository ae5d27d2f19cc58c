"""The evaluation runner: tasks in, per-task predictions and scores plus a summary out.

Encode the queries of every unfinished task (``mode``: direct | reason | auto) in chunks saved as
they finish, and each distinct candidate (``candidate_mode``, direct by default) once — distinct
by content, across queries and tasks — through an on-disk cache shared by runs of the same
model; then, per task, score by cosine similarity; rank (local: the query's own list; global:
every candidate); compute the metrics; write ``RUN/<TASK>/predictions.jsonl`` and
``RUN/<TASK>/score.json``. Then ``RUN/summary.json`` and ``RUN/summary.md``.

Resumable: a rerun skips finished tasks and finished chunks, and yields the same ``score.json``
except for its ``run`` field (timings and how much came from the cache). Chunks are fixed slices
of each task's queries and of the candidates pending, so a resumed run encodes exactly the
batches an uninterrupted run would have.

Under ``accelerate launch`` / torchrun (``mmemb eval --num-processes N``) every process runs
``evaluate``: all tasks' chunks form one pool the processes share (each distinct candidate is
still encoded once, by one process), and the main process scores every task and writes the
files, the same files one process writes.

Items that cannot be encoded (an unreadable image) are listed in ``score.json`` and count as
misses: a failed query scores 0 on every metric; a failed candidate ranks last.
"""

from __future__ import annotations

import io
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
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
from ..parallel import Processes, processes, run_shared
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
    start = time.perf_counter()
    cfg = EvalConfig(mode=mode, **options)
    out = Path(out_dir)
    procs = processes()
    settings = {"model": model_fingerprint(embedder), **cfg.result_settings()}
    if "auto" in (cfg.mode, cfg.candidate_mode):  # a plug-in gate makes the think / no-think decision
        settings["gate"] = gate_fingerprint(embedder.gate)
    _claim_run_dir(out, settings, procs)
    cache = EmbeddingCache(cfg.cache_dir or DEFAULT_CACHE, settings["model"],
                           fingerprint(cfg.candidate_settings(embedder)))
    runs, missing = [], {}  # missing: tasks whose data is not there: named, skipped, the others go on
    for spec in _task_specs(tasks, cfg):
        try:
            task = spec if isinstance(spec, RankingTask) else load_task(spec, cfg.data, cfg.split, cfg.num_frames)
        except DataNotFound as e:
            missing[spec.name] = str(e)
            if procs.is_main:
                print(f"skipping {spec.name}: {e}", file=sys.stderr)
            continue
        runs.append(_open_task(first_queries(task, cfg.limit), out, settings, procs))
    if not runs and missing:
        raise EvalError("no task could be loaded:\n" + "\n".join(missing.values()))
    todo = [r for r in runs if r.score is None]
    _encode(embedder, todo, cache, cfg, procs, out)
    if not procs.is_main:  # the main process scores and writes
        return procs.share(None)
    for r in todo:
        r.score = _score_task(r, embedder.dim, cache, cfg, start)
    scores = [r.score for r in runs]
    summary = aggregate(scores)
    summary["missing_tasks"] = missing
    refs = sum(s["candidate_refs"] for s in scores)
    unique = len({k for r in runs for k in r.c_keys})
    summary["candidates"] = {"references": refs, "unique": unique, "dedup_ratio": unique / refs if refs else 0.0,
                             "encoded": sum(s["run"]["candidates_encoded"] for s in scores),
                             "from_cache": sum(s["run"]["candidates_from_cache"] for s in scores)}
    summary["settings"] = {"model_source": getattr(embedder.backbone, "source", None), **settings}
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_markdown(summary, title=f"Evaluation: {out.name}"))
    return procs.share(summary)


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


def _claim_run_dir(out: Path, settings: dict[str, Any], procs: Processes) -> None:
    """Record the run's settings; refuse to mix results of other settings into the same folder."""
    path = out / "run.json"
    if path.exists():
        old = read_json(path)["settings"]
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise EvalError(f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                            f"use another --out, or delete {out} to start over")
        return
    if procs.is_main:
        write_json(path, {"settings": settings})


# ---- tasks ---------------------------------------------------------------------------------------
@dataclass
class _TaskRun:
    """A task of this run: its content keys, and its score once finished (before, or by this run)."""

    task: RankingTask
    dir: Path
    fingerprint: str
    q_keys: list[str]
    c_keys: list[str]
    score: dict[str, Any] | None = None
    encoded: list[str] = field(default_factory=list)  # the pending candidates first seen in this task
    candidate_seconds: float = 0.0  # their share of the encoding time


def _open_task(task: RankingTask, out: Path, settings: dict[str, Any], procs: Processes) -> _TaskRun:
    q_keys = [item_digest(q) for q in task.queries]
    c_keys = [item_digest(c) for c in task.candidates]
    run = _TaskRun(task, out / task.name, fingerprint(settings, task.name, task.eval_type, task.metric, q_keys,
                                                      c_keys, task.candidate_lists, task.relevance), q_keys, c_keys)
    done = run.dir / "score.json"
    prev = read_json(done) if done.exists() else None
    if prev is not None and prev.get("task_fingerprint") == run.fingerprint:
        run.score = prev
        return run
    state = run.dir / "task.json"
    if procs.is_main:
        if run.dir.exists() and (not state.exists() or read_json(state).get("task_fingerprint") != run.fingerprint):
            print(f"{task.name}: data or settings changed since the partial run in {run.dir}; starting this task over",
                  file=sys.stderr)
            shutil.rmtree(run.dir)
        write_json(state, {"task_fingerprint": run.fingerprint})
    return run


def _encode(embedder: Embedder, todo: list[_TaskRun], cache: EmbeddingCache, cfg: EvalConfig, procs: Processes,
            out: Path) -> None:
    """Encode the unfinished tasks' query chunks and the candidates the cache lacks, all tasks' work in one
    pool shared by the processes; each chunk is saved as it finishes."""
    cache.refresh()
    pending = cache.missing([k for r in todo for k in r.c_keys])
    procs.wait()  # every process knows what is pending before any adds to the cache
    first: dict[str, tuple[_TaskRun, int]] = {}  # each candidate's first task and position there
    for r in todo:
        for i, k in enumerate(r.c_keys):
            first.setdefault(k, (r, i))
    for k in pending:
        first[k][0].encoded.append(k)
    # the units: fixed chunks of each task's queries, then of the pending candidates (one cache shard each)
    q_chunks = [(r, c, lo, min(len(r.q_keys), lo + cfg.chunk))
                for r in todo for c, lo in enumerate(range(0, len(r.q_keys), cfg.chunk))]
    c_chunks = [pending[lo:lo + cfg.chunk] for lo in range(0, len(pending), cfg.chunk)]
    nq = len(q_chunks)

    def done(u: int) -> bool:
        if u >= nq:
            return cache.has_shard(c_chunks[u - nq])
        r, c, _, _ = q_chunks[u]
        return (r.dir / "queries" / f"{c:06d}.json").exists()

    def work(u: int, progress) -> None:  # the bar counts whole chunks here
        if u < nq:
            _encode_query_chunk(embedder, *q_chunks[u], cfg)
            return
        keys = c_chunks[u - nq]
        res = embedder.encode([first[k][0].task.candidates[first[k][1]] for k in keys], show_progress=False,
                              **cfg.encode_kwargs(cfg.candidate_mode))
        cache.add(keys, res.embeddings, res.ok, {e.index: e.reason for e in res.errors}, seconds=res.seconds)

    sizes = [hi - lo for _, _, lo, hi in q_chunks] + [len(keys) for keys in c_chunks]
    with tqdm(total=sum(sizes), desc="eval", unit="item", disable=not (cfg.show_progress and procs.is_main)) as bar:
        run_shared(sizes, done, work, procs, bar, out)
    if procs.is_main:
        cache.refresh()  # the shards the other processes wrote
        for keys in c_chunks:  # each chunk's encoding time, shared out by candidate
            share = cache.shard_seconds(keys) / len(keys)
            for k in keys:
                first[k][0].candidate_seconds += share


def _score_task(r: _TaskRun, dim: int, cache: EmbeddingCache, cfg: EvalConfig, start: float) -> dict[str, Any]:
    """Score a task whose vectors are all encoded; write its predictions and score (main process)."""
    task, n = r.task, len(r.task.queries)
    queries = _read_queries(r.dir / "queries", -(-n // cfg.chunk), dim)
    vectors, ok, errors = cache.get(r.c_keys, dim)
    per_query, predictions = _score(task, queries, vectors, ok)
    write_jsonl(r.dir / "predictions.jsonl", predictions)

    distinct = len(set(r.c_keys))
    position = {k: i for i, k in reversed(list(enumerate(r.c_keys)))}  # each candidate's first position
    failures = [{"side": "query", "id": task.queries[i].id, "reason": e} for i, e in sorted(queries["errors"].items())]
    failures += [{"side": "candidate", "id": task.candidates[position[k]].id, "reason": e} for k, e in errors.items()]
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
        "task_fingerprint": r.fingerprint,
        "run": {  # how this run went: differs between an interrupted-and-resumed run and a fresh one
            "wall_seconds": time.perf_counter() - start,  # since the run started: the tasks' work is pooled
            "query_encode_seconds": queries["seconds"],
            "seconds_per_query": queries["seconds"] / n if n else 0.0,
            "candidate_encode_seconds": r.candidate_seconds,
            "candidates_encoded": len(r.encoded),
            "candidates_from_cache": distinct - len(r.encoded),
        },
    }
    write_json(r.dir / "score.json", score)
    return score


def _encode_query_chunk(embedder: Embedder, r: _TaskRun, c: int, lo: int, hi: int, cfg: EvalConfig) -> None:
    """Encode queries ``lo:hi`` into ``TASK/queries/<c>.npz`` (vectors, reasoning records) and ``<c>.json``."""
    qdir = r.dir / "queries"
    res = embedder.encode(r.task.queries[lo:hi], show_progress=False, **cfg.encode_kwargs(cfg.mode))
    buf = io.BytesIO()
    np.savez(buf, embeddings=res.embeddings, reasoned=res.reasoned, p_think=res.p_think,
             generated_tokens=res.generated_tokens, ok=res.ok)
    atomic_write_bytes(qdir / f"{c:06d}.npz", buf.getvalue())
    write_json(qdir / f"{c:06d}.json", {"rationales": res.rationales, "seconds": res.seconds,
                                        "errors": {str(lo + e.index): e.reason for e in res.errors}})


def _read_queries(qdir: Path, chunks: int, dim: int) -> dict[str, Any]:
    """The query chunks' vectors and reasoning records, joined in order."""
    parts = []
    for c in range(chunks):
        with np.load(qdir / f"{c:06d}.npz") as z:
            parts.append(({k: z[k] for k in z.files}, read_json(qdir / f"{c:06d}.json")))
    cat = (lambda key, dtype: np.concatenate([p[0][key] for p in parts]) if parts else np.zeros(0, dtype))
    return {
        "embeddings": np.concatenate([p[0]["embeddings"] for p in parts]) if parts else np.zeros((0, dim), np.float32),
        "reasoned": cat("reasoned", bool), "p_think": cat("p_think", np.float32),
        "generated_tokens": cat("generated_tokens", np.int64), "ok": cat("ok", bool),
        "rationales": [r for p in parts for r in p[1]["rationales"]],
        "errors": {int(i): r for p in parts for i, r in p[1]["errors"].items()},
        "seconds": float(sum(p[1]["seconds"] for p in parts)),
    }


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

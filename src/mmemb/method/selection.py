"""Counterfactual pair-aware selection: keep a rationale only where it makes the match better.

For a pair (query q, positive t+) and each candidate rationale r:

    s(r) = log p(t+ | q with r teacher-forced)   over the pair's candidate set
    s(0) = log p(t+ | q embedded directly)        the intervention do(r = empty)
    delta(r) = s(r) - s(0)

where p is the softmax of cosine similarities / temperature over the candidate set (positive,
the pair's hard negatives, and positives of other pairs of the same dataset). The pair is
labelled ``reason`` with its best rationale when that rationale's utility exceeds the margin, else
``direct``. Rationales that imitate reasoning without helping the match ("format only") or
that mislead it (a misread digit, an arithmetic slip) are dropped.

The utility is delta in nats (``utility="logprob"``) or the gain in probability,
p(t+ | q, r) - p(t+ | q) (``utility="prob"``). Both are computed and stored; the config says
which one the margin applies to. The log scale magnifies changes deep in the tail (0.01 -> 0.03
is 1.1 nats, with the positive still far from first) and caps what a rationale can show where
the direct match is already likely (p = 0.7 allows at most 0.36 nats); the probability gain
weighs a change by how much it moves the positive's chance of being the match.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fileio import JsonlAppender, iter_jsonl
from ..items import Item, Pair, load_visuals
from ..model.embedder import Embedder
from ..model.prefix_cache import embed_tails, prefill
from ..model.prompts import render_prompt
from ..model.teacher_forcing import build_forced_batch, forced_forward, rationale_ids


UTILITIES = ("logprob", "prob")


@dataclass
class SelectionConfig:
    margin: float = 0.0
    utility: str = "logprob"  # what the margin applies to: logprob (delta, nats) | prob (gain in p(t+))
    temperature: float = 0.02  # the contrastive temperature the model was trained with
    sampled_negatives: int = 16  # positives of other pairs (same dataset) added to each candidate set
    queries_per_batch: int = 16
    max_rationale_tokens: int = 128
    reuse_prompt: bool = True  # prefill each query once for all its rationales
    seed: int = 0


def select(embedder: Embedder, pairs: Sequence[Pair], rationales: dict[str, list[dict]], out: str | Path,
           config: SelectionConfig | None = None, show_progress: bool = True) -> dict:
    """Score every pair's candidate rationales and append one row per pair to ``out`` (resumable)."""
    cfg = config or SelectionConfig()
    if cfg.utility not in UTILITIES:
        raise ValueError(f"selection utility must be one of {', '.join(UTILITIES)}, not {cfg.utility!r}")
    out = Path(out)
    done = {r["pair_id"] for r in iter_jsonl(out)} if out.exists() else set()
    todo = [p for p in pairs if p.id not in done and rationales.get(p.id)]
    start = time.perf_counter()
    by_dataset: dict[str, list[Pair]] = {}
    for p in todo:
        by_dataset.setdefault(p.dataset, []).append(p)
    bar = tqdm(total=len(todo), desc="select", disable=not show_progress, unit="pair")
    with JsonlAppender(out) as writer:
        for dataset, group in by_dataset.items():
            for s in range(0, len(group), cfg.queries_per_batch):
                chunk = group[s:s + cfg.queries_per_batch]
                for row in score_chunk(embedder, chunk, rationales, cfg):
                    writer.write(row)
                bar.update(len(chunk))
    bar.close()
    return {"pairs": len(todo), "skipped": len(done), "seconds": time.perf_counter() - start}


def candidate_sets(chunk: Sequence[Pair], n_sampled: int, seed: int) -> list[list[Item]]:
    """Positive first, then the pair's hard negatives, then other pairs' positives (distinct content)."""
    rng = random.Random(f"{seed}/{chunk[0].id}")
    sets = []
    for i, pair in enumerate(chunk):
        items = [pair.positive, *pair.negatives]
        seen = {it.content_key() for it in items}
        others = [p.positive for j, p in enumerate(chunk) if j != i]
        rng.shuffle(others)
        for it in others:
            if len(items) >= 1 + len(pair.negatives) + n_sampled:
                break
            if it.content_key() not in seen:
                seen.add(it.content_key())
                items.append(it)
        sets.append(items)
    return sets


@torch.no_grad()
def score_chunk(embedder: Embedder, chunk: Sequence[Pair], rationales: dict[str, list[dict]],
                cfg: SelectionConfig) -> list[dict]:
    bb = embedder.backbone
    sets = candidate_sets(chunk, cfg.sampled_negatives, cfg.seed)
    unique: dict[tuple, int] = {}  # content -> row of ``cand``: each distinct candidate encoded once
    flat, set_rows = [], []
    for items in sets:
        rows = []
        for it in items:
            key = it.content_key()
            if key not in unique:
                unique[key] = len(flat)
                flat.append(it)
            rows.append(unique[key])
        set_rows.append(torch.tensor(rows))
    cand = torch.from_numpy(embedder.encode(flat, mode="direct", on_error="raise").embeddings)

    # Each pair: the direct tail (do(r = empty)) and one tail per candidate rationale.
    owners, tails, rat_tokens = [], [], []
    for q, pair in enumerate(chunk):
        owners.append(q)
        tails.append([bb.ids.emb])
        rat_tokens.append(None)
        for row in rationales[pair.id]:
            ids = rationale_ids(bb, row["text"])[: cfg.max_rationale_tokens]
            owners.append(q)
            tails.append([bb.ids.think, *ids, bb.ids.end_think, bb.ids.emb])
            rat_tokens.append(ids)
    queries = [p.query for p in chunk]
    prompts = [render_prompt(bb.processor, it) for it in queries]
    visuals = [load_visuals(it) for it in queries]
    if cfg.reuse_prompt:
        state = prefill(bb, prompts, visuals)
        emb = embed_tails(bb, state.repeat(torch.tensor(owners, device=bb.device)), tails)
    else:
        batch = build_forced_batch(bb, [prompts[o] for o in owners], [visuals[o] for o in owners], rat_tokens)
        emb = forced_forward(bb, bb, batch).embeddings
    emb = emb.cpu()

    scores = []
    for k, q in enumerate(owners):
        logits = cand[set_rows[q]] @ emb[k] / cfg.temperature
        scores.append(float(torch.log_softmax(logits, dim=0)[0]))
    rows, k = [], 0
    for q, pair in enumerate(chunk):
        s_direct = scores[k]
        k += 1
        cands = []
        for row in rationales[pair.id]:
            entry = {"teacher": row["teacher"], "k": row["k"], "delta": scores[k] - s_direct,
                     "gain": math.exp(scores[k]) - math.exp(s_direct), "text": row["text"]}
            if "type" in row:
                entry["type"] = row["type"]
            cands.append(entry)
            k += 1
        verdict = {"utility": cfg.utility, "margin": cfg.margin}
        best = max(cands, key=lambda c: utility(verdict, c))
        reason = utility(verdict, best) > cfg.margin
        rows.append({
            "pair_id": pair.id, "dataset": pair.dataset, "kind": pair.meta.get("kind"),
            "s_direct": s_direct, "label": "reason" if reason else "direct",
            "rationale": best["text"] if reason else None, "rationale_teacher": best["teacher"] if reason else None,
            "delta": best["delta"], **verdict, "candidates": cands,
        })
    return rows


def utility(row: dict, candidate: dict) -> float:
    """The candidate's utility in the units the row's margin is in (rows written before the
    ``utility`` field existed used delta)."""
    return candidate["gain"] if row.get("utility") == "prob" else candidate["delta"]


def labelled_pairs(pairs: Sequence[Pair], selection_path: str | Path) -> list[Pair]:
    """The pairs with the selection's label, and the selected rationale on the query."""
    verdicts = {r["pair_id"]: r for r in iter_jsonl(selection_path)}
    out = []
    for p in pairs:
        v = verdicts.get(p.id)
        if v is None:
            continue
        out.append(p.with_rationale(v["rationale"], v["label"]))
    return out


def kept_counts(rows: Iterable[dict], key: Callable[[dict, dict], Any]) -> dict[Any, list[int]]:
    """[kept, candidates] per group, ``key(pair_row, candidate)`` naming each candidate's group; kept
    means utility > margin."""
    counts: dict[Any, list[int]] = {}
    for r in rows:
        for c in r["candidates"]:
            n = counts.setdefault(key(r, c), [0, 0])
            n[0] += utility(r, c) > r["margin"]
            n[1] += 1
    return counts


def kept_shares(selection_path: str | Path) -> dict:
    """Per task kind and rationale type: the share of candidate rationales whose utility > margin."""
    counts = kept_counts(iter_jsonl(selection_path), lambda r, c: (r.get("kind") or "all", c.get("type", "unknown")))
    shares: dict[str, dict[str, float]] = {}
    for (kind, typ), (kept, total) in sorted(counts.items()):
        shares.setdefault(kind, {})[typ] = kept / total
    return shares


def utilities_by_type(rows: Iterable[dict]) -> dict[str, np.ndarray]:
    """Candidate utilities grouped as "<task kind>/<rationale type>"."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        for c in r["candidates"]:
            groups.setdefault(f"{r.get('kind') or 'all'}/{c.get('type', 'unknown')}", []).append(utility(r, c))
    return {k: np.array(v) for k, v in groups.items()}

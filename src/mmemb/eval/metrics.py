"""Ranking metrics: Hit@k, NDCG@k (linear gain), Recall@k, MRR, and a deterministic ranking.

Definitions (one query; ``rel_i`` is the graded relevance of the candidate at rank i, 1-based;
relevant means rel > 0):

* Hit@k     = 1 if a relevant candidate is in the top k, else 0.
* Recall@k  = (relevant candidates in the top k) / (relevant candidates of the query).
* NDCG@k    = DCG@k / IDCG@k with linear gain: DCG@k = sum_{i<=k} rel_i / log2(i + 1); IDCG@k is
              the DCG@k of the ideal order of *all* the query's relevant candidates (not only those
              that were ranked), so missing a relevant candidate costs.
* MRR       = 1 / rank of the first relevant candidate (0 if none is ranked).

A query with no relevant candidate scores 0 on every metric (loaders leave such queries out).

Ties: candidates are ordered by score, highest first; equal scores are broken *against* the
gold — the less relevant candidate first — and then by candidate order. So a model that gives
every candidate the same score gets no credit, however the candidates were listed (MMEB puts
the positive first; an "earliest wins" rule would hand such a model Hit@1 = 1).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

KS = (1, 5, 10)


def rank(scores: np.ndarray, relevance: np.ndarray | None = None) -> np.ndarray:
    """Candidate indices from best to worst: score desc, then relevance asc, then position."""
    scores = np.asarray(scores, dtype=np.float64)
    rel = np.zeros(len(scores)) if relevance is None else np.asarray(relevance, dtype=np.float64)
    return np.lexsort((np.arange(len(scores)), rel, -scores))


def hit_at_k(ranked_rel: Sequence[float], k: int) -> float:
    return float(any(r > 0 for r in ranked_rel[:k]))


def recall_at_k(ranked_rel: Sequence[float], n_relevant: int, k: int) -> float:
    if n_relevant <= 0:
        return 0.0
    return sum(1 for r in ranked_rel[:k] if r > 0) / n_relevant


def dcg(gains: Iterable[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked_rel: Sequence[float], all_rel: Iterable[float], k: int) -> float:
    """Linear-gain NDCG@k; the ideal DCG comes from all the query's relevant candidates."""
    ideal = dcg(sorted((r for r in all_rel if r > 0), reverse=True)[:k])
    if ideal <= 0:
        return 0.0
    return dcg(list(ranked_rel[:k])) / ideal


def reciprocal_rank(ranked_rel: Sequence[float]) -> float:
    for i, r in enumerate(ranked_rel, 1):
        if r > 0:
            return 1.0 / i
    return 0.0


def query_metrics(ranked_rel: Sequence[float], all_rel: Iterable[float], ks: Sequence[int] = KS) -> dict[str, float]:
    """Every metric for one query, from the relevances in ranked order (only the head is needed
    for the @k metrics; MRR needs the ranks down to the first relevant candidate)."""
    all_rel = [r for r in all_rel if r > 0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(ranked_rel, k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(ranked_rel, all_rel, k)
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked_rel, len(all_rel), k)
    out["mrr"] = reciprocal_rank(ranked_rel)
    return out


def zero_metrics(ks: Sequence[int] = KS) -> dict[str, float]:
    """A miss on every metric (a query that could not be encoded)."""
    return query_metrics([], [], ks)


def mean_metrics(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    if not per_query:
        return {}
    return {key: float(np.mean([m[key] for m in per_query])) for key in per_query[0]}

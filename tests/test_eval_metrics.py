"""Ranking metrics on hand-computed cases, graded NDCG among them, and the tie-breaking rule."""

from math import log2

import numpy as np
import pytest

from mmemb.eval import metrics as M


def test_binary_relevance_second_place():
    m = M.query_metrics([0, 1, 0, 0], [1])
    assert m["hit@1"] == 0 and m["hit@5"] == 1 and m["hit@10"] == 1
    assert m["recall@1"] == 0 and m["recall@5"] == 1
    assert m["mrr"] == 0.5
    assert m["ndcg@1"] == 0
    assert m["ndcg@5"] == pytest.approx(1 / log2(3))  # = 0.6309


def test_graded_ndcg_linear_gain():
    # Relevant candidates of the query: grades 3, 2, 2, 1. The ranking puts grades 2, 3, -, 1, - in
    # the top 5; the other grade-2 candidate is ranked below 5.
    ranked = [2, 3, 0, 1, 0, 2]
    dcg5 = 2 / log2(2) + 3 / log2(3) + 1 / log2(5)
    idcg5 = 3 / log2(2) + 2 / log2(3) + 2 / log2(4) + 1 / log2(5)
    assert M.ndcg_at_k(ranked, [3, 2, 2, 1], 5) == pytest.approx(dcg5 / idcg5)
    assert dcg5 / idcg5 == pytest.approx(0.75950, abs=1e-5)
    # Recall counts relevant candidates, not their grades: 3 of 4 in the top 5.
    assert M.recall_at_k(ranked, 4, 5) == 0.75
    assert M.ndcg_at_k(ranked, [3, 2, 2, 1], 1) == pytest.approx(2 / 3)


def test_ideal_dcg_counts_relevant_items_that_were_not_ranked():
    # Two relevant candidates; only one appears in the ranking at all.
    assert M.ndcg_at_k([1, 0, 0], [1, 1], 5) == pytest.approx(1 / (1 + 1 / log2(3)))  # 0.6131
    assert M.recall_at_k([1, 0, 0], 2, 5) == 0.5


def test_no_relevant_candidate_and_failed_query_score_zero():
    assert all(v == 0 for v in M.query_metrics([0, 0], []).values())
    zero = M.zero_metrics()
    assert set(zero) == {"hit@1", "hit@5", "hit@10", "ndcg@1", "ndcg@5", "ndcg@10",
                         "recall@1", "recall@5", "recall@10", "mrr"}
    assert all(v == 0 for v in zero.values())


def test_rank_by_score_then_against_gold_then_by_position():
    scores = np.array([0.2, 0.9, 0.5, 0.9])
    assert M.rank(scores).tolist() == [1, 3, 2, 0]
    # All scores equal (a collapsed model): the relevant candidate goes last, the rest keep their order.
    order = M.rank(np.zeros(4), np.array([1.0, 0, 0, 0]))
    assert order.tolist() == [1, 2, 3, 0]
    assert M.query_metrics(np.array([1.0, 0, 0, 0])[order].tolist(), [1])["hit@1"] == 0
    # Graded ties: less relevant first.
    assert M.rank(np.ones(3), np.array([2.0, 1.0, 0.0])).tolist() == [2, 1, 0]
    # -inf (failed candidates) rank last.
    assert M.rank(np.array([-np.inf, 0.1, -0.3])).tolist() == [1, 2, 0]


def test_mean_metrics():
    mean = M.mean_metrics([M.query_metrics([1], [1]), M.query_metrics([0, 0, 1], [1])])
    assert mean["hit@1"] == 0.5 and mean["mrr"] == pytest.approx((1 + 1 / 3) / 2)

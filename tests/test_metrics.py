"""Metrics on hand-made rankings whose answers are known."""

import numpy as np
import pytest

from rshash.evaluation.metrics import (
    average_precision_duch,
    average_precision_standard,
    hamming_distance,
    precision_at,
    radius_counts,
    ranked_relevance,
    score_retrieval,
)


def test_duch_and_standard_map_differ():
    # R = 3 relevant items at ranks 1, 4, 6; K = 2.
    rel = np.array([[1, 0, 0, 1, 0, 1]], dtype=bool)
    # DUCH: T = min(2, 3) = 2; AP = (1/1 + 2/4) / 2 = 0.75
    assert average_precision_duch(rel, 2)[0] == pytest.approx(0.75)
    # standard: top-2 holds one relevant at rank 1 → AP = 1
    assert average_precision_standard(rel, 2)[0] == pytest.approx(1.0)
    # whole ranking: (1 + 2/4 + 3/6) / 3
    assert average_precision_duch(rel, 6)[0] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_no_relevant_item_scores_zero():
    rel = np.zeros((1, 5), dtype=bool)
    assert average_precision_duch(rel, 3)[0] == 0.0
    assert average_precision_standard(rel, 3)[0] == 0.0


def test_relevant_beyond_k_counts_in_duch_only():
    rel = np.array([[0, 0, 0, 1]], dtype=bool)  # R = 1, at rank 4, K = 2
    assert average_precision_duch(rel, 2)[0] == pytest.approx(0.25)
    assert average_precision_standard(rel, 2)[0] == 0.0


def test_hamming_distance_exact():
    q = np.array([[1, 1, -1, -1]], dtype=np.int8)
    x = np.array([[1, 1, -1, -1], [-1, -1, 1, 1], [1, -1, -1, -1]], dtype=np.int8)
    assert hamming_distance(q, x).tolist() == [[0, 4, 1]]


def test_ties_broken_by_retrieval_order():
    q = np.array([[1, 1]], dtype=np.int8)
    items = np.array([[1, -1], [-1, 1], [1, 1]], dtype=np.int8)  # distances 1, 1, 0
    labels = np.array([5, 7, 9])
    rel = ranked_relevance(hamming_distance(q, items), np.array([7]), labels)
    # ranking: item 2 (d=0), then item 0 before item 1 (tie, stable)
    assert rel.tolist() == [[False, False, True]]
    rel2 = ranked_relevance(hamming_distance(q, items), np.array([5]), labels)
    assert rel2.tolist() == [[False, True, False]]


def test_precision_at_and_radius_counts():
    rel = np.array([[1, 0, 1, 1]], dtype=bool)
    assert precision_at(rel, [1, 2, 4, 10]).tolist() == [[1.0, 0.5, 0.75, 0.75]]
    dist = np.array([[0, 2, 1, 2]], dtype=np.uint8)
    mask = np.array([[True, False, False, True]])
    within, rel_within = radius_counts(dist, mask, 2)
    assert within.tolist() == [[1, 2, 4]] and rel_within.tolist() == [[1, 1, 2]]


def test_score_retrieval_perfect_codes():
    rng = np.random.default_rng(0)
    centres = np.sign(rng.standard_normal((3, 32))).astype(np.int8)
    labels = np.repeat(np.arange(3), 10)
    items = centres[labels]
    s = score_retrieval(centres, np.arange(3), items, labels, ks=(5, 10))
    assert s.map_at[10].tolist() == [1.0, 1.0, 1.0]
    assert s.map_all.mean() == 1.0
    assert s.radius_recall[-1] == 1.0
    assert s.radius_precision[0] == 1.0


def test_blocked_scoring_equals_one_block():
    rng = np.random.default_rng(1)
    q = np.where(rng.standard_normal((300, 16)) > 0, 1, -1).astype(np.int8)
    x = np.where(rng.standard_normal((2000, 16)) > 0, 1, -1).astype(np.int8)
    ql, xl = rng.integers(0, 5, 300), rng.integers(0, 5, 2000)
    blocked = score_retrieval(q, ql, x, xl, block=64)
    whole = score_retrieval(q, ql, x, xl, block=300)
    assert np.array_equal(blocked.map_at[20], whole.map_at[20])
    assert np.allclose(blocked.radius_precision, whole.radius_precision)
    assert np.allclose(blocked.radius_recall, whole.radius_recall)
    rel = ranked_relevance(hamming_distance(q, x), ql, xl)
    assert np.allclose(blocked.map_all, average_precision_duch(rel, 2000))

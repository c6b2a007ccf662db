"""Retrieval metrics on Hamming rankings, as pure NumPy functions (PROTOCOL.md).

Rankings sort by Hamming distance with ties broken by retrieval-set order (a stable sort), so
every number is deterministic. Work is done in blocks of queries so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def hamming_distance(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Distances (Q×N, uint8/uint16) between ±1 codes: (K − ⟨q, x⟩) / 2, computed exactly."""
    bits = queries.shape[1]
    dot = queries.astype(np.float32) @ items.astype(np.float32).T
    dist = np.rint((bits - dot) / 2)
    return dist.astype(np.uint8 if bits < 256 else np.uint16)


def ranked_relevance(
    dist: np.ndarray, query_labels: np.ndarray, item_labels: np.ndarray
) -> np.ndarray:
    """Relevance (Q×N bool) of items in ranked order: stable sort by distance."""
    order = np.argsort(dist, axis=1, kind="stable")
    return item_labels[order] == query_labels[:, None]


def relevant_ranks(relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every relevant item in ranked relevance (Q×N): its query, its 1-based position j
    among that query's relevant items, and its 1-based rank r_j; plus R per query."""
    rows, cols = np.nonzero(relevant)
    counts = np.bincount(rows, minlength=relevant.shape[0])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    j = np.arange(len(rows)) - starts[rows] + 1
    return rows, np.stack([j, cols + 1]), counts


def ap_duch_from_ranks(
    rows: np.ndarray, j_and_rank: np.ndarray, counts: np.ndarray, k: int
) -> np.ndarray:
    """DUCH AP@K from `relevant_ranks` output (see `average_precision_duch`)."""
    t = np.minimum(k, counts)
    j, rank = j_and_rank
    keep = j <= t[rows]
    score = np.bincount(rows[keep], weights=j[keep] / rank[keep], minlength=len(counts))
    return np.divide(score, t, out=np.zeros(len(t)), where=t > 0)


def average_precision_duch(relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@K in the DUCH definition, per query, from ranked relevance (Q×N).

    T = min(K, R) with R the number of relevant items; AP = (1/T) Σ_{j≤T} j / r_j, where r_j is
    the rank of the j-th relevant item in the full ranking. R = 0 scores 0.
    """
    return ap_duch_from_ranks(*relevant_ranks(relevant), k)


def average_precision_standard(relevant: np.ndarray, k: int) -> np.ndarray:
    """Truncated AP@K: mean of precision@i over relevant positions i ≤ K (0 if none in top K)."""
    top = relevant[:, :k]
    hits = np.cumsum(top, axis=1)
    ranks = np.arange(1, top.shape[1] + 1)
    score = np.where(top, hits / ranks, 0.0).sum(axis=1)
    n = hits[:, -1]
    return np.divide(score, n, out=np.zeros(len(n)), where=n > 0)


def precision_at(relevant: np.ndarray, ks: Sequence[int] | np.ndarray) -> np.ndarray:
    """Precision@k (Q×len(ks)) for each k (clipped to the number of items)."""
    hits = np.cumsum(relevant, axis=1)
    cols = np.minimum(np.asarray(ks), relevant.shape[1]) - 1
    return hits[:, cols] / (cols + 1)


def radius_counts(
    dist: np.ndarray, relevant_mask: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query and radius r = 0..K: items within r, and relevant items within r."""
    q = dist.shape[0]
    flat = (np.arange(q)[:, None] * (bits + 1) + dist).ravel()
    within = np.bincount(flat, minlength=q * (bits + 1)).reshape(q, bits + 1)
    rel_flat = flat[relevant_mask.ravel()]
    rel_within = np.bincount(rel_flat, minlength=q * (bits + 1)).reshape(q, bits + 1)
    return np.cumsum(within, axis=1), np.cumsum(rel_within, axis=1)


@dataclass
class RetrievalScores:
    """Per-query scores of one direction; `summary` averages them."""

    map_at: dict[int, np.ndarray]
    map_at_standard: dict[int, np.ndarray]
    map_all: np.ndarray
    precision_ks: np.ndarray
    precision: np.ndarray
    radius_precision: np.ndarray
    radius_recall: np.ndarray

    def summary(self) -> dict[str, object]:
        return {
            **{f"map@{k}_duch": float(v.mean()) for k, v in self.map_at.items()},
            **{f"map@{k}_standard": float(v.mean()) for k, v in self.map_at_standard.items()},
            "map_all": float(self.map_all.mean()),
            "precision_at_k": {
                "k": self.precision_ks.tolist(),
                "precision": self.precision.mean(0).tolist(),
            },
            "pr_radius": {
                "radius": list(range(len(self.radius_precision))),
                "precision": self.radius_precision.tolist(),
                "recall": self.radius_recall.tolist(),
            },
        }


def _blocks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def score_retrieval(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    item_codes: np.ndarray,
    item_labels: np.ndarray,
    ks: Sequence[int] = (5, 10, 20, 50, 100),
    precision_ks: Sequence[int] = (1, 5, 10, 20, 50, 100, 200, 500, 1000),
    block: int = 256,
) -> RetrievalScores:
    """Every PROTOCOL.md metric for one direction (queries against a retrieval set).

    Radius precision is averaged over queries that retrieve at least one item at that radius;
    radius recall over all queries with at least one relevant item.
    """
    bits = query_codes.shape[1]
    n_items = item_codes.shape[0]
    pks = np.array([k for k in precision_ks if k <= n_items] or [n_items])
    map_at: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    map_std: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    map_all: list[np.ndarray] = []
    prec: list[np.ndarray] = []
    within_sum = np.zeros(bits + 1)
    within_n = np.zeros(bits + 1)
    recall_sum = np.zeros(bits + 1)
    recall_n = 0
    top = max(max(ks), int(pks.max()))
    for sl in _blocks(len(query_codes), block):
        dist = hamming_distance(query_codes[sl], item_codes)
        rel = ranked_relevance(dist, query_labels[sl], item_labels)
        ranks = relevant_ranks(rel)
        head = rel[:, :top]
        for k in ks:
            map_at[k].append(ap_duch_from_ranks(*ranks, k))
            map_std[k].append(average_precision_standard(head, k))
        map_all.append(ap_duch_from_ranks(*ranks, n_items))
        prec.append(precision_at(head, pks))
        mask = item_labels[None, :] == query_labels[sl, None]
        within, rel_within = radius_counts(dist, mask, bits)
        has = within > 0
        within_sum += np.where(has, rel_within / np.maximum(within, 1), 0).sum(0)
        within_n += has.sum(0)
        total_rel = mask.sum(1)
        ok = total_rel > 0
        recall_sum += (rel_within[ok] / total_rel[ok, None]).sum(0)
        recall_n += int(ok.sum())
    return RetrievalScores(
        map_at={k: np.concatenate(v) for k, v in map_at.items()},
        map_at_standard={k: np.concatenate(v) for k, v in map_std.items()},
        map_all=np.concatenate(map_all),
        precision_ks=pks,
        precision=np.concatenate(prec),
        radius_precision=within_sum / np.maximum(within_n, 1),
        radius_recall=recall_sum / max(recall_n, 1),
    )

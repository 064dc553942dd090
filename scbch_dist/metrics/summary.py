"""From per-query scores to the metrics a run reports: means over the queries that have a relevant
item, the tie-aware twins from the histograms, and the precision-recall curves."""

from __future__ import annotations

import numpy as np

from scbch_dist.metrics.sums import QueryScores, mean_of_scored
from scbch_dist.metrics.tie_aware import (Histograms, expected_hits_at_k, pr_curve_radius, tie_aware_ap,
                                          tie_aware_ap_at_k)


def pr_points(num_db: int, points: int = 16) -> np.ndarray:
    """The cut-offs k of the precision-recall curve over top-k: evenly spaced from 1 to N."""
    return np.unique(np.round(np.linspace(1, num_db, points)).astype(np.int64))


def k_points_of(num_db: int, topk, curve_points: int) -> np.ndarray:
    """The top-k cut-offs counted per query: the PR curve's, then each K of ``topk``."""
    return np.concatenate([pr_points(num_db, curve_points), np.asarray([int(k) for k in topk], dtype=np.int64)])


def topk_curves(hits: np.ndarray, num_rel: np.ndarray, k_points: np.ndarray) -> dict[str, list]:
    """Precision and recall over the first k items, averaged over the queries with a relevant item."""
    valid = num_rel > 0
    precision = (hits[valid] / k_points).mean(0) if valid.any() else np.zeros(len(k_points))
    recall = (hits[valid] / num_rel[valid][:, None]).mean(0) if valid.any() else np.zeros(len(k_points))
    return {"k": k_points.tolist(), "precision": precision.tolist(), "recall": recall.tolist()}


def summarize_scores(scores: QueryScores, num_db: int, *, topk: tuple[int, ...] | list[int] = (),
                     curve_points: int = 16) -> dict:
    """Every metric of ``retrieval_metrics`` from its per-query scores (means over the queries with
    at least one relevant database item)."""
    h = Histograms(scores.count, scores.relevant)
    curve_k = pr_points(num_db, curve_points)
    k_points = k_points_of(num_db, topk, curve_points)
    expected = expected_hits_at_k(h, k_points)
    num_rel = h.num_relevant
    scored = num_rel > 0
    at_k = {int(k): j for j, k in enumerate(k_points) if j >= len(curve_k)}
    column = {int(k): j for j, k in enumerate(topk)}
    hits = scores.hits
    return {
        "map": mean_of_scored(scores.index_ap[:, 0]),
        "map_tie_aware": mean_of_scored(tie_aware_ap(h)),
        "map_at_k": {k: mean_of_scored(scores.index_ap[:, 1 + column[k]]) for k in at_k},
        "map_at_k_tie_aware": {k: mean_of_scored(tie_aware_ap_at_k(h, k)) for k in at_k},
        "precision_at_k": {k: float((hits[scored, j] / min(k, num_db)).mean()) for k, j in at_k.items()},
        "precision_at_k_tie_aware": {k: float((expected[scored, j] / min(k, num_db)).mean()) for k, j in at_k.items()},
        "recall_at_k": {k: float((hits[scored, j] / num_rel[scored]).mean()) for k, j in at_k.items()},
        "ndcg_at_k": {k: mean_of_scored(scores.ndcg[:, column[k]]) for k in at_k},
        "pr_radius": pr_curve_radius(h),
        "pr_topk": topk_curves(hits[:, : len(curve_k)], num_rel, curve_k),
        "num_queries": int(len(scored)),
        "num_queries_scored": int(scored.sum()),
    }


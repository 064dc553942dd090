"""The one ranking core: what every index-tie ranking path fills per query (``RankSums``), and the
one reduction of it to the per-query scores (``QueryScores``): AP, AP@K, hits and NDCG.

Ties are broken by database order (a stable sort). Per query, with the relevant items at ranks
p_1 < p_2 < ..., the sums are: the items and relevant items at each distance (the histograms of
the tie-aware metrics), the precision sum sum_j j / p_j and the count of relevant items within
each AP cut-off, the relevant items among the first k for each k of the curves and of topk, the
graded gains of the first max(topk) ranks, and how many database items share g labels for each g
(the ideal DCG). The paths (numpy: ``rank_numpy``; the numba kernels: ``rank_compiled``; torch:
``rank_torch``) differ only in how they find these; the integers agree everywhere, and so does
NDCG; the precision sums agree to rounding where a path adds them in another order (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QueryScores:
    """Per query, everything ``summarize_scores`` needs: the rows of every field concatenate over
    query chunks, and over ranks that each scored a share of the queries (docs/evaluation.md)."""

    count: np.ndarray  # (Q, L+1) int64: items at each Hamming distance
    relevant: np.ndarray  # (Q, L+1) int64: relevant items at each distance
    index_ap: np.ndarray  # (Q, 1 + len(topk)) float64: AP@all, then AP@K, ties by index; NaN: no relevant item
    hits: np.ndarray  # (Q, len(k_points)) int64: relevant items among the first k, ties by index
    ndcg: np.ndarray  # (Q, len(topk)) float64: NDCG@K (graded by shared labels), ties by index

    FIELDS = ("count", "relevant", "index_ap", "hits", "ndcg")

    @classmethod
    def empty(cls, bits: int, topk: int, k_points: int) -> "QueryScores":
        """No queries (a rank's share when there are fewer queries than ranks)."""
        return cls(np.zeros((0, bits + 1), np.int64), np.zeros((0, bits + 1), np.int64), np.zeros((0, 1 + topk)),
                   np.zeros((0, k_points), np.int64), np.zeros((0, topk)))

    @classmethod
    def concatenate(cls, parts: list["QueryScores"]) -> "QueryScores":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))


@dataclass
class RankSums:
    """The sums of ``q`` queries that a ranking path fills (module docstring), with what it needs
    to know to fill them: the AP cut-offs (N for AP@all), the hit k in ascending order (the order a
    ranking meets them in) and how many leading gains to keep. ``scores()`` reduces them."""

    cuts: np.ndarray  # (1 + len(topk),) int64: N, then each K of topk
    ks: list[int]  # the K of topk (NDCG)
    ascending: np.ndarray  # the order of k_points that sorts them
    k_ascending: np.ndarray  # the k_points in that order, at most N
    top_k: int  # leading gains kept: min(max K, N) (0 when not graded)
    count: np.ndarray  # (q, L + 1) int64: items at each distance
    relevant: np.ndarray  # (q, L + 1) int64: relevant items at each distance
    prec_sum: np.ndarray  # (q, len(cuts)) float64: sum of j / p_j over the relevant items within each cut
    found: np.ndarray  # (q, len(cuts)) int64: relevant items within each cut
    hits: np.ndarray  # (q, len(k_points)) int64: relevant items among the first k, k ascending
    top_gains: np.ndarray  # (q, top_k) uint16: shared labels of the items at ranks 1..top_k
    gain_counts: np.ndarray  # (q, C + 1) int64: database items sharing g labels, g = 0..C (one column when not graded)

    @classmethod
    def zeros(cls, q: int, n: int, bits: int, cuts: list[int | None], k_points: np.ndarray, graded: bool,
              classes: int) -> "RankSums":
        """Empty sums for ``q`` queries against ``n`` items of ``bits``-bit codes; ``cuts``: None
        (AP@all), then each K; ``graded``: keep what NDCG needs (``classes`` labels)."""
        ks = [k for k in cuts if k is not None]
        top_k = min(max(ks), n) if graded and ks else 0
        ascending = np.argsort(k_points, kind="stable")
        return cls(np.array([n if k is None else k for k in cuts], np.int64), ks, ascending,
                   np.minimum(k_points[ascending], n).astype(np.int64), top_k,
                   np.zeros((q, bits + 1), np.int64), np.zeros((q, bits + 1), np.int64),
                   np.zeros((q, len(cuts))), np.zeros((q, len(cuts)), np.int64),
                   np.zeros((q, len(k_points)), np.int64), np.zeros((q, top_k), np.uint16),
                   np.zeros((q, classes + 1 if graded else 1), np.int64))

    def scores(self) -> QueryScores:
        """The reduction: AP within each cut = precision sum / relevant items found there (0 where
        none is; NaN where the query has no relevant item at all), the hits in k_points' order, and
        NDCG@K from the leading gains and the gain histogram."""
        hits = np.empty_like(self.hits)
        hits[:, self.ascending] = self.hits
        num_rel = self.relevant.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            aps = np.where(num_rel[:, None] > 0, self.prec_sum / np.maximum(self.found, 1), np.nan)
        ndcgs = np.empty((len(self.relevant), len(self.ks) if self.top_k else 0))
        if self.top_k:
            for j, k in enumerate(self.ks):
                ndcgs[:, j] = ndcg(self.top_gains[:, :k], ideal_dcg_of_counts(self.gain_counts, k))
        return QueryScores(self.count, self.relevant, aps, hits, ndcgs)


def ideal_dcg_of_counts(counts: np.ndarray, k: int) -> np.ndarray:
    """(q, G) items per gain value 0..G-1 -> (q,) the DCG of the best K: each value's run of
    positions in descending order, clipped to the first K, times its discounts."""
    counts = counts[:, ::-1]
    end = np.minimum(np.cumsum(counts, 1), k)  # positions [start, end) of each value, best first
    start = np.concatenate([np.zeros((len(counts), 1), np.int64), end[:, :-1]], 1)
    discount = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, int(end.max(initial=0)) + 2)))])
    value = np.exp2(np.arange(counts.shape[1] - 1, -1, -1, dtype=np.float64)) - 1
    # summed column by column, largest gain first: the zero terms of gains no item of the database
    # has come first and add exactly nothing, so the result does not depend on how wide the
    # histogram is (which queries were scored together: a rank's share, a query chunk)
    return np.cumsum((discount[end] - discount[start]) * value, axis=1)[:, -1]


def ndcg(ranked: np.ndarray, best: np.ndarray) -> np.ndarray:
    """(q, K) gains in ranked order and (q,) the ideal DCG -> (q,) DCG / ideal DCG, with
    DCG = sum over positions p = 1..K of (2^gain - 1) / log2(p + 1); NaN where the ideal is 0."""
    discount = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    dcg = ((np.exp2(ranked.astype(np.float64)) - 1) * discount).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(best > 0, dcg / best, np.nan)


def mean_of_scored(ap: np.ndarray) -> float:
    """The mean over the queries that have a relevant item (the others are NaN)."""
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if len(ap) else float("nan")


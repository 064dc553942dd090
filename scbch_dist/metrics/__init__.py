"""Hamming-ranking retrieval metrics: pure functions of codes and labels.

Conventions (docs/evaluation.md):
- codes are (n, L) arrays of any real or bool dtype; a bit is set where the value is > 0, so
  sign codes (+-1) and {0, 1} codes both work;
- a database item is relevant to a query when they share at least one (clean) label;
- queries with no relevant database item are left out of every mean;
- ``ties="index"`` ranks equal distances by database order (a stable sort);
  ``ties="expected"`` gives the expectation over uniformly random orders of tied items, in
  closed form (McSherry and Najork, ECIR 2008), deterministic and fair to short codes.

Speed: Hamming distances take only L + 1 values, so everything tie-aware is computed from two
histograms per query (items and relevant items at each distance) in O(L) per query, and the
index-tie ranking is a radix sort of small integers, or where numba is present three linear passes
of a compiled kernel (``metrics/kernel.py``: no sort, the same numbers bit for bit). Queries are
processed in chunks, on threads.

Layout: ``codes`` (packed words, distances, relevance), ``tie_aware`` (the histogram metrics),
``sums`` (the one ranking core: the per-query sums every index-tie path fills, and their one
reduction to AP, hits and NDCG), the paths that fill them (``rank_numpy``, ``rank_compiled`` over
``kernel``, ``rank_torch``), ``summary`` (the means and curves a run reports) and ``table``
(packed tables on disk). This face chooses the path (``score_queries``) and holds the entry points.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from scbch_dist.metrics.codes import Array, hamming_distances, pack_words, packed, relevance, write_table
from scbch_dist.metrics.rank_compiled import compiled_ranking, stream_scores
from scbch_dist.metrics.rank_numpy import Ranker, index_ranking, ranking_average_precision, score_blocks
from scbch_dist.metrics.rank_torch import score_queries_torch
from scbch_dist.metrics.sums import QueryScores, mean_of_scored
from scbch_dist.metrics.summary import k_points_of, pr_points, summarize_scores
from scbch_dist.metrics.tie_aware import (HarmonicAt, Histograms, chance_map, harmonic_numbers, histograms,
                                          pair_reciprocal_rank, tie_aware_ap, tie_aware_ap_at_k)

__all__ = ["COMPILED_ABOVE", "DB_CHUNK", "Array", "HarmonicAt", "Histograms", "QueryScores", "chance_map",
           "hamming_distances", "harmonic_numbers", "mean_average_precision", "pack_words", "packed",
           "pair_reciprocal_rank", "pr_points", "ranked_average_precision", "relevance", "retrieval_metrics",
           "roc_auc", "score_queries", "score_queries_torch", "summarize_scores", "tie_aware_ap", "tie_aware_ap_at_k",
           "write_table"]

# (query, item) pairs from which score_queries takes the compiled kernel (its import and cached
# code cost about 0.3 s a process; numpy ranks 2^26 pairs in about 1.5 s a thread)
COMPILED_ABOVE = 1 << 26
DB_CHUNK = 1 << 20  # database rows scored at a time by score_queries beyond one block: 16 MB of words at 64 bits


def score_queries(query_codes: Array, db_codes: Array, query_labels: Array, db_labels: Array, *,
                  topk: tuple[int, ...] | list[int] = (), curve_points: int = 16, threads: int = 2,
                  db_chunk: int | None = DB_CHUNK, compiled: bool | None = None) -> QueryScores:
    """The per-query pass of ``retrieval_metrics``: one ranking of the database per query, in
    cache-sized query chunks. A share of the queries scores to that share's rows of the whole result,
    bit for bit, so ranks can split the queries and concatenate (``QueryScores.concatenate``).
    A database of more than ``db_chunk`` rows, or one on disk (two ``metrics.table.PackedTable``
    as ``db_codes`` and ``db_labels``), is scored in blocks of that many (``stream_scores``, or
    ``score_blocks`` without numba: two passes, memory bounded by a block; the same numbers, the
    AP sums in another order).
    ``compiled``: a database in one block is ranked by the numba kernel (``metrics.kernel``: no
    sort, equal bit for bit) when True, by numpy when False; when None, by the kernel from
    ``COMPILED_ABOVE`` (query, item) pairs where numba is present, and a streamed one by the kernel
    wherever numba is present (so a share of the queries takes the path the whole would)."""
    k_points = k_points_of(len(db_codes), topk, curve_points)
    if len(query_codes) == 0 and len(query_labels) == 0 and len(db_codes):
        return QueryScores.empty(np.shape(db_codes)[1], len(topk), len(k_points))
    ranker = Ranker(query_codes, db_codes, query_labels, db_labels, db_chunk)
    cuts: list[int | None] = [None] + [int(k) for k in topk]

    streamed = ranker.on_disk or len(ranker.blocks) > 1
    # a streamed database takes the kernel whatever the number of queries: the choice may not hang
    # on a rank's share of them, as the two streamed paths sum AP in another order
    kernel = _compiled_kernel(compiled, COMPILED_ABOVE if streamed else len(ranker.q_codes) * len(ranker.d_codes))
    if streamed and kernel is not None:
        parts = [stream_scores(kernel, ranker, cuts, k_points, bool(topk), threads)]
    elif streamed:
        if ranker.on_disk:  # the numpy blocks read the tables per query chunk: their digests checked first
            for _ in ranker.db_blocks():
                pass
        parts = ranker.map_chunks(lambda s: score_blocks(ranker, s, cuts, k_points, bool(topk)), threads)
    elif kernel is not None:
        parts = ranker.map_chunks(lambda s: compiled_ranking(kernel, ranker, s, cuts, k_points, bool(topk)), threads)
    else:
        def score(dist, rel, gains):
            return index_ranking(dist, rel, ranker.bits, cuts, k_points, gains)
        parts = ranker.map(score, threads, graded=bool(topk))
    return QueryScores.concatenate(parts)


@functools.cache
def _kernel_module():
    try:
        from scbch_dist.metrics import kernel
    except ImportError:  # numba missing: the numpy path
        return None
    return kernel


def _compiled_kernel(compiled: bool | None, pairs: int):
    """The module ``metrics.kernel`` where score_queries' ``compiled`` asks for it (None: from
    ``COMPILED_ABOVE`` ``pairs``) and numba is present, else None (the numpy path); an ImportError
    when ``compiled`` is True and numba is missing."""
    if not (compiled or (compiled is None and pairs >= COMPILED_ABOVE)):
        return None
    module = _kernel_module()
    if module is None and compiled:
        raise ImportError("the compiled ranking needs numba (pip install numba)")
    return module


def retrieval_metrics(query_codes: Array, db_codes: Array, query_labels: Array, db_labels: Array, *,
                      topk: tuple[int, ...] | list[int] = (), curve_points: int = 16, threads: int = 2) -> dict:
    """Every ranking metric from one pass over query chunks.

    Returns ``map`` and ``map_tie_aware`` (mAP@all), per K in ``topk``: ``map_at_k``,
    ``precision_at_k`` and their ``*_tie_aware`` twins, ``recall_at_k`` and ``ndcg_at_k`` (graded
    relevance: the number of shared labels; ties by index); ``pr_radius`` (precision-recall over
    Hamming radius 0..L) and ``pr_topk`` (over the first k items, ``curve_points`` values of k
    from 1 to N, ties by index); ``num_queries`` and ``num_queries_scored``. Means are over
    queries with at least one relevant database item.
    """
    scores = score_queries(query_codes, db_codes, query_labels, db_labels, topk=topk, curve_points=curve_points,
                           threads=threads)
    return summarize_scores(scores, len(db_codes), topk=topk, curve_points=curve_points)


def ranked_average_precision(ranking: Array, query_labels: Array, db_labels: Array) -> np.ndarray:
    """(q,) average precision of given rankings: ``ranking`` (q, N) holds every database position,
    best first (a search index's full result); NaN where a query has no relevant item. Through the
    ranking core: with the stable Hamming ranking, the index-tie AP of ``score_queries`` bit for bit."""
    ranking = ranking.cpu().numpy() if isinstance(ranking, torch.Tensor) else np.asarray(ranking)
    if ranking.shape[1] != len(db_labels) or len(ranking) != len(query_labels):
        raise ValueError(f"a full ranking of {len(db_labels)} items for each of {len(query_labels)} queries "
                         f"is needed, got {ranking.shape}")
    return ranking_average_precision(np.take_along_axis(relevance(query_labels, db_labels).numpy(), ranking, axis=1))


def mean_average_precision(query_codes: Array, db_codes: Array, query_labels: Array, db_labels: Array, *,
                           topk: int | None = None, ties: str = "index") -> float:
    """Mean average precision of Hamming ranking.

    Args:
        query_codes: (Q, L); db_codes: (N, L) (bits set where > 0).
        query_labels: (Q, C); db_labels: (N, C) multi-hot clean labels.
        topk: None for mAP@all; K for mAP@K (the first K ranked items, each query's AP
            normalised by the relevant items found there; 0 when none is).
        ties: "index" (ties ranked by database order) or "expected" (tie-aware closed form).
    Returns:
        The mean over queries with at least one relevant database item.
    """
    if ties not in ("index", "expected"):
        raise ValueError(f"ties must be 'index' or 'expected', got {ties!r}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be a positive integer or None, got {topk}")
    ranker = Ranker(query_codes, db_codes, query_labels, db_labels)
    if ties == "index":
        parts = ranker.map(lambda dist, rel, _: index_ranking(dist, rel, ranker.bits, [topk], np.ones(1, np.int64)).index_ap[:, 0])
    else:
        def tie_aware(dist, rel, _):
            h = Histograms(*histograms(dist, rel, ranker.bits + 1))
            return tie_aware_ap(h) if topk is None else tie_aware_ap_at_k(h, topk)
        parts = ranker.map(tie_aware)
    return mean_of_scored(np.concatenate(parts))


def roc_auc(scores: Array, positive: Array) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.
    NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


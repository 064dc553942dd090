"""The index-tie ranking by the numba kernels (``metrics.kernel``): no sort and no (q, N) arrays.
``compiled_ranking`` ranks a query chunk against a database in one block (its sums equal
``index_ranking``'s bit for bit); ``stream_scores`` reads a database in blocks twice (memory is
one block). Both fill the ranking core's sums (``metrics.sums``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from scbch_dist.metrics.rank_numpy import Ranker
from scbch_dist.metrics.sums import QueryScores, RankSums


def compiled_ranking(kernel, ranker: Ranker, s: slice, cuts: list[int | None], k_points: np.ndarray,
                     graded: bool) -> QueryScores:
    """The scores of query chunk ``s`` from ``kernel.rank_chunk``: equal to the numpy path's bit for bit."""
    q, n, bins = s.stop - s.start, len(ranker.d_codes), ranker.bits + 1
    sums = RankSums.zeros(q, n, ranker.bits, cuts, k_points, graded, ranker.classes)
    kernel.rank_chunk(ranker.q_codes[s], ranker.d_codes, ranker.q_labels[s], ranker.d_labels, bins, sums.cuts,
                      sums.k_ascending, sums.top_k, graded, sums.count, sums.relevant, sums.prec_sum, sums.found,
                      sums.hits, sums.top_gains, sums.gain_counts)
    return sums.scores()


def stream_scores(kernel, ranker: Ranker, cuts: list[int | None], k_points: np.ndarray, graded: bool,
                  threads: int) -> QueryScores:
    """The scores of every query, the database read in blocks twice (``kernel.count_block``, then
    ``kernel.place_block``; docs/evaluation.md): memory is one block and per-query arrays of
    O(L + K). Integers and NDCG equal the one-pass paths' bit for bit; the APs agree to rounding
    (the precisions are added in database order, not rank order)."""
    q, n, bins = len(ranker.q_codes), len(ranker.d_codes), ranker.bits + 1
    sums = RankSums.zeros(q, n, ranker.bits, cuts, k_points, graded, ranker.classes)
    size = max(1, -(-q // (4 * max(1, threads))))  # a few query parts a thread: even loads
    parts = [slice(a, min(a + size, q)) for a in range(0, q, size)]
    histogram = np.zeros((q, 2 * bins), np.int64)  # [a, 2d]: items at distance d not relevant, [a, 2d + 1] relevant
    qc, ql = ranker.q_codes, ranker.q_labels
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for codes, labels in ranker.db_blocks():
            list(pool.map(lambda s: kernel.count_block(qc[s], codes, ql[s], labels, graded, histogram[s],
                                                       sums.gain_counts[s]), parts))
        sums.relevant[:] = histogram[:, 1::2]
        sums.count[:] = histogram[:, 0::2] + sums.relevant
        count, relevant = sums.count, sums.relevant
        offset, rel_offset = np.cumsum(count, 1) - count, np.cumsum(relevant, 1) - relevant
        # per distance d, the first t (k ascending) whose rank k falls at d or beyond: the k at or below
        # the items closer than d fall before it (the kernel records the hits as rank k is placed)
        next_k = np.searchsorted(sums.k_ascending, offset, side="right")
        k_sentinel = np.append(sums.k_ascending, n + 1)  # never a rank: where the t of the last distance stop
        for codes, labels in ranker.db_blocks():
            list(pool.map(lambda s: kernel.place_block(qc[s], codes, ql[s], labels, offset[s], rel_offset[s],
                                                       sums.cuts, next_k[s], k_sentinel, sums.top_k,
                                                       sums.prec_sum[s], sums.found[s], sums.hits[s],
                                                       sums.top_gains[s]), parts))
    return sums.scores()

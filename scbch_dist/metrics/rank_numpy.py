"""The index-tie ranking in numpy: a stable sort of each query's distances (a radix sort of small
integers), over a database in one block (``index_ranking``) or in blocks with memory bounded by a
block (``score_blocks``). Both fill the ranking core's sums (``metrics.sums``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from scbch_dist.metrics.codes import (Array, check_inputs, packed, popcount_distances, shared_labels,
                                      shares_label)
from scbch_dist.metrics.sums import QueryScores, RankSums
from scbch_dist.metrics.table import PackedTable
from scbch_dist.metrics.tie_aware import histograms


class Ranker:
    """Packed codes and labels, and the per-chunk distance/relevance computation."""

    def __init__(self, query_codes: Array, db_codes: Array, query_labels: Array, db_labels: Array,
                 db_chunk: int | None = None):
        check_inputs(query_codes, db_codes, query_labels, db_labels)
        if np.shape(query_codes)[1] != np.shape(db_codes)[1]:
            where = f" ({db_codes.path})" if isinstance(db_codes, PackedTable) else ""
            raise ValueError(f"code lengths differ: queries {np.shape(query_codes)[1]} bits, database{where} "
                             f"{np.shape(db_codes)[1]} bits")
        self.bits, self.classes = np.shape(query_codes)[1], np.shape(query_labels)[1]
        self.on_disk = isinstance(db_codes, PackedTable)
        if self.on_disk != isinstance(db_labels, PackedTable):
            raise ValueError("database codes and labels: both packed tables on disk, or neither")
        if self.on_disk and np.shape(db_labels)[1] != self.classes:
            raise ValueError(f"{db_labels.path}: labels of {db_labels.width} classes, the queries have {self.classes}")
        self.q_codes, self.q_labels = packed(query_codes), packed(query_labels)
        self.d_codes, self.d_labels = (db_codes, db_labels) if self.on_disk else (packed(db_codes), packed(db_labels))
        # database blocks (score_queries' db_chunk), and query chunks of ~1M (query, item) entries
        # against one block, which keep a chunk's arrays in cache
        n, nq = len(self.d_codes), len(self.q_codes)
        block = n if not db_chunk or db_chunk >= n else db_chunk
        self.blocks = [slice(a, min(a + block, n)) for a in range(0, n, block)]
        size = max(1, min(nq, (1 << 20) // block))
        self.chunks = [slice(s, min(s + size, nq)) for s in range(0, nq, size)]

    def pairs(self, s: slice, b: slice, graded: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Distances, relevance and (``graded``) shared-label counts of query chunk ``s`` against
        database block ``b``: (q, n) each."""
        d_codes, d_labels = self.block(b)
        dist = popcount_distances(self.q_codes[s], d_codes, self.bits)
        if not graded:
            return dist, shares_label(self.q_labels[s], d_labels), None
        gains = shared_labels(self.q_labels[s], d_labels)
        return dist, gains > 0, gains

    def block(self, b: slice) -> tuple[np.ndarray, np.ndarray]:
        """The packed database codes and labels of rows ``b`` (read from disk for tables)."""
        if self.on_disk:
            return np.asarray(self.d_codes.read(b.start, b.stop)), np.asarray(self.d_labels.read(b.start, b.stop))
        return self.d_codes[b], self.d_labels[b]

    def db_blocks(self):
        """Every database block in order as (codes, labels) packed words; for tables on disk, each
        read once and checked against its digest after the last (PackedTable.blocks)."""
        if not self.on_disk:
            yield from (self.block(b) for b in self.blocks)
            return
        rows = self.blocks[0].stop
        for (_, codes), (_, labels) in zip(self.d_codes.blocks(rows), self.d_labels.blocks(rows), strict=True):
            yield np.asarray(codes), np.asarray(labels)

    def map_chunks(self, fn, threads: int = 2) -> list:
        """``fn(s)`` over every query chunk ``s``, in order, on ``threads`` threads (numpy's bitwise,
        bincount and sort kernels release the GIL)."""
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            return list(pool.map(fn, self.chunks))

    def map(self, fn, threads: int = 2, graded: bool = False) -> list:
        """``fn(dist, rel, gains)`` over every query chunk against the whole database (one block),
        in order (``gains`` only when ``graded``, else None)."""
        whole = slice(0, len(self.d_codes))
        return self.map_chunks(lambda s: fn(*self.pairs(s, whole, graded)), threads)



def relevant_ranks(ranked: np.ndarray) -> tuple[np.ndarray, ...]:
    """(q, N) relevance in rank order -> the relevant items' rows and 0-based ranks (row by row,
    ranks ascending), each row's number of them and where its items start, and each item's
    precision j / p (the j-th relevant item of its row, at rank p = its 0-based rank + 1)."""
    q, n = ranked.shape
    flat = np.flatnonzero(ranked)  # row-major: ranks ascend within a row
    rows, cols = np.divmod(flat, n) if q > 1 else (np.zeros(len(flat), np.int64), flat)
    num_rel = np.bincount(rows, minlength=q)
    first = np.concatenate([[0], np.cumsum(num_rel)[:-1]])  # where each row's relevant items start
    ordinal = np.arange(1, len(rows) + 1) - first[rows]  # j: 1, 2, ... within a row
    return rows, cols, num_rel, first, ordinal / (cols + 1.0)


def row_histogram(values: np.ndarray, width: int) -> np.ndarray:
    """(q, width) int64: how many entries of each row of ``values`` (q, n), integers in [0, width),
    take each value; one bincount over keys offset by row * width."""
    q = values.shape[0]
    keys = values + (width * np.arange(q, dtype=np.int64))[:, None] if q > 1 else values
    return np.bincount(keys.ravel(), minlength=q * width).reshape(q, width)


def ranking_average_precision(ranked: np.ndarray) -> np.ndarray:
    """(q, N) relevance in the order of a given ranking -> (q,) its AP@all through the ranking core
    (NaN where a query has no relevant item): for the stable Hamming ranking, ``index_ranking``'s
    AP bit for bit."""
    q, n = ranked.shape
    sums = RankSums.zeros(q, n, 0, [None], np.ones(1, np.int64), False, 0)
    rows, _, num_rel, _, precision = relevant_ranks(ranked)
    sums.prec_sum[:, 0] = np.bincount(rows, weights=precision, minlength=q)
    sums.found[:, 0] = sums.relevant[:, 0] = num_rel
    sums.count[:, 0] = n  # one distance: the histograms only count
    return sums.scores().index_ap[:, 0]


def index_ranking(dist: np.ndarray, rel: np.ndarray, bits: int, cuts: list[int | None], k_points: np.ndarray,
                  gains: np.ndarray | None = None) -> QueryScores:
    """The scores of q queries from their (q, N) distances and relevance (and with ``gains``, the
    (q, N) shared-label counts, NDCG@K for each K of ``cuts``); ``cuts``: None for AP@all, then K
    for AP@K; ``k_points``: the k whose hits are counted.

    Only the ranks of the relevant items are kept after the sort: the j-th relevant item of a
    query at rank p adds j / p to its precision sum, and the relevant items among the first k are
    a search in the sorted ranks, so no work scales with N but the sort and one gather."""
    q, n = dist.shape
    graded = gains is not None
    classes = int(gains.max()) if graded and gains.size else 0  # any width of the gain histogram gives the same NDCG
    sums = RankSums.zeros(q, n, bits, cuts, k_points, graded, classes)
    order = np.argsort(dist, axis=1, kind="stable")  # radix sort for <= 16-bit integers
    rows, cols, num_rel, first, precision = relevant_ranks(np.take_along_axis(rel, order, axis=1))
    for j, k in enumerate(cuts):
        inside = slice(None) if k is None else cols < k
        sums.found[:, j] = num_rel if k is None else np.bincount(rows[inside], minlength=q)
        sums.prec_sum[:, j] = np.bincount(rows[inside], weights=precision[inside], minlength=q)
    # relevant items among the first k: each row's sorted ranks searched, as one sorted key row * (n + 1) + rank
    key = rows * (n + 1) + cols
    row_key = np.arange(q)[:, None] * (n + 1)
    sums.hits[:] = np.searchsorted(key, row_key + sums.k_ascending[None, :]) - first[:, None]
    # the histograms: items per distance by one bincount, relevant ones per distance by searching the
    # ranks where each distance's group ends
    bins = bits + 1
    sums.count[:] = row_histogram(dist, bins)
    sums.relevant[:] = np.diff(np.searchsorted(key, row_key + np.cumsum(sums.count, 1)) - first[:, None], axis=1,
                               prepend=0)
    if sums.top_k:
        sums.top_gains[:] = np.take_along_axis(gains, order[:, :sums.top_k], axis=1)
        width = classes + 1
        sums.gain_counts[:] = row_histogram(gains, width)
    return sums.scores()


def score_blocks(ranker: Ranker, s: slice, cuts: list[int | None], k_points: np.ndarray,
                 graded: bool) -> QueryScores:
    """``index_ranking`` of query chunk ``s`` over a database in blocks, with memory bounded by a
    block: a first pass counts items, relevant items and gains per distance in each block; a second
    sorts each block and places its items in the whole ranking (ties by database order): an item at
    distance d in block b ranks after every item closer than d, every item at d in the blocks before
    b, and those before it in its block. Every sum is then a sum over blocks (the precision sums
    in block order: they agree with the one-block paths' to rounding)."""
    q, n, bins = s.stop - s.start, len(ranker.d_codes), ranker.bits + 1
    sums = RankSums.zeros(q, n, ranker.bits, cuts, k_points, graded, ranker.classes)
    top = ranker.classes + 1  # gains are 0..C
    counts, relevants = [], []
    for b in ranker.blocks:  # pass 1
        dist, rel, gains = ranker.pairs(s, b, graded)
        count, relevant = histograms(dist, rel, bins)
        counts.append(count)
        relevants.append(relevant)
        if graded:
            sums.gain_counts += row_histogram(gains, top)
    count, relevant = sum(counts), sum(relevants)
    sums.count[:], sums.relevant[:] = count, relevant
    closer, rel_closer = np.cumsum(count, 1) - count, np.cumsum(relevant, 1) - relevant
    earlier, rel_earlier = np.zeros_like(count), np.zeros_like(relevant)  # at the same distance, in blocks before
    row_key = np.arange(q)[:, None] * (n + 1)
    for i, b in enumerate(ranker.blocks):  # pass 2
        dist, rel, gains = ranker.pairs(s, b, graded)
        m = dist.shape[1]
        order = np.argsort(dist, axis=1, kind="stable")
        # the rank in the whole of the item at sorted position p (0-based) of the block, at distance d:
        # offset[d] + p + 1
        offset = closer + earlier - (np.cumsum(counts[i], 1) - counts[i])
        # and the j-th relevant item of the block's row at distance d is the relevant item
        # rel_offset[d] + j of the whole (1-based j)
        rel_offset = rel_closer + rel_earlier - (np.cumsum(relevants[i], 1) - relevants[i])
        flat = np.flatnonzero(np.take_along_axis(rel, order, axis=1))
        rows, cols = np.divmod(flat, m)
        d = dist.ravel()[rows * m + order.ravel()[flat]]  # the relevant items' distances
        at = rows * bins + d
        r = offset.ravel()[at] + cols + 1  # their ranks in the whole
        per_row = np.bincount(rows, minlength=q)
        first = np.cumsum(per_row) - per_row
        j = rel_offset.ravel()[at] + (np.arange(1, len(rows) + 1) - first[rows])
        precision = j / r
        for t, k in enumerate(cuts):
            inside = slice(None) if k is None else r <= k
            sums.prec_sum[:, t] += np.bincount(rows[inside], weights=precision[inside], minlength=q)
            sums.found[:, t] += np.bincount(rows[inside], minlength=q)
        sums.hits += np.searchsorted(rows * (n + 1) + r, row_key + sums.k_ascending[None, :], side="right") - \
            first[:, None]
        if sums.top_k:
            # an item's rank in the whole is at least its position in the block + 1: the first top_k
            # positions hold every item of the block that can reach the first top_k ranks
            head = order[:, :min(sums.top_k, m)]
            rank = np.take_along_axis(offset, np.take_along_axis(dist, head, axis=1).astype(np.int64), axis=1) + \
                np.arange(1, head.shape[1] + 1)
            near = rank <= sums.top_k
            sums.top_gains[np.nonzero(near)[0], rank[near] - 1] = np.take_along_axis(gains, head, axis=1)[near]
        earlier += counts[i]
        rel_earlier += relevants[i]
    return sums.scores()

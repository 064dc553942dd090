"""The index-tie ranking of a query chunk compiled with numba: what ``metrics.rank_numpy.index_ranking``
computes from a stable sort, in three linear passes over the database per query and no sort.

Pass 1 computes the distances and shared labels and counts the items and relevant items at each
Hamming distance (and the items at each number of shared labels). Their running offsets then give,
in pass 2 over the database in index order,
each item's rank (ties by index, as the stable sort) and the ordinal of each relevant item among
the relevant ones; pass 3 walks the relevant items in rank order and adds ordinal / rank, in the
order the numpy path adds it, so every field comes out equal to the numpy path's, bit for bit
(tests/test_metrics.py). Imported by ``metrics`` only when numba is present; ``nogil`` lets the
query chunks run on threads."""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _popcount(typingctx, x):
    """The population count of a uint64 (LLVM's ctpop: one instruction where the CPU has it)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@njit(inline="always")
def _distance_and_gain(q_codes, q_labels, a, d_codes, d_labels, i):
    """The Hamming distance of query a to item i, and the labels they share (packed uint64 words)."""
    d = 0
    for w in range(q_codes.shape[1]):
        d += _popcount(q_codes[a, w] ^ d_codes[i, w])
    g = 0
    for v in range(q_labels.shape[1]):
        g += _popcount(q_labels[a, v] & d_labels[i, v])
    return d, g


@njit(cache=True, nogil=True)
def rank_chunk(q_codes, d_codes, q_labels, d_labels, bins, cuts, k_points, top_k, graded,
               count, relevant, prec_sum, found, hits, top_gains, gain_counts):
    """Packed query codes (q, W) and labels (q, V), database (n, W) and (n, V), all uint64.
    ``cuts``: the AP cut-offs (n for AP@all); ``k_points``: the k of the hit counts, ascending,
    at most n; ``top_k``: how many leading gains to keep. Fills, per query row a: ``count[a]`` and
    ``relevant[a]`` (bins,) items and relevant items per distance; ``prec_sum[a, c]`` and
    ``found[a, c]`` the precision sum and number of the relevant items within ``cuts[c]``;
    ``hits[a, t]`` the relevant items among the first ``k_points[t]``; ``top_gains[a]`` the shared
    labels of the first ``top_k`` items in rank order; ``gain_counts[a, g]`` the items sharing g
    labels (when ``graded``)."""
    q, n = q_codes.shape[0], d_codes.shape[0]
    dist = np.empty(n, np.uint16)
    gain = np.empty(n, np.uint16)
    histogram = np.empty(2 * bins, np.int64)  # items at distance d: [2d] not relevant, [2d + 1] relevant
    offset = np.empty(bins, np.int64)
    rel_offset = np.empty(bins, np.int64)
    ranks = np.empty(n + 1, np.int64)  # the relevant items' ranks by ordinal; past them, a slot for the others
    for a in range(q):
        for i in range(n):  # pass 1: distances and shared labels (reads the database once)
            dist[i], gain[i] = _distance_and_gain(q_codes, q_labels, a, d_codes, d_labels, i)
        histogram[:] = 0
        for i in range(n):  # one increment an item: no branch, no second histogram
            histogram[2 * dist[i] + (gain[i] > 0)] += 1
        if graded:
            for i in range(n):
                gain_counts[a, gain[i]] += 1
        total, rel_total = 0, 0
        for d in range(bins):
            count[a, d] = histogram[2 * d] + histogram[2 * d + 1]
            relevant[a, d] = histogram[2 * d + 1]
            offset[d] = total
            rel_offset[d] = rel_total
            total += count[a, d]
            rel_total += relevant[a, d]
        for i in range(n):  # pass 2: ranks in index order, each relevant item at its ordinal
            d = dist[i]
            rank = offset[d] + 1
            offset[d] = rank
            is_relevant = gain[i] > 0
            ranks[rel_offset[d] if is_relevant else rel_total] = rank
            rel_offset[d] += is_relevant
            if rank <= top_k:
                top_gains[a, rank - 1] = gain[i]
        t = 0
        for j in range(rel_total):  # pass 3: the relevant items in rank order
            rank = ranks[j]
            precision = (j + 1) / rank
            for c in range(cuts.shape[0]):
                if rank <= cuts[c]:
                    prec_sum[a, c] += precision
                    found[a, c] += 1
            while t < k_points.shape[0] and k_points[t] < rank:
                hits[a, t] = j
                t += 1
        while t < k_points.shape[0]:
            hits[a, t] = rel_total
            t += 1


# The streamed ranking (``metrics.rank_compiled.stream_scores``): the database comes in blocks, twice, and each
# query's state lives between the blocks in small arrays, so memory is one block, not N. Within a
# block the queries meet SUB_BLOCK rows at a time, which stay in the core's cache.
SUB_BLOCK = 1 << 13  # 8192 rows: 128 KB of codes and labels at 64 bits and up to 64 classes


@njit(cache=True, nogil=True)
def count_block(q_codes, d_codes, q_labels, d_labels, graded, histogram, gain_counts):
    """Pass 1 over a block: adds to ``histogram[a, 2 d + r]`` the block's items at distance d from
    query a that are relevant (r = 1) or not, and (``graded``) to ``gain_counts[a, g]`` the items
    sharing g labels with it."""
    q, n = q_codes.shape[0], d_codes.shape[0]
    for start in range(0, n, SUB_BLOCK):
        stop = min(start + SUB_BLOCK, n)
        for a in range(q):
            for i in range(start, stop):
                d, g = _distance_and_gain(q_codes, q_labels, a, d_codes, d_labels, i)
                histogram[a, 2 * d + (g > 0)] += 1
                if graded:
                    gain_counts[a, g] += 1


@njit(cache=True, nogil=True)
def place_block(q_codes, d_codes, q_labels, d_labels, offset, rel_offset, cuts, next_k, k_points, top_k,
                prec_sum, found, hits, top_gains):
    """Pass 2 over a block, blocks in database order: ``offset[a, d]`` holds the rank of the last
    item placed at distance d (at first, the items closer than d over the whole database), so the
    next item at d ranks one after it (ties by database order); ``rel_offset`` the same over the
    relevant items gives a relevant item's ordinal j, and counts the relevant items ranked up to
    here. A relevant item at rank p adds j / p to ``prec_sum[a, c]`` and one to ``found[a, c]``
    for every cut-off ``cuts[c]`` >= p; the shared labels of the first ``top_k`` items go to
    ``top_gains[a, p - 1]``. ``k_points`` (ascending, one past the last > N) are the k of
    ``hits``: when the item at rank k is placed, at distance d, the relevant items up to it are
    ``rel_offset[a, d]``; ``next_k[a, d]`` is the next t whose rank k falls at distance d.
    Branch-free where relevance decides (it is a coin toss item by item)."""
    q, n = q_codes.shape[0], d_codes.shape[0]
    for start in range(0, n, SUB_BLOCK):
        stop = min(start + SUB_BLOCK, n)
        for a in range(q):
            row_offset, row_rel_offset, row_next = offset[a], rel_offset[a], next_k[a]
            for i in range(start, stop):
                d, g = _distance_and_gain(q_codes, q_labels, a, d_codes, d_labels, i)
                rank = row_offset[d] + 1
                row_offset[d] = rank
                if rank <= top_k:
                    top_gains[a, rank - 1] = g
                r = np.int64(g > 0)
                j = row_rel_offset[d] + r
                row_rel_offset[d] = j
                precision = (r * j) / rank  # 0.0 for an item that is not relevant: adding it changes no sum
                for c in range(cuts.shape[0]):
                    if rank <= cuts[c]:
                        prec_sum[a, c] += precision
                        found[a, c] += r
                while k_points[row_next[d]] == rank:  # (rarely true: a few k, each met once)
                    hits[a, row_next[d]] = j
                    row_next[d] += 1

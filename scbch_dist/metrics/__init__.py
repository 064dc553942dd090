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
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import gammaln

from scbch_dist.metrics.table import PackedTable

Array = np.ndarray | torch.Tensor


def _bits(codes: Array) -> np.ndarray:
    """(n, L) codes -> (n, L) bool bits (set where > 0)."""
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    return c > 0


def packed(codes: Array, rows: int = 1 << 20) -> np.ndarray:
    """``pack_words(_bits(codes))`` a block of rows at a time: no (n, L) bool copy of the whole."""
    if isinstance(codes, torch.Tensor) or len(codes) <= rows:
        return pack_words(_bits(codes))
    return np.concatenate([pack_words(_bits(codes[a:a + rows])) for a in range(0, len(codes), rows)])


def pack_words(bits: np.ndarray) -> np.ndarray:
    """(n, L) bool -> (n, ceil(L/64)) uint64, bit l of row i at word l // 64, position l % 64."""
    b = np.packbits(np.asarray(bits, dtype=bool), axis=1, bitorder="little")
    words = -(-b.shape[1] // 8)
    b = np.pad(b, ((0, 0), (0, words * 8 - b.shape[1])))
    return np.ascontiguousarray(b).view(np.uint64)


def write_table(path, bits: Array, rows: int = 1 << 20) -> PackedTable:
    """(n, L) bits (codes or labels, set where > 0) as a packed table on disk (metrics.table),
    packed and written ``rows`` at a time."""
    return PackedTable.write(path, (packed(bits[a:a + rows]) for a in range(0, len(bits), rows)), np.shape(bits)[1])


def _popcount_distances(q: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """Packed (q, W), (N, W) uint64 -> (q, N) Hamming distances, uint8 (L < 256) or uint16."""
    out = np.bitwise_count(q[:, None, 0] ^ d[None, :, 0]).astype(np.uint8 if bits < 256 else np.uint16)
    for w in range(1, q.shape[1]):
        out += np.bitwise_count(q[:, None, w] ^ d[None, :, w])
    return out


def _shares_label(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Packed label words (q, W), (N, W) -> (q, N) bool: at least one common label."""
    out = (q[:, None, 0] & d[None, :, 0]) != 0
    for w in range(1, q.shape[1]):
        out |= (q[:, None, w] & d[None, :, w]) != 0
    return out


def _shared_labels(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Packed label words (q, W), (N, W) -> (q, N) uint8: the number of common labels (the graded
    relevance of NDCG)."""
    out = np.bitwise_count(q[:, None, 0] & d[None, :, 0])
    for w in range(1, q.shape[1]):
        out += np.bitwise_count(q[:, None, w] & d[None, :, w])
    return out


def hamming_distances(query_codes: Array, db_codes: Array) -> torch.Tensor:
    """(q, L), (N, L) -> (q, N) int32 Hamming distances."""
    qb, db = _bits(query_codes), _bits(db_codes)
    if qb.shape[1] != db.shape[1]:
        raise ValueError(f"code lengths differ: queries {qb.shape[1]} bits, database {db.shape[1]} bits")
    return torch.from_numpy(_popcount_distances(pack_words(qb), pack_words(db), qb.shape[1]).astype(np.int32))


def relevance(query_labels: Array, db_labels: Array) -> torch.Tensor:
    """(q, C), (N, C) multi-hot -> (q, N) bool: share at least one label."""
    return torch.from_numpy(_shares_label(pack_words(_bits(query_labels)), pack_words(_bits(db_labels))))


def harmonic_numbers(n: int) -> np.ndarray:
    """H[0..n] in float64, H[0] = 0."""
    h = np.zeros(n + 1)
    h[1:] = np.cumsum(1.0 / np.arange(1, n + 1))
    return h


class HarmonicAt:
    """``harmonic_numbers(n)[i]`` for any integer array i, bit for bit, without the (n + 1,) table:
    the running sum is made ``chunk`` terms at a time, each chunk starting from the last (the same
    additions in the same order), and only the asked-for entries are kept. Memory: a chunk and the
    indices; time: one pass over 1..max(i) per lookup. For databases of tens of millions."""

    def __init__(self, chunk: int = 1 << 20):
        self.chunk = chunk

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        flat = index.ravel()
        order = np.argsort(flat, kind="stable")
        wanted = flat[order]
        out = np.zeros(len(flat))
        top = int(wanted[-1]) if len(wanted) else 0
        carry, at = 0.0, int(np.searchsorted(wanted, 0, side="right"))  # H[0] = 0
        for start in range(1, top + 1, self.chunk):
            stop = min(start + self.chunk, top + 1)
            run = np.cumsum(np.concatenate([[carry], 1.0 / np.arange(start, stop)]))  # H[start - 1 .. stop - 1]
            end = int(np.searchsorted(wanted, stop - 1, side="right"))
            out[order[at:end]] = run[wanted[at:end] - (start - 1)]
            carry, at = run[-1], end
        return out.reshape(index.shape)


def _harmonic(n: int):
    """H[0..n] as a table, or beyond HARMONIC_TABLE_ABOVE as a HarmonicAt (the same numbers)."""
    return harmonic_numbers(n) if n <= HARMONIC_TABLE_ABOVE else HarmonicAt()


HARMONIC_TABLE_ABOVE = 1 << 22  # 32 MB of float64; a database beyond it looks its harmonic numbers up in a pass


# ----------------------------------------------------------------------------------------------
# Histogram-based (tie-aware) metrics


@dataclass
class Histograms:
    """Per query: items (``count``) and relevant items (``relevant``) at each distance 0..L."""

    count: np.ndarray  # (Q, L+1) int64
    relevant: np.ndarray  # (Q, L+1) int64

    @property
    def num_relevant(self) -> np.ndarray:
        return self.relevant.sum(1)


def _histograms(dist: np.ndarray, rel: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, N) distances and relevance -> items and relevant items per distance, each (q, bins).

    One bincount over a fused key (row, distance, relevant); the key stays 16-bit when it can,
    which keeps a chunk's key array in cache."""
    q = dist.shape[0]
    key_dtype = np.uint16 if q * 2 * bins <= 1 << 16 else np.uint32
    key = dist.astype(key_dtype) * 2
    key += rel
    key += (2 * bins * np.arange(q, dtype=key_dtype))[:, None]
    both = np.bincount(key.ravel(), minlength=q * 2 * bins).reshape(q, bins, 2)
    return both.sum(2), both[:, :, 1].copy()


def _expected_precision_sum(n, r, nb, rb, harm: np.ndarray) -> np.ndarray:
    """Expected sum of precisions at the relevant items of a group of ``n`` tied slots holding
    ``r`` relevant items, ranked after ``nb`` items of which ``rb`` are relevant:

        (r/n) [ (rb + 1) dH + (r - 1)/(n - 1) (n - (nb + 1) dH) ],  dH = H(nb + n) - H(nb)

    (a relevant item's position is uniform in the group; given it, the other relevant items
    before it are hypergeometric). ``n`` and ``nb`` are integer arrays (they index ``harm``);
    all arguments broadcast."""
    dh = harm[nb + n] - harm[nb]
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.where(n > 1, (r - 1) / (n - 1), 0.0) * (n - (nb + 1) * dh)
        return np.where(n > 0, r / n * ((rb + 1) * dh + inner), 0.0)


def _group_terms(h: Histograms, harm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query and distance: the expected precision sum of the group, items before it, and
    the relevant counts as float."""
    r = h.relevant.astype(np.float64)
    nb = np.cumsum(h.count, 1) - h.count
    return _expected_precision_sum(h.count, r, nb, np.cumsum(r, 1) - r, harm), nb, r


def tie_aware_ap(h: Histograms) -> np.ndarray:
    """(Q,) expected AP over random orders of tied items; NaN for queries with no relevant item."""
    harm = _harmonic(int(h.count[0].sum()) if len(h.count) else 0)
    term, _, r = _group_terms(h, harm)
    total_rel = r.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total_rel > 0, term.sum(1) / total_rel, np.nan)


def tie_aware_ap_at_k(h: Histograms, k: int) -> np.ndarray:
    """(Q,) expected AP@k over random orders of tied items (NaN where no relevant item exists).

    AP@k = (1/R_k) sum over relevant items at ranks p <= k of precision@p, 0 when R_k = 0.
    Groups wholly inside the top k contribute their tie-aware terms; the group that straddles
    rank k puts X relevant items into its m = k - N_b top slots, X ~ Hypergeometric(n, r, m);
    the expectation conditions on X, which fixes the normaliser R_k = R_b + X.
    """
    total = h.count.sum(1)
    if len(total) == 0:
        return np.zeros(0)
    if k >= int(total.max()):
        return tie_aware_ap(h)
    harm = _harmonic(int(total.max()))
    term, nb, r = _group_terms(h, harm)
    full = (nb + h.count) <= k
    a = np.where(full, term, 0.0).sum(1)  # expected precision sum of whole groups
    r_full = np.where(full, r, 0.0).sum(1)

    q_idx = np.arange(len(total))
    g = np.argmin(full, axis=1)  # first group not wholly inside (exists since k < total)
    nb_g, n_g, r_g = nb[q_idx, g][:, None], h.count[q_idx, g][:, None], h.relevant[q_idx, g][:, None]
    m = k - nb_g  # top-k slots inside the straddling group, 0 <= m < n_g
    x = np.arange(int(np.minimum(r_g, m).max()) + 1)[None, :].astype(np.float64)
    valid = (x <= np.minimum(r_g, m)) & (m - x <= n_g - r_g)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = _log_comb(r_g, x) + _log_comb(n_g - r_g, m - x) - _log_comb(n_g, m)
        pmf = np.where(valid, np.exp(np.where(valid, log_pmf, 0.0)), 0.0)
        b = _expected_precision_sum(m, x, nb_g, r_full[:, None], harm)  # given X = x
        denom = r_full[:, None] + x
        ratio = np.where(denom > 0, (a[:, None] + b) / denom, 0.0)
    return np.where(h.relevant.sum(1) > 0, (pmf * ratio).sum(1), np.nan)


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def pr_curve_radius(h: Histograms) -> dict[str, list]:
    """Precision and recall of retrieving everything within Hamming radius 0..L.

    Precision at a radius is averaged over the queries that retrieve at least one item there;
    recall over all queries with a relevant item (the published pr_curve convention).
    """
    valid = h.num_relevant > 0
    retrieved = np.cumsum(h.count[valid], 1).astype(np.float64)
    hits = np.cumsum(h.relevant[valid], 1).astype(np.float64)
    answered = retrieved > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        prec_sum = np.where(answered, hits / retrieved, 0.0).sum(0)
        precision = np.where(answered.sum(0) > 0, prec_sum / answered.sum(0), np.nan)
        recall = (hits / h.num_relevant[valid][:, None]).sum(0) / max(int(valid.sum()), 1)
    return {"radius": list(range(h.count.shape[1])),
            "precision": [float(v) if np.isfinite(v) else None for v in precision],
            "recall": [float(v) for v in recall]}


# ----------------------------------------------------------------------------------------------
# Index-tie (stable sort) metrics


def _index_ranking(dist: np.ndarray, rel: np.ndarray, bits: int, topk: list[int | None], k_points: np.ndarray,
                   gains: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Ties by database order (a stable sort). Returns, per query: the items and the relevant items
    at each distance 0..``bits`` ((q, bits + 1) each, the Histograms), the AP for each cut-off in
    ``topk`` ((q, len(topk)); None = all; NaN where the query has no relevant item), the number of
    relevant items among the first k for each k in ``k_points`` ((q, len(k_points))), and with
    ``gains`` (the (q, N) shared-label counts) NDCG@K for each integer K in ``topk`` ((q, len(K))).

    Only the ranks of the relevant items are kept after the sort: the j-th relevant item of a
    query at rank p adds j / p to its precision sum, and the relevant items among the first k are
    a search in the sorted ranks, so no work scales with N but the sort and one gather."""
    q, n = dist.shape
    order = np.argsort(dist, axis=1, kind="stable")  # radix sort for <= 16-bit integers
    flat = np.flatnonzero(np.take_along_axis(rel, order, axis=1))  # row-major: ranks ascend within a row
    rows, cols = np.divmod(flat, n) if q > 1 else (np.zeros(len(flat), np.int64), flat)
    num_rel = np.bincount(rows, minlength=q)
    first = np.concatenate([[0], np.cumsum(num_rel)[:-1]])  # where each row's relevant items start
    ordinal = np.arange(1, len(rows) + 1) - first[rows]  # j: 1, 2, ... within a row
    precision = ordinal / (cols + 1.0)
    aps = np.empty((q, len(topk)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for j, k in enumerate(topk):
            inside = slice(None) if k is None else cols < k
            found = num_rel if k is None else np.bincount(rows[inside], minlength=q)
            ap = np.bincount(rows[inside], weights=precision[inside], minlength=q) / np.maximum(found, 1)
            aps[:, j] = np.where(num_rel > 0, ap, np.nan)
    # relevant items among the first k: each row's sorted ranks searched, as one sorted key row * (n + 1) + rank
    key = rows * (n + 1) + cols
    row_key = np.arange(q)[:, None] * (n + 1)
    hits = np.searchsorted(key, row_key + np.minimum(k_points, n)[None, :]) - first[:, None]
    # the histograms: items per distance by one bincount, relevant ones per distance by searching the
    # ranks where each distance's group ends
    bins = bits + 1
    count = np.bincount((dist + (bins * np.arange(q, dtype=np.int64))[:, None]).ravel() if q > 1 else dist.ravel(),
                        minlength=q * bins).reshape(q, bins)
    relevant = np.diff(np.searchsorted(key, row_key + np.cumsum(count, 1)) - first[:, None], axis=1, prepend=0)
    cuts = [k for k in topk if k is not None]
    ndcg = np.empty((q, len(cuts) if gains is not None else 0))
    if gains is not None and cuts:
        ranked = np.take_along_axis(gains, order[:, :min(max(cuts), n)], axis=1)
        for j, k in enumerate(cuts):
            ndcg[:, j] = _ndcg(ranked[:, :k], _ideal_dcg(gains, k))
    return count, relevant, aps, hits.astype(np.int64), ndcg


def _ideal_dcg(gains: np.ndarray, k: int) -> np.ndarray:
    """(q, N) gains -> (q,) the DCG of the best K (the gains' counts per value: one bincount)."""
    q, n = gains.shape
    top = int(gains.max()) + 1 if gains.size else 1
    counts = np.bincount((np.arange(q)[:, None] * top + gains).ravel(), minlength=q * top).reshape(q, top)
    return _ideal_dcg_of_counts(counts, k)


def _ideal_dcg_of_counts(counts: np.ndarray, k: int) -> np.ndarray:
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


def _ndcg(ranked: np.ndarray, best: np.ndarray) -> np.ndarray:
    """(q, K) gains in ranked order and (q,) the ideal DCG -> (q,) DCG / ideal DCG, with
    DCG = sum over positions p = 1..K of (2^gain - 1) / log2(p + 1); NaN where the ideal is 0."""
    discount = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    dcg = ((np.exp2(ranked.astype(np.float64)) - 1) * discount).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(best > 0, dcg / best, np.nan)


def expected_hits_at_k(h: Histograms, k_points: np.ndarray) -> np.ndarray:
    """(Q, len(k_points)) expected relevant items among the first k under random tie orders: the
    groups wholly inside count fully, the straddling group in proportion (linear interpolation of
    cumulative relevant against cumulative items)."""
    items = np.concatenate([np.zeros((len(h.count), 1)), np.cumsum(h.count, 1)], 1)
    relevant = np.concatenate([np.zeros((len(h.count), 1)), np.cumsum(h.relevant, 1)], 1)
    return np.stack([np.interp(k_points, x, y) for x, y in zip(items, relevant)]) if len(items) else \
        np.zeros((0, len(k_points)))


def pr_points(num_db: int, points: int = 16) -> np.ndarray:
    """The cut-offs k of the precision-recall curve over top-k: evenly spaced from 1 to N."""
    return np.unique(np.round(np.linspace(1, num_db, points)).astype(np.int64))


def _topk_curves(hits: np.ndarray, num_rel: np.ndarray, k_points: np.ndarray) -> dict[str, list]:
    valid = num_rel > 0
    precision = (hits[valid] / k_points).mean(0) if valid.any() else np.zeros(len(k_points))
    recall = (hits[valid] / num_rel[valid][:, None]).mean(0) if valid.any() else np.zeros(len(k_points))
    return {"k": k_points.tolist(), "precision": precision.tolist(), "recall": recall.tolist()}


# ----------------------------------------------------------------------------------------------
# Public entry points


def _check_inputs(query_codes, db_codes, query_labels, db_labels) -> None:
    if len(query_codes) != len(query_labels):
        raise ValueError(f"{len(query_codes)} query codes but {len(query_labels)} query label rows")
    if len(db_codes) != len(db_labels):
        raise ValueError(f"{len(db_codes)} database codes but {len(db_labels)} database label rows")
    if len(db_codes) == 0 or len(query_codes) == 0:
        raise ValueError("empty query or database")


class _Ranker:
    """Packed codes and labels, and the per-chunk distance/relevance computation."""

    def __init__(self, query_codes: Array, db_codes: Array, query_labels: Array, db_labels: Array,
                 db_chunk: int | None = None):
        _check_inputs(query_codes, db_codes, query_labels, db_labels)
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
        dist = _popcount_distances(self.q_codes[s], d_codes, self.bits)
        if not graded:
            return dist, _shares_label(self.q_labels[s], d_labels), None
        gains = _shared_labels(self.q_labels[s], d_labels)
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


def _score_blocks(ranker: _Ranker, s: slice, topk: list[int | None], k_points: np.ndarray,
                  graded: bool) -> tuple[np.ndarray, ...]:
    """``_index_ranking`` of query chunk ``s`` over a database in blocks, with memory bounded by a
    block: a first pass counts items, relevant items and gains per distance in each block; a second
    sorts each block and places its items in the whole ranking (ties by database order): an item at
    distance d in block b ranks after every item closer than d, every item at d in the blocks before
    b, and those before it in its block. Every sum the metrics need is then a sum over blocks."""
    q, n, bins = s.stop - s.start, len(ranker.d_codes), ranker.bits + 1
    top = ranker.classes + 1  # gains are 0..C
    counts, relevants, gain_counts = [], [], np.zeros((q, top), np.int64)
    for b in ranker.blocks:  # pass 1
        dist, rel, gains = ranker.pairs(s, b, graded)
        count, relevant = _histograms(dist, rel, bins)
        counts.append(count)
        relevants.append(relevant)
        if graded:
            gain_counts += np.bincount((gains + (top * np.arange(q))[:, None]).ravel(), minlength=q * top).reshape(q, top)
    count, relevant = sum(counts), sum(relevants)
    closer, rel_closer = np.cumsum(count, 1) - count, np.cumsum(relevant, 1) - relevant
    earlier, rel_earlier = np.zeros_like(count), np.zeros_like(relevant)  # at the same distance, in blocks before
    cuts = [k for k in topk if k is not None]
    prec_sum, found = np.zeros((q, len(topk))), np.zeros((q, len(topk)), np.int64)
    hits, dcg = np.zeros((q, len(k_points)), np.int64), np.zeros((q, len(cuts)))
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
        for t, k in enumerate(topk):
            inside = slice(None) if k is None else r <= k
            prec_sum[:, t] += np.bincount(rows[inside], weights=precision[inside], minlength=q)
            found[:, t] += np.bincount(rows[inside], minlength=q)
        hits += np.searchsorted(rows * (n + 1) + r, row_key + k_points[None, :], side="right") - first[:, None]
        if graded and cuts:
            # an item's rank in the whole is at least its position in the block + 1: the first K positions
            # hold every item of the block that can reach the first K
            head = order[:, :min(max(cuts), m)]
            rank = np.take_along_axis(offset, np.take_along_axis(dist, head, axis=1).astype(np.int64), axis=1) + \
                np.arange(1, head.shape[1] + 1)
            near = rank <= max(cuts)
            near_rows, near_rank = np.nonzero(near)[0], rank[near]
            weight = (np.exp2(np.take_along_axis(gains, head, axis=1)[near].astype(np.float64)) - 1) / np.log2(near_rank + 1)
            for t, k in enumerate(cuts):
                keep = near_rank <= k
                dcg[:, t] += np.bincount(near_rows[keep], weights=weight[keep], minlength=q)
        earlier += counts[i]
        rel_earlier += relevants[i]
    num_rel = relevant.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        aps = np.where(num_rel[:, None] > 0, prec_sum / np.maximum(found, 1), np.nan)
        ideal = np.stack([_ideal_dcg_of_counts(gain_counts, k) for k in cuts], 1) if graded and cuts else dcg
        ndcg = np.where(ideal > 0, dcg / ideal, np.nan) if graded else np.empty((q, 0))
    return count, relevant, aps, hits, ndcg


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
    as ``db_codes`` and ``db_labels``), is scored in blocks of that many (``_stream_scores``, or
    ``_score_blocks`` without numba: two passes, memory bounded by a block; the same numbers, the
    AP sums in another order).
    ``compiled``: a database in one block is ranked by the numba kernel (``metrics.kernel``: no
    sort, equal bit for bit) when True, by numpy when False; when None, by the kernel from
    ``COMPILED_ABOVE`` (query, item) pairs where numba is present, and a streamed one by the kernel
    wherever numba is present (so a share of the queries takes the path the whole would)."""
    k_points = _k_points(len(db_codes), topk, curve_points)
    if len(query_codes) == 0 and len(query_labels) == 0 and len(db_codes):
        return QueryScores.empty(np.shape(db_codes)[1], len(topk), len(k_points))
    ranker = _Ranker(query_codes, db_codes, query_labels, db_labels, db_chunk)
    cuts: list[int | None] = [None] + [int(k) for k in topk]

    streamed = ranker.on_disk or len(ranker.blocks) > 1
    # a streamed database takes the kernel whatever the number of queries: the choice may not hang
    # on a rank's share of them, as the two streamed paths sum AP in another order
    kernel = _compiled_kernel(compiled, COMPILED_ABOVE if streamed else len(ranker.q_codes) * len(ranker.d_codes))
    if streamed and kernel is not None:
        parts = [_stream_scores(kernel, ranker, cuts, k_points, bool(topk), threads)]
    elif streamed:
        if ranker.on_disk:  # the numpy blocks read the tables per query chunk: their digests checked first
            for _ in ranker.db_blocks():
                pass
        parts = ranker.map_chunks(lambda s: _score_blocks(ranker, s, cuts, np.minimum(k_points, len(db_codes)),
                                                          bool(topk)), threads)
    elif kernel is not None:
        parts = ranker.map_chunks(lambda s: _compiled_ranking(kernel, ranker, s, cuts, k_points, bool(topk)), threads)
    else:
        def score(dist, rel, gains):
            return _index_ranking(dist, rel, ranker.bits, cuts, k_points, gains)
        parts = ranker.map(score, threads, graded=bool(topk))
    return QueryScores(*(np.concatenate([p[i] for p in parts]) for i in range(len(QueryScores.FIELDS))))


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


@dataclass
class _KernelSums:
    """What the compiled kernels fill for q queries, and how their fields become
    ``_index_ranking``'s: the AP cut-offs (N for AP@all), the hit k in ascending order (the order
    the kernels meet them in), the precision sums and counts within each cut-off, the hits, the
    leading gains and the gain histograms."""

    cuts: np.ndarray  # (1 + len(topk),) int64
    ks: list[int]  # the K of topk (NDCG)
    ascending: np.ndarray  # the k_points' order, ascending
    k_ascending: np.ndarray  # the k_points in that order, at most N
    top_k: int  # leading gains kept: the largest K (0 when not graded)
    prec_sum: np.ndarray  # (q, len(cuts)) float64
    found: np.ndarray  # (q, len(cuts)) int64
    hits: np.ndarray  # (q, len(k_points)) int64, in ascending k order
    top_gains: np.ndarray  # (q, top_k) uint16
    gain_counts: np.ndarray  # (q, C + 1) int64 (one column when not graded)

    @classmethod
    def zeros(cls, q: int, n: int, cuts: list[int | None], k_points: np.ndarray, graded: bool,
              classes: int) -> "_KernelSums":
        ks = [k for k in cuts if k is not None]
        top_k = min(max(ks), n) if graded and ks else 0
        ascending = np.argsort(k_points, kind="stable")
        return cls(np.array([n if k is None else k for k in cuts], np.int64), ks, ascending,
                   np.minimum(k_points[ascending], n).astype(np.int64), top_k,
                   np.zeros((q, len(cuts))), np.zeros((q, len(cuts)), np.int64),
                   np.zeros((q, len(k_points)), np.int64), np.zeros((q, top_k), np.uint16),
                   np.zeros((q, classes + 1 if graded else 1), np.int64))

    def fields(self, count: np.ndarray, relevant: np.ndarray, graded: bool) -> tuple[np.ndarray, ...]:
        """``_index_ranking``'s fields: the APs (NaN where a query has no relevant item), the hits in
        k_points' order, and NDCG@K from the leading gains and the gain histograms by the numpy
        path's code."""
        hits = np.empty_like(self.hits)
        hits[:, self.ascending] = self.hits
        num_rel = relevant.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            aps = np.where(num_rel[:, None] > 0, self.prec_sum / np.maximum(self.found, 1), np.nan)
        ndcg = np.empty((len(relevant), len(self.ks) if graded else 0))
        if graded and self.ks:
            for j, k in enumerate(self.ks):
                ndcg[:, j] = _ndcg(self.top_gains[:, :k], _ideal_dcg_of_counts(self.gain_counts, k))
        return count, relevant, aps, hits, ndcg


def _compiled_ranking(kernel, ranker: _Ranker, s: slice, cuts: list[int | None], k_points: np.ndarray,
                      graded: bool) -> tuple[np.ndarray, ...]:
    """``_index_ranking``'s fields for query chunk ``s`` from the compiled kernel (no sort, no
    (q, N) arrays): equal to the numpy path's bit for bit."""
    q, n, bins = s.stop - s.start, len(ranker.d_codes), ranker.bits + 1
    sums = _KernelSums.zeros(q, n, cuts, k_points, graded, ranker.classes)
    count, relevant = np.zeros((q, bins), np.int64), np.zeros((q, bins), np.int64)
    kernel.rank_chunk(ranker.q_codes[s], ranker.d_codes, ranker.q_labels[s], ranker.d_labels, bins, sums.cuts,
                      sums.k_ascending, sums.top_k, graded, count, relevant, sums.prec_sum, sums.found, sums.hits,
                      sums.top_gains, sums.gain_counts)
    return sums.fields(count, relevant, graded)


def _stream_scores(kernel, ranker: _Ranker, cuts: list[int | None], k_points: np.ndarray, graded: bool,
                   threads: int) -> tuple[np.ndarray, ...]:
    """``_index_ranking``'s fields for every query, the database read in blocks twice
    (``kernel.count_block``, then ``kernel.place_block``; docs/evaluation.md): memory is one block
    and per-query arrays of O(L + K). Integers and NDCG equal the one-pass paths' bit for bit; the
    APs agree to rounding (the precisions are added in database order, not rank order)."""
    q, n, bins = len(ranker.q_codes), len(ranker.d_codes), ranker.bits + 1
    sums = _KernelSums.zeros(q, n, cuts, k_points, graded, ranker.classes)
    size = max(1, -(-q // (4 * max(1, threads))))  # a few query parts a thread: even loads
    parts = [slice(a, min(a + size, q)) for a in range(0, q, size)]
    histogram = np.zeros((q, 2 * bins), np.int64)  # [a, 2d]: items at distance d not relevant, [a, 2d + 1] relevant
    qc, ql = ranker.q_codes, ranker.q_labels
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for codes, labels in ranker.db_blocks():
            list(pool.map(lambda s: kernel.count_block(qc[s], codes, ql[s], labels, graded, histogram[s],
                                                       sums.gain_counts[s]), parts))
        relevant = np.ascontiguousarray(histogram[:, 1::2])
        count = histogram[:, 0::2] + relevant
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
    return sums.fields(count, relevant, graded)


DB_BLOCK = 1 << 20  # database rows per float32 block of score_queries_torch's products


def score_queries_torch(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                        db_labels: torch.Tensor, *, topk: tuple[int, ...] | list[int] = (), curve_points: int = 16,
                        chunk_entries: int = 1 << 24) -> QueryScores:
    """``score_queries`` with torch kernels on the codes' device: a GPU's, where the codes are (its
    CPU run is what CI tests). Distances and shared-label counts are matrix products of +-1 codes
    and 0/1 labels, exact in float32 (integers below 2^24); queries go in chunks of about
    ``chunk_entries`` (query, item) pairs, which bounds memory at ~40 bytes a pair. Integer fields
    equal ``score_queries``'; the float ones agree to rounding (their sums run in another order)."""
    device = query_codes.device
    _check_inputs(query_codes, db_codes, query_labels, db_labels)
    # the database stays in bytes (+-1 int8 codes, 0/1 labels): N x (L + C) bytes; float32 blocks of
    # DB_BLOCK rows are made for each product
    q_sign, d_sign = (query_codes > 0).float() * 2 - 1, (db_codes > 0).to(torch.int8) * 2 - 1
    if q_sign.shape[1] != d_sign.shape[1]:
        raise ValueError(f"code lengths differ: queries {q_sign.shape[1]} bits, database {d_sign.shape[1]} bits")
    q_lab, d_lab = (query_labels > 0).float(), (db_labels > 0).to(torch.uint8)
    bits, num_db = q_sign.shape[1], len(d_sign)
    cuts = [int(k) for k in topk]
    k_points = torch.from_numpy(_k_points(num_db, topk, curve_points)).clamp(max=num_db).to(device)
    size = max(1, min(len(q_sign), chunk_entries // num_db))
    parts = []
    with torch.autocast(device.type, enabled=False):
        for s in range(0, len(q_sign), size):
            dist = torch.empty(min(size, len(q_sign) - s), num_db, dtype=torch.long, device=device)  # (c, N)
            gains = torch.empty_like(dist)
            for a in range(0, num_db, DB_BLOCK):
                b = min(a + DB_BLOCK, num_db)
                dist[:, a:b] = ((bits - q_sign[s:s + size] @ d_sign[a:b].float().T) / 2).round().long()
                gains[:, a:b] = (q_lab[s:s + size] @ d_lab[a:b].float().T).round().long()
            rel = gains > 0
            c = len(dist)
            key = ((torch.arange(c, device=device)[:, None] * (bits + 1) + dist) * 2 + rel).flatten()
            both = torch.bincount(key, minlength=c * (bits + 1) * 2).view(c, bits + 1, 2)
            order = torch.sort(dist.to(torch.int16 if bits < 1 << 15 else torch.int32), dim=1, stable=True).indices
            hits = rel.gather(1, order)
            cum = hits.cumsum(1)
            num_rel = cum[:, -1]
            aps = []
            for k in [None, *cuts]:
                kk = num_db if k is None else min(k, num_db)
                prec_sum = (torch.where(hits[:, :kk], cum[:, :kk], 0).double()
                            / torch.arange(1, kk + 1, device=device, dtype=torch.float64)).sum(1)
                denom = cum[:, kk - 1]
                ap = torch.where(denom > 0, prec_sum / denom.clamp(min=1), 0.0)
                aps.append(torch.where(num_rel > 0, ap, float("nan")))
            ndcg = []
            if cuts:
                top = min(max(cuts), num_db)
                ranked = gains.gather(1, order[:, :top])
                ideal = gains.sort(dim=1, descending=True).values[:, :top]
                discount = 1.0 / torch.log2(torch.arange(2, top + 2, device=device, dtype=torch.float64))
                for k in cuts:
                    dcg = ((torch.exp2(ranked[:, :k].double()) - 1) * discount[:k]).sum(1)
                    best = ((torch.exp2(ideal[:, :k].double()) - 1) * discount[:k]).sum(1)
                    ndcg.append(torch.where(best > 0, dcg / best.clamp(min=1e-300), float("nan")))
            parts.append([both.sum(2), both[:, :, 1], torch.stack(aps, 1), cum[:, k_points - 1].long(),
                          torch.stack(ndcg, 1) if ndcg else torch.empty(c, 0, dtype=torch.float64, device=device)])
    return QueryScores(*(torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(len(QueryScores.FIELDS))))


def _k_points(num_db: int, topk, curve_points: int) -> np.ndarray:
    """The top-k cut-offs counted per query: the PR curve's, then each K of ``topk``."""
    return np.concatenate([pr_points(num_db, curve_points), np.asarray([int(k) for k in topk], dtype=np.int64)])


def summarize_scores(scores: QueryScores, num_db: int, *, topk: tuple[int, ...] | list[int] = (),
                     curve_points: int = 16) -> dict:
    """Every metric of ``retrieval_metrics`` from its per-query scores (means over the queries with
    at least one relevant database item)."""
    h = Histograms(scores.count, scores.relevant)
    curve_k = pr_points(num_db, curve_points)
    k_points = _k_points(num_db, topk, curve_points)
    expected = expected_hits_at_k(h, k_points)
    num_rel = h.num_relevant
    scored = num_rel > 0
    at_k = {int(k): j for j, k in enumerate(k_points) if j >= len(curve_k)}
    column = {int(k): j for j, k in enumerate(topk)}
    hits = scores.hits
    return {
        "map": _mean(scores.index_ap[:, 0]),
        "map_tie_aware": _mean(tie_aware_ap(h)),
        "map_at_k": {k: _mean(scores.index_ap[:, 1 + column[k]]) for k in at_k},
        "map_at_k_tie_aware": {k: _mean(tie_aware_ap_at_k(h, k)) for k in at_k},
        "precision_at_k": {k: float((hits[scored, j] / min(k, num_db)).mean()) for k, j in at_k.items()},
        "precision_at_k_tie_aware": {k: float((expected[scored, j] / min(k, num_db)).mean()) for k, j in at_k.items()},
        "recall_at_k": {k: float((hits[scored, j] / num_rel[scored]).mean()) for k, j in at_k.items()},
        "ndcg_at_k": {k: _mean(scores.ndcg[:, column[k]]) for k in at_k},
        "pr_radius": pr_curve_radius(h),
        "pr_topk": _topk_curves(hits[:, : len(curve_k)], num_rel, curve_k),
        "num_queries": int(len(scored)),
        "num_queries_scored": int(scored.sum()),
    }


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
    best first (a search index's full result); NaN where a query has no relevant item. With the
    stable Hamming ranking this is the index-tie AP of ``retrieval_metrics``."""
    ranking = ranking.cpu().numpy() if isinstance(ranking, torch.Tensor) else np.asarray(ranking)
    if ranking.shape[1] != len(db_labels) or len(ranking) != len(query_labels):
        raise ValueError(f"a full ranking of {len(db_labels)} items for each of {len(query_labels)} queries "
                         f"is needed, got {ranking.shape}")
    rel = np.take_along_axis(relevance(query_labels, db_labels).numpy(), ranking, axis=1)
    cum = np.cumsum(rel, axis=1, dtype=np.int64)
    num_rel = cum[:, -1]
    prec_sum = (np.where(rel, cum, 0) / np.arange(1, ranking.shape[1] + 1)).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(num_rel > 0, prec_sum / np.maximum(num_rel, 1), np.nan)


def _mean(ap: np.ndarray) -> float:
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if len(ap) else float("nan")


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
    ranker = _Ranker(query_codes, db_codes, query_labels, db_labels)
    if ties == "index":
        parts = ranker.map(lambda dist, rel, _: _index_ranking(dist, rel, ranker.bits, [topk], np.ones(1, np.int64))[2][:, 0])
    else:
        def tie_aware(dist, rel, _):
            h = Histograms(*_histograms(dist, rel, ranker.bits + 1))
            return tie_aware_ap(h) if topk is None else tie_aware_ap_at_k(h, topk)
        parts = ranker.map(tie_aware)
    return _mean(np.concatenate(parts))


def pair_reciprocal_rank(query_codes: Array, db_codes: Array) -> np.ndarray:
    """(V,) for paired rows (query i's one relevant item is database row i: an image and its own
    text), the expected reciprocal rank of that item in the Hamming ranking, ties in random order:
    with n_< items strictly closer and n_= at its distance (itself included),
    (H(n_< + n_=) - H(n_<)) / n_=. Its mean is the tie-aware mAP with one relevant item per query."""
    qb, db = _bits(query_codes), _bits(db_codes)
    if qb.shape != db.shape:
        raise ValueError(f"paired codes differ in shape: {qb.shape} and {db.shape}")
    q, d = pack_words(qb), pack_words(db)
    harm = harmonic_numbers(len(d))
    out = np.empty(len(q))
    size = max(1, (1 << 20) // max(len(d), 1))
    for s in range(0, len(q), size):
        dist = _popcount_distances(q[s:s + size], d, qb.shape[1])
        own = dist[np.arange(len(dist)), np.arange(s, s + len(dist))][:, None]
        closer, tied = (dist < own).sum(1), (dist == own).sum(1)
        out[s:s + size] = (harm[closer + tied] - harm[closer]) / tied
    return out


def chance_map(query_labels: Array, db_labels: Array) -> float:
    """The mAP@all of a random ranking on these labels: tie-aware mAP when every distance is equal.
    Per query with R relevant of N items: (H(N) + (R - 1)(N - H(N)) / (N - 1)) / N."""
    num_rel = relevance(query_labels, db_labels).sum(1).numpy().astype(np.int64)
    n = len(db_labels)
    h = Histograms(np.full((len(num_rel), 1), n, dtype=np.int64), num_rel[:, None])
    return _mean(tie_aware_ap(h))


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

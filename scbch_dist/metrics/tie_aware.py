"""Tie-aware metrics: the expectation over uniformly random orders of items at equal Hamming
distance, in closed form (McSherry and Najork, ECIR 2008), from two histograms per query (items and
relevant items at each distance 0..L) in O(L) a query."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from scbch_dist.metrics.codes import Array, bits_of, pack_words, popcount_distances, relevance
from scbch_dist.metrics.sums import mean_of_scored

HARMONIC_TABLE_ABOVE = 1 << 22  # 32 MB of float64; a database beyond it looks its harmonic numbers up in a pass


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


def harmonic_lookup(n: int):
    """H[0..n] as a table, or beyond HARMONIC_TABLE_ABOVE as a HarmonicAt (the same numbers)."""
    return harmonic_numbers(n) if n <= HARMONIC_TABLE_ABOVE else HarmonicAt()


@dataclass
class Histograms:
    """Per query: items (``count``) and relevant items (``relevant``) at each distance 0..L."""

    count: np.ndarray  # (Q, L+1) int64
    relevant: np.ndarray  # (Q, L+1) int64

    @property
    def num_relevant(self) -> np.ndarray:
        return self.relevant.sum(1)


def histograms(dist: np.ndarray, rel: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
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
    harm = harmonic_lookup(int(h.count[0].sum()) if len(h.count) else 0)
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
    harm = harmonic_lookup(int(total.max()))
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


def expected_hits_at_k(h: Histograms, k_points: np.ndarray) -> np.ndarray:
    """(Q, len(k_points)) expected relevant items among the first k under random tie orders: the
    groups wholly inside count fully, the straddling group in proportion (linear interpolation of
    cumulative relevant against cumulative items)."""
    items = np.concatenate([np.zeros((len(h.count), 1)), np.cumsum(h.count, 1)], 1)
    relevant = np.concatenate([np.zeros((len(h.count), 1)), np.cumsum(h.relevant, 1)], 1)
    return np.stack([np.interp(k_points, x, y) for x, y in zip(items, relevant)]) if len(items) else \
        np.zeros((0, len(k_points)))


def pair_reciprocal_rank(query_codes: Array, db_codes: Array) -> np.ndarray:
    """(V,) for paired rows (query i's one relevant item is database row i: an image and its own
    text), the expected reciprocal rank of that item in the Hamming ranking, ties in random order:
    with n_< items strictly closer and n_= at its distance (itself included),
    (H(n_< + n_=) - H(n_<)) / n_=. Its mean is the tie-aware mAP with one relevant item per query."""
    qb, db = bits_of(query_codes), bits_of(db_codes)
    if qb.shape != db.shape:
        raise ValueError(f"paired codes differ in shape: {qb.shape} and {db.shape}")
    q, d = pack_words(qb), pack_words(db)
    harm = harmonic_numbers(len(d))
    out = np.empty(len(q))
    size = max(1, (1 << 20) // max(len(d), 1))
    for s in range(0, len(q), size):
        dist = popcount_distances(q[s:s + size], d, qb.shape[1])
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
    return mean_of_scored(tie_aware_ap(h))


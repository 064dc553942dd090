"""Codes and labels as packed 64-bit words, and what a query and a database item have in common:
their Hamming distance and their shared labels. Every ranking path starts here."""

from __future__ import annotations

import numpy as np
import torch

from scbch_dist.metrics.table import PackedTable

Array = np.ndarray | torch.Tensor


def bits_of(codes: Array) -> np.ndarray:
    """(n, L) codes -> (n, L) bool bits (set where > 0)."""
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    return c > 0


def packed(codes: Array, rows: int = 1 << 20) -> np.ndarray:
    """``pack_words(bits_of(codes))`` a block of rows at a time: no (n, L) bool copy of the whole."""
    if isinstance(codes, torch.Tensor) or len(codes) <= rows:
        return pack_words(bits_of(codes))
    return np.concatenate([pack_words(bits_of(codes[a:a + rows])) for a in range(0, len(codes), rows)])


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


def popcount_distances(q: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """Packed (q, W), (N, W) uint64 -> (q, N) Hamming distances, uint8 (L < 256) or uint16."""
    out = np.bitwise_count(q[:, None, 0] ^ d[None, :, 0]).astype(np.uint8 if bits < 256 else np.uint16)
    for w in range(1, q.shape[1]):
        out += np.bitwise_count(q[:, None, w] ^ d[None, :, w])
    return out


def shares_label(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Packed label words (q, W), (N, W) -> (q, N) bool: at least one common label."""
    out = (q[:, None, 0] & d[None, :, 0]) != 0
    for w in range(1, q.shape[1]):
        out |= (q[:, None, w] & d[None, :, w]) != 0
    return out


def shared_labels(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Packed label words (q, W), (N, W) -> (q, N) uint8: the number of common labels (the graded
    relevance of NDCG)."""
    out = np.bitwise_count(q[:, None, 0] & d[None, :, 0])
    for w in range(1, q.shape[1]):
        out += np.bitwise_count(q[:, None, w] & d[None, :, w])
    return out


def hamming_distances(query_codes: Array, db_codes: Array) -> torch.Tensor:
    """(q, L), (N, L) -> (q, N) int32 Hamming distances."""
    qb, db = bits_of(query_codes), bits_of(db_codes)
    if qb.shape[1] != db.shape[1]:
        raise ValueError(f"code lengths differ: queries {qb.shape[1]} bits, database {db.shape[1]} bits")
    return torch.from_numpy(popcount_distances(pack_words(qb), pack_words(db), qb.shape[1]).astype(np.int32))


def relevance(query_labels: Array, db_labels: Array) -> torch.Tensor:
    """(q, C), (N, C) multi-hot -> (q, N) bool: share at least one label."""
    return torch.from_numpy(shares_label(pack_words(bits_of(query_labels)), pack_words(bits_of(db_labels))))


def check_inputs(query_codes, db_codes, query_labels, db_labels) -> None:
    """Row counts that match, and neither side empty: a ValueError saying which."""
    if len(query_codes) != len(query_labels):
        raise ValueError(f"{len(query_codes)} query codes but {len(query_labels)} query label rows")
    if len(db_codes) != len(db_labels):
        raise ValueError(f"{len(db_codes)} database codes but {len(db_labels)} database label rows")
    if len(db_codes) == 0 or len(query_codes) == 0:
        raise ValueError("empty query or database")


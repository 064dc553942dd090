"""Hamming search over binary codes with FAISS's binary indexes (docs/search.md).

Codes are (n, L) bool arrays, bit set = +1, as ``codes.npz`` holds them once unpacked. FAISS wants
whole bytes, so a code length that is not a multiple of 8 is padded with zero bits on every code,
which leaves every distance unchanged. Kinds:

- ``flat``: ``IndexBinaryFlat``, brute-force popcount. Exact; its ranking is ``metrics``' ranking,
  ties by database order.
- ``hash``: ``IndexBinaryMultiHash``: ``hash_tables`` hash tables on disjoint ``hash_bits``-bit
  pieces of the code, each probed at every key within ``hash_flips`` bit flips. It finds every
  code within ``hash_tables * (hash_flips + 1) - 1`` bits of the query (pigeonhole), and some
  further ones.
- ``ivf``: ``IndexBinaryIVF``: ``nlist`` lists around binary k-means centres; ``nprobe`` of
  them are scanned.
- ``hnsw``: ``IndexBinaryHNSW``: a navigable small-world graph with ``hnsw_m`` links per code,
  searched with a beam of ``ef_search``.

Every search returns the k best by (distance, position): FAISS's exact scan keeps the earliest of
equal candidates and the approximate kinds return what they found, and both are put in that order,
so a result never depends on thread scheduling.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from scbch_dist.config import IndexSettings
from scbch_dist.errors import ScbchError
from scbch_dist.metrics.table import PackedTable

KINDS = ("flat", "hash", "ivf", "hnsw")
# Below this many queries a search runs on one OpenMP thread: FAISS splits its work by query, so
# more threads add only a fork-join per call, and on a busy machine that join waits for a
# descheduled thread, which costs far more than the search (docs/benchmarks.md, "Figures quoted in
# the code").
ONE_THREAD_BELOW = 64
EXACT_KINDS = ("flat",)
MAX_BITS = 4096  # FAISS's binary indexes take any whole number of bytes; the trainer makes up to 1024


class HammingIndexError(ScbchError, ValueError):
    """The one error of the index stack (hamming, index, search): a setting or input the index
    cannot take, or a run's codes or index folder that cannot be used as asked; the message names
    the setting or file."""


@dataclass(frozen=True)
class Bound:
    """The values one numeric setting takes, ``low`` to ``high``: checked before any work and said
    in the command's --help, from this one place."""

    flag: str  # the command-line option that sets it
    low: int | float
    high: int | float
    meaning: str

    def check(self, value: int | float) -> None:
        if not self.low <= value <= self.high:  # NaN too: no comparison holds
            raise HammingIndexError(f"{self.flag} {value}: must be {self.low} to {self.high} ({self.meaning})")


# Upper bounds: FAISS allocates what a setting asks, with no limit of its own (nlist 10^12 is a
# bad_alloc; HNSW keeps 2M int32 links a code at level 0, so M 10^5 is 800 KB a code; a search
# beam of ef is a heap of ef entries a thread: ef_search 10^8 took 1.5 GB for 5 queries), and past
# these values a setting buys nothing but memory and time.
MAX_NLIST = 1 << 16  # FAISS's guide gives 65536 lists to 1M-10M codes; the k-means costs ~nlist^2
MAX_HNSW_M = 256  # FAISS and the HNSW paper use 4 to 64; 256 links take 2 KiB a code (20 GiB at 10M)
MAX_EF = 1 << 16  # FAISS keeps ef in a C int (OverflowError from 2^31)
MAX_HASH_BITS = 63  # a table's key is one 64-bit word in FAISS's multi-hash index

# Every numeric setting of IndexSettings, with its command-line option (docs/search.md, "Every
# numeric option has a range"). The lower bounds are FAISS's, each value below them tried: HNSW M 0
# aborts the process (SIGABRT) and M 1 crashes it (SIGSEGV); nprobe 0 is a FAISS error and -1 an
# OverflowError; an ef_search of 0 returns one code; hash_bits -1 crashes. 0 means automatic where
# the meaning says so (IndexSettings). The seed is FAISS's C int, and numpy's sampler takes no
# negative one.
SETTINGS = {
    "nlist": Bound("--nlist", 0, MAX_NLIST, "ivf: lists; 0: about sqrt(N), at most 1024"),
    "nprobe": Bound("--nprobe", 1, MAX_NLIST, "ivf: lists scanned per query; more than nlist scans all"),
    "hnsw_m": Bound("--hnsw-m", 2, MAX_HNSW_M, "hnsw: links per code"),
    "ef_construction": Bound("--ef-construction", 1, MAX_EF, "hnsw: build beam"),
    "ef_search": Bound("--ef-search", 1, MAX_EF, "hnsw: search beam"),
    "hash_bits": Bound("--hash-bits", 0, MAX_HASH_BITS, "hash: bits per table; 0: about log2(N)"),
    "hash_tables": Bound("--hash-tables", 0, MAX_BITS, "hash: tables; 0: as many as fit in the code"),
    "hash_flips": Bound("--hash-flips", 0, MAX_HASH_BITS,
                        "hash: bits flipped when probing a table, at most its --hash-bits"),
    "seed": Bound("--seed", 0, 2**31 - 1, "ivf: k-means seed"),
}


def check_settings(settings: IndexSettings) -> None:
    """Refuse, by option, value and range, a setting out of its ``SETTINGS`` bound."""
    for name, bound in SETTINGS.items():
        bound.check(getattr(settings, name))


def check_flips(flips: int, hash_bits: int) -> None:
    """FAISS's multi-hash probing never ends when asked to flip more bits than a table's key has
    (tried: 17 flips of 16-bit keys ran until killed), so that is refused too."""
    if flips > hash_bits:
        raise HammingIndexError(f"--hash-flips {flips}: must be 0 to {hash_bits}, the bits of a table of this "
                                f"index (--hash-bits {hash_bits})")


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise HammingIndexError("the Hamming index needs FAISS: pip install 'scbch_dist[faiss]'") from None
    return faiss


def padded_bits(bits: int) -> int:
    """The index dimension: ``bits`` rounded up to whole bytes."""
    return -(-bits // 8) * 8


def pack(codes: np.ndarray) -> np.ndarray:
    """(n, L) bool -> (n, ceil(L/8)) uint8 in FAISS's bit order (bit j of a code is bit j % 8 of
    byte j // 8), zero padded. Any order works as long as queries and database share it."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise HammingIndexError(f"codes must be (n, L), got shape {codes.shape}")
    return np.ascontiguousarray(np.packbits(codes.astype(bool), axis=1, bitorder="little"))


@dataclass(frozen=True)
class Resolved:
    """The settings one index is built with, automatic values filled in for its size."""

    kind: str
    bits: int
    count: int
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0
    ef_search: int = 0
    hash_bits: int = 0
    hash_tables: int = 0
    hash_flips: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v or k in ("kind", "bits", "count")}


def resolve(settings: IndexSettings, kind: str, bits: int, count: int) -> Resolved:
    """Fill the automatic (0) settings for ``count`` codes of ``bits`` bits; refuse bad ones by name."""
    check_settings(settings)
    if kind not in KINDS:
        raise HammingIndexError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not 1 <= bits <= MAX_BITS:
        raise HammingIndexError(f"codes of {bits} bits: the index takes 1 to {MAX_BITS}")
    if count < 1:
        raise HammingIndexError("no codes to index")
    if kind == "flat":
        return Resolved(kind, bits, count)
    if kind == "ivf":
        # about sqrt(N), FAISS wants 39 per list; at most 1024: the k-means (256 codes a list) costs
        # ~nlist^2, while scanning longer lists is cheap (docs/benchmarks.md, "Figures quoted in the code")
        nlist = settings.nlist or max(1, min(count // 39, round(math.sqrt(count)), 1024))
        if nlist > count:
            raise HammingIndexError(f"index.nlist={nlist} lists for {count} codes: at most one list per code")
        return Resolved(kind, bits, count, nlist=nlist, nprobe=min(settings.nprobe, nlist))
    if kind == "hnsw":
        return Resolved(kind, bits, count, hnsw_m=settings.hnsw_m, ef_construction=settings.ef_construction,
                        ef_search=settings.ef_search)
    width = padded_bits(bits)
    # about log2(N) bits a table: a bucket then holds about one code of a uniform database; but at
    # least 3 tables where the code has 24 bits or more (at 10M, 64 bits: 3 x 21, not 2 x 24 bits)
    hash_bits = settings.hash_bits or min(width, max(8, math.ceil(math.log2(count))), max(8, width // 3))
    tables = settings.hash_tables or max(1, width // hash_bits)
    if hash_bits * tables > width:
        raise HammingIndexError(f"index.hash_tables={tables} x index.hash_bits={hash_bits} = {hash_bits * tables} bits, "
                                f"more than the {width} bits of a code")
    if hash_bits > MAX_HASH_BITS:
        raise HammingIndexError(f"index.hash_bits={hash_bits}: at most {MAX_HASH_BITS} bits a table")
    check_flips(settings.hash_flips, hash_bits)
    return Resolved(kind, bits, count, hash_bits=hash_bits, hash_tables=tables, hash_flips=settings.hash_flips)


ADD_ROWS = 1 << 20  # codes packed and added to an index at a time


def _faiss_bytes(table: PackedTable, words: np.ndarray) -> np.ndarray:
    """A table's uint64 words as FAISS's packed bytes: the same bits (bit j at bit j % 8 of byte
    j // 8), the bytes past the code's dropped."""
    return np.ascontiguousarray(np.asarray(words).view("<u1")[:, :padded_bits(table.width) // 8])


def _packed_rows(codes: np.ndarray | PackedTable, rows: np.ndarray | None = None) -> np.ndarray:
    """``pack`` of ``codes`` (or of the ``rows`` given, sorted): (n, L) bool, or a metrics PackedTable."""
    if not isinstance(codes, PackedTable):
        return pack(codes if rows is None else codes[rows])
    words = codes.read(0, len(codes))
    return _faiss_bytes(codes, words if rows is None else words[rows])


def _packed_blocks(codes: np.ndarray | PackedTable, rows: int = ADD_ROWS) -> Iterator[np.ndarray]:
    """``pack`` of ``codes`` ``rows`` at a time, in order: from a table on disk, a block read at a
    time and its digest checked after the last (PackedTable.blocks)."""
    if not isinstance(codes, PackedTable):
        yield from (pack(codes[a:a + rows]) for a in range(0, len(codes), rows))
        return
    for _, words in codes.blocks(rows):
        yield _faiss_bytes(codes, words)


def build(codes: np.ndarray | PackedTable, settings: Resolved, *, seed: int = 0, rows: int = ADD_ROWS):
    """An index of kind ``settings.kind`` over ``codes`` ((n, L) bool, or a metrics PackedTable on
    disk), positions 0..n-1 in row order; the codes are packed and added ``rows`` at a time, so a
    table is never in memory whole (docs/search.md)."""
    faiss = faiss_module()
    d = padded_bits(codes.shape[1])
    if settings.kind == "flat":
        index = faiss.IndexBinaryFlat(d)
    elif settings.kind == "hash":
        index = faiss.IndexBinaryMultiHash(d, settings.hash_tables, settings.hash_bits)
    elif settings.kind == "hnsw":
        index = faiss.IndexBinaryHNSW(d, settings.hnsw_m)
        index.hnsw.efConstruction = settings.ef_construction
    else:
        quantizer = faiss.IndexBinaryFlat(d)
        index = faiss.IndexBinaryIVF(quantizer, d, settings.nlist)  # keeps a reference to its quantizer
        cap = 256 * settings.nlist  # FAISS's own cap on k-means points per centre
        sample = None
        if len(codes) > cap:
            sample = np.sort(np.random.default_rng(seed).choice(len(codes), cap, replace=False))
        index.cp.seed = seed
        index.train(_packed_rows(codes, sample))
    for block in _packed_blocks(codes, rows):
        index.add(block)
    configure(index, settings)
    return index


def configure(index, settings: Resolved) -> None:
    """Apply the search-time settings (nprobe, ef_search, hash_flips) to a built or loaded index."""
    if settings.kind == "ivf":
        index.nprobe = settings.nprobe
    elif settings.kind == "hnsw":
        index.hnsw.efSearch = max(settings.ef_search, 1)
    elif settings.kind == "hash":
        check_flips(settings.hash_flips, settings.hash_bits)  # a search-time override may ask more
        index.nflip = settings.hash_flips


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest codes of each query ((q, L) bool).

    Returns ``(distances, positions)``, each (q, k') with k' = min(k, ntotal): int32 Hamming
    distances and int64 positions, sorted by (distance, position). An approximate index that
    finds fewer than k' codes for a query pads its row with distance -1 and position -1 at the end.
    """
    if k < 1:
        raise HammingIndexError(f"-k {k}: must be at least 1")
    packed = pack(queries)
    if packed.shape[1] * 8 != index.d:
        raise HammingIndexError(f"queries of {queries.shape[1]} bits against an index of {index.d} bits")
    k = min(k, index.ntotal)
    with omp_threads(1 if len(packed) < ONE_THREAD_BELOW else None):
        distances, positions = index.search(packed, k)
    return order_results(distances.astype(np.int32), positions.astype(np.int64))


@contextlib.contextmanager
def omp_threads(n: int | None):
    """FAISS's OpenMP thread count set to ``n`` for the block (None: unchanged), then restored."""
    if n is None:
        yield
        return
    faiss = faiss_module()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def order_results(distances: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (distance, position), missing results (-1) last."""
    missing = positions < 0
    key_d = np.where(missing, np.iinfo(np.int32).max, distances)
    key_p = np.where(missing, np.iinfo(np.int64).max, positions)
    order = np.lexsort((key_p, key_d), axis=1)
    return np.take_along_axis(distances, order, 1), np.take_along_axis(positions, order, 1)


def write(index, path) -> None:
    """Save with FAISS's own binary index format."""
    faiss_module().write_index_binary(index, str(path))


def read(path, settings: Resolved):
    index = faiss_module().read_index_binary(str(path))
    configure(index, settings)
    return index

"""Hamming index kinds (scbch_dist.retrieval.hamming: flat, hash, ivf, hnsw): build time, size, single-query
latency and recall@10 against the exact result, at growing N. Prints Markdown tables; asserts nothing.

    python tests/benchmarks/bench_index.py [--sizes 1000 100000 1000000 10000000] [--bits 64 128]
                                           [--kinds flat hash ivf hnsw] [--codes clustered random]
                                           [--queries 200] [--max-build 900]
    python tests/benchmarks/bench_index.py --sweep [--sweep-size 1000000] [--sweep-bits 64]   # knob trade-offs
    python tests/benchmarks/bench_index.py --calibrate /tmp/benchrun/run/codes.npz   # real codes vs clustered

Every index is built with hamming.resolve(IndexSettings(kind=...)) for its N and L, i.e. the defaults
in scbch_dist/config.py and the automatic rules in hamming.resolve, and FAISS runs on 2 threads
(faiss.omp_set_num_threads(2), set explicitly) for builds and the exact reference search, while
hamming.search runs a single query on one thread (hamming.ONE_THREAD_BELOW). The load average (/proc/loadavg) is printed before
each table: timings are only worth reading on a quiet machine (``--max-load``: wait at the start,
up to 10 minutes, until the 1-minute load is below it).

GlobalBatch:
  build s: hamming.build over the (N, L) bool codes (packing, IVF k-means, adding), one run.
  size MB: len(faiss.serialize_index_binary(index)), the index as hamming.write saves it.
  p50 / p99 ms: latency of hamming.search(index, one query, 10) (FAISS search plus the (distance,
    position) reordering), one query per call as a user's query, over ``--queries`` queries after
    5 warm-up queries.
  recall@10: tie-aware, against the exact result: per query, the fraction of the 10 returned codes
    whose Hamming distance (recomputed from the returned positions) is <= the exact 10th-smallest
    distance (a missing result, position -1, counts as a miss); mean over queries. Flat is 1 by
    construction.
  others: CPUs used by other processes (from /proc/stat, over 1 s while this one sleeps) just before
    the build and before the timed queries, the larger; each waits up to ``--patience`` s for it
    to fall under ``--max-busy``. Latencies with others near 1 are not this index's: FAISS's 2
    OpenMP threads then wait for a core (p99 in tens of ms).
  d10: mean exact 10th-smallest distance over the queries; dup: the fraction of database codes
    that repeat an earlier code (1 - distinct / N).

Codes (``--codes``), database and queries drawn from numpy seed 0 per (N, L), queries never in the
database:
  random: uniform bits, queries likewise (the hardest case for the approximate kinds: the 10th
    neighbour of a 64-bit query among 1M codes is ~15 bits away and the rest are ~32 bits away).
  clustered: like trained hash codes, which sit near label-combination centres. C = max(1, N // 45)
    centres of uniform random bits; each code takes a uniformly chosen centre and flips each of
    its bits independently with probability p, p drawn per code uniformly from [0, 0.15]; queries
    drawn the same way from the same centres. Calibrated against the default run's codes (64 bits,
    9000 database codes, the synthetic dataset; ``--calibrate`` prints this comparison):
    text query -> database image codes, mean distance to the 1st / 10th nearest (10th: 10th/50th/90th
    percentile) and duplicate fraction of the image database codes:
      trained (python -m scbch_dist.train, defaults):  d1 4.11, d10 5.91 (2 / 5 / 10), dup 0.078
      clustered, N = 9000 (200 centres):               d1 4.35, d10 6.10 (2 / 5 / 10), dup 0.082
    (the trained codes' bits are biased, mean pairwise distance 25.2 against 32 here). N // 45
    keeps 45 codes per centre at every N, so d10 and dup stay those of the calibrated run as N
    grows (printed per table); a fixed number of centres would make large N easier. At 128 bits
    the same p, so distances double.

HNSW at N > 1M: its build time is projected from the 1M build (measured on the first 1M codes if
1M is not in ``--sizes``) as t(1M) * N/1M * log(N)/log(1M); beyond ``--max-build`` seconds it is
skipped and the projection printed instead.

--sweep: at one N and L (``--sweep-size``, ``--sweep-bits``) each approximate kind is built once
with the defaults and searched with several values of its search-time knob (ivf nprobe, hnsw
ef_search, hash hash_flips); prints recall@10 and latency per value, for choosing a trade-off.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import time

import faiss
import numpy as np

from scbch_dist.retrieval import hamming
from scbch_dist.config import IndexSettings

K = 10
WARMUP = 5
PER_CENTRE = 45  # clustered: codes per centre
FLIP_MAX = 0.15  # clustered: per-code flip probability drawn from [0, FLIP_MAX]
SWEEP = {"ivf": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128]),
         "hnsw": ("ef_search", [16, 32, 64, 128, 256, 512]),
         "hash": ("hash_flips", [0, 1, 2, 3, 4])}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_quiet(limit: float, patience: float = 600.0) -> None:
    start = time.time()
    while float(loadavg().split()[0]) > limit and time.time() - start < patience:
        print(f"load average {loadavg()} above {limit}: waiting")
        time.sleep(30)


def others_busy(seconds: float = 1.0) -> float:
    """CPUs kept busy by other processes over ``seconds`` while this one sleeps (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def quiet(limit: float, patience: float) -> float:
    """Wait (up to ``patience`` s) until other processes use under ``limit`` CPUs; what they used last."""
    start = time.time()
    busy = others_busy()
    while busy > limit and time.time() - start < patience:
        time.sleep(4)
        busy = others_busy()
    return busy


def make_codes(kind: str, n: int, nq: int, bits: int, seed: int = 0, chunk: int = 1 << 19):
    """(database (n, bits) bool, queries (nq, bits) bool) as the module docstring says."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((n, bits), dtype=np.float32) < 0.5, rng.random((nq, bits), dtype=np.float32) < 0.5
    centres = rng.random((max(1, n // PER_CENTRE), bits), dtype=np.float32) < 0.5

    def draw(m):
        out = np.empty((m, bits), bool)
        for lo in range(0, m, chunk):
            hi = min(m, lo + chunk)
            p = rng.random((hi - lo, 1), dtype=np.float32) * FLIP_MAX
            out[lo:hi] = centres[rng.integers(0, len(centres), hi - lo)] ^ (rng.random((hi - lo, bits), dtype=np.float32) < p)
        return out

    return draw(n), draw(nq)


def duplicate_fraction(packed: np.ndarray) -> float:
    words = np.zeros(len(packed), np.uint64)
    for j in range(0, packed.shape[1], 8):  # fold 8-byte words; a collision between codes is negligible
        piece = np.zeros((len(packed), 8), np.uint8)
        piece[:, : min(8, packed.shape[1] - j)] = packed[:, j : j + 8]
        words = words * np.uint64(1000003) + piece.view(np.uint64).ravel()
    return 1 - len(np.unique(words)) / len(packed)


def distances_at(packed_db: np.ndarray, packed_q: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Hamming distances of each query to its returned positions; -1 where a position is -1."""
    rows = packed_db[np.maximum(positions, 0)]  # (q, k, bytes)
    d = np.unpackbits(rows ^ packed_q[:, None, :], axis=2).sum(2, dtype=np.int32)
    return np.where(positions < 0, -1, d)


def recall(packed_db, packed_q, positions, exact_kth) -> float:
    d = distances_at(packed_db, packed_q, positions)
    hit = (d >= 0) & (d <= exact_kth[:, None])
    return float(hit.sum(1).mean() / K)


def latencies(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query seconds of hamming.search, one query a call; and the (q, K) positions found."""
    for i in range(min(WARMUP, len(queries))):
        hamming.search(index, queries[i : i + 1], K)
    times = np.empty(len(queries))
    found = np.full((len(queries), K), -1, np.int64)
    for i in range(len(queries)):
        t0 = time.perf_counter()
        _, pos = hamming.search(index, queries[i : i + 1], K)
        times[i] = time.perf_counter() - t0
        found[i, : pos.shape[1]] = pos[0]
    return times, found


def size_mb(index) -> float:
    try:
        return len(faiss.serialize_index_binary(index)) / 1e6
    except Exception:  # noqa: BLE001 - a kind FAISS cannot serialise: no size
        return float("nan")


def knobs(r: hamming.Resolved) -> str:
    return {"flat": "-", "ivf": f"nlist {r.nlist}, nprobe {r.nprobe}",
            "hnsw": f"M {r.hnsw_m}, efC {r.ef_construction}, efS {r.ef_search}",
            "hash": f"{r.hash_tables} x {r.hash_bits} bits, flips {r.hash_flips}"}[r.kind]


def exact_kth(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    flat = hamming.build(db, hamming.resolve(IndexSettings(), "flat", db.shape[1], len(db)))
    d, _ = hamming.search(flat, queries, K)
    return d[:, -1]


def build_timed(db, kind):
    resolved = hamming.resolve(IndexSettings(kind=kind), kind, db.shape[1], len(db))
    t0 = time.perf_counter()
    index = hamming.build(db, resolved)
    return index, resolved, time.perf_counter() - t0


def header(codes, n, bits, nq, kth, dup):
    print(f"\n{codes} codes, N = {n:,}, {bits} bits, {nq} queries, k = {K}; exact d10 mean {kth.mean():.2f}, "
          f"dup {dup:.3f}; load average {loadavg()}")


def run_grid(a) -> None:
    cols = ["kind", "settings", "build s", "size MB", "p50 ms", "p99 ms", "recall@10", "others"]
    hnsw_rate: dict = {}  # (codes, bits) -> seconds for 1M codes
    for codes in a.codes:
        for bits in a.bits:
            for n in a.sizes:
                db, queries = make_codes(codes, n, a.queries, bits)
                packed_db, packed_q = hamming.pack(db), hamming.pack(queries)
                kth = exact_kth(db, queries)
                header(codes, n, bits, a.queries, kth, duplicate_fraction(packed_db))
                print("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|")
                for kind in a.kinds:
                    if kind == "hnsw" and n > 1_000_000:
                        if (codes, bits) not in hnsw_rate:
                            hnsw_rate[(codes, bits)] = build_timed(db[:1_000_000], "hnsw")[2]
                        projected = hnsw_rate[(codes, bits)] * n / 1e6 * math.log(n) / math.log(1e6)
                        if projected > a.max_build:
                            print(f"| hnsw | skipped: build projected {projected:.0f} s from "
                                  f"{hnsw_rate[(codes, bits)]:.0f} s at 1M | | | | | | |")
                            continue
                    busy = quiet(a.max_busy, a.patience)
                    index, resolved, t_build = build_timed(db, kind)
                    if kind == "hnsw" and n == 1_000_000:
                        hnsw_rate[(codes, bits)] = t_build
                    busy = max(busy, quiet(a.max_busy, a.patience))
                    times, found = latencies(index, queries)
                    p50, p99 = np.percentile(times, [50, 99]) * 1e3
                    r = recall(packed_db, packed_q, found, kth)
                    print(f"| {kind} | {knobs(resolved)} | {t_build:.2f} | {size_mb(index):.1f} | {p50:.3f} | "
                          f"{p99:.3f} | {r:.4f} | {busy:.2f} |", flush=True)
                    del index
                del db, queries, packed_db, packed_q


def run_sweep(a) -> None:
    n, bits = a.sweep_size, a.sweep_bits
    for codes in a.codes:
        db, queries = make_codes(codes, n, a.queries, bits)
        packed_db, packed_q = hamming.pack(db), hamming.pack(queries)
        kth = exact_kth(db, queries)
        header(codes, n, bits, a.queries, kth, duplicate_fraction(packed_db))
        flat, _, _ = build_timed(db, "flat")
        quiet(a.max_busy, a.patience)
        times, _ = latencies(flat, queries)
        print(f"flat (exact): p50 {np.percentile(times, 50) * 1e3:.3f} ms, p99 {np.percentile(times, 99) * 1e3:.3f} ms")
        del flat
        print("| kind | build settings | knob | value | p50 ms | p99 ms | recall@10 | others |\n|---|---|---|---|---|---|---|---|")
        for kind in [k for k in a.kinds if k in SWEEP]:
            index, resolved, _ = build_timed(db, kind)
            knob, values = SWEEP[kind]
            for value in values:
                hamming.configure(index, dataclasses.replace(resolved, **{knob: value}))
                busy = quiet(a.max_busy, a.patience)
                times, found = latencies(index, queries)
                p50, p99 = np.percentile(times, [50, 99]) * 1e3
                print(f"| {kind} | {knobs(resolved).rsplit(',', 1)[0]} | {knob} | {value} | {p50:.3f} | {p99:.3f} | "
                      f"{recall(packed_db, packed_q, found, kth):.4f} | {busy:.2f} |", flush=True)
            del index


def calibrate(path: str) -> None:
    z = np.load(path)
    bits = int(z["bits"])
    unpack = lambda key: np.unpackbits(z[key], axis=1, count=bits).astype(bool)  # noqa: E731
    print("| codes | N | d1 mean | d10 mean | d10 p10 / p50 / p90 | dup | mean distance |\n|---|---|---|---|---|---|---|")

    def row(name, queries, db):
        d = np.sort((queries[:, None, :] != db[None, :, :]).sum(-1, dtype=np.int16), 1)
        p = np.percentile(d[:, K - 1], [10, 50, 90])
        print(f"| {name} | {len(db)} | {d[:, 0].mean():.2f} | {d[:, K - 1].mean():.2f} | "
              f"{p[0]:.0f} / {p[1]:.0f} / {p[2]:.0f} | {duplicate_fraction(hamming.pack(db)):.3f} | {d.mean():.1f} |")

    db_img, q_txt = unpack("database_img"), unpack("query_txt")
    row(f"trained, text -> image ({path})", q_txt, db_img)
    db, queries = make_codes("clustered", len(db_img), len(q_txt), bits)
    row("clustered", queries, db)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000, 10_000_000])
    p.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kinds", nargs="+", default=list(hamming.KINDS), choices=hamming.KINDS)
    p.add_argument("--codes", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--max-build", type=float, default=900.0, help="skip HNSW builds projected to take longer (s)")
    p.add_argument("--max-load", type=float, default=2.5, help="wait at the start until the 1-minute load is below")
    p.add_argument("--max-busy", type=float, default=0.3, help="before each build and timing, wait until other "
                   "processes use fewer CPUs than this")
    p.add_argument("--patience", type=float, default=300.0, help="longest wait for --max-busy (s), then measure anyway")
    p.add_argument("--sweep", action="store_true", help="only the knob sweep at --sweep-size, --sweep-bits")
    p.add_argument("--sweep-size", type=int, default=1_000_000)
    p.add_argument("--sweep-bits", type=int, default=64)
    p.add_argument("--calibrate", metavar="CODES_NPZ", help="only compare a run's codes.npz with clustered codes")
    a = p.parse_args()
    faiss.omp_set_num_threads(2)
    if a.calibrate:
        calibrate(a.calibrate)
        return
    wait_quiet(a.max_load)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); load average {loadavg()}")
    print("defaults:", IndexSettings())
    t0 = time.time()
    (run_sweep if a.sweep else run_grid)(a)
    print(f"\ntotal {time.time() - t0:.0f} s; load average {loadavg()}")


if __name__ == "__main__":
    main()

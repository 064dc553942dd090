"""mAP speed at MIRFlickr scale: ours against straightforward per-query loops (float64 references).

    python tests/benchmarks/bench_map.py [--queries 2000] [--database 18015] [--bits 64]

Codes are drawn around label-dependent centres so that rankings carry signal and many ties,
as trained codes do. Prints a table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from scbch_dist import metrics


def make_codes(rng, labels, bits, flip=0.3):
    centres = rng.integers(0, 2, (labels.shape[1], bits))
    score = labels.astype(np.float64) @ (2 * centres - 1)
    codes = (score + rng.normal(size=score.shape) * 0.5 > 0)
    noise = rng.random(codes.shape) < flip
    return np.where(noise, ~codes, codes).astype(np.int8) * 2 - 1


def loop_index_map(qc, dc, ql, dl):
    """Per query: Hamming row, stable sort, AP. float64 throughout."""
    qc, dc = torch.from_numpy(qc).double(), torch.from_numpy(dc).double()
    rel_all = torch.from_numpy(ql).double() @ torch.from_numpy(dl).double().T > 0
    aps = []
    for i in range(len(qc)):
        rel = rel_all[i]
        if rel.sum() == 0:
            continue
        d = 0.5 * (qc.shape[1] - dc @ qc[i])
        order = torch.sort(d, stable=True).indices
        hits = rel[order].double()
        pos = torch.nonzero(hits).squeeze(1).double() + 1
        aps.append((torch.arange(1, len(pos) + 1, dtype=torch.float64) / pos).mean().item())
    return float(np.mean(aps))


def loop_tie_aware_map(qc, dc, ql, dl):
    """Per query, per distance group: average the precision over every position in the group."""
    qc, dc = qc.astype(np.float64), dc.astype(np.float64)
    rel_all = (ql.astype(np.float64) @ dl.astype(np.float64).T) > 0
    aps = []
    for i in range(len(qc)):
        rel = rel_all[i]
        if not rel.any():
            continue
        d = 0.5 * (qc.shape[1] - dc @ qc[i])
        order = np.argsort(d, kind="stable")
        d_sorted, rel_sorted = d[order], rel[order]
        values, starts = np.unique(d_sorted, return_index=True)
        ends = np.r_[starts[1:], len(d)]
        total, nb, rb = 0.0, 0, 0
        for s, e in zip(starts, ends):
            n, r = e - s, int(rel_sorted[s:e].sum())
            if r:
                p = np.arange(1, n + 1)
                before = (p - 1) * (r - 1) / (n - 1) if n > 1 else np.zeros(n)
                total += r / n * np.sum((rb + 1 + before) / (nb + p))
            nb, rb = nb + n, rb + r
        aps.append(total / rel.sum())
    return float(np.mean(aps))


def timed(fn, *args, repeat=1, **kw):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kw)
        best = min(best, time.perf_counter() - t)
    return out, best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--database", type=int, default=18015)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--classes", type=int, default=24)
    a = p.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    ql = (rng.random((a.queries, a.classes)) < 0.15).astype(np.uint8)
    dl = (rng.random((a.database, a.classes)) < 0.15).astype(np.uint8)
    qc, dc = make_codes(rng, ql, a.bits), make_codes(rng, dl, a.bits)

    ref_index, t_loop_index = timed(loop_index_map, qc, dc, ql, dl)
    ref_tie, t_loop_tie = timed(loop_tie_aware_map, qc, dc, ql, dl)
    ours_index, t_index = timed(metrics.mean_average_precision, qc, dc, ql, dl, ties="index", repeat=3)
    ours_tie, t_tie = timed(metrics.mean_average_precision, qc, dc, ql, dl, ties="expected", repeat=3)
    report, t_all = timed(metrics.retrieval_metrics, qc, dc, ql, dl, topk=[1000], repeat=3)

    print(f"mAP@all, {a.queries} queries x {a.database} database x {a.bits} bits, {torch.get_num_threads()} threads")
    print(f"| {'method':<50} | {'seconds':>8} | {'speed-up':>8} | {'mAP':>10} | {'|diff| vs float64 loop':>22} |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 24}|")
    rows = [
        ("per-query loop, index ties (reference)", t_loop_index, 1.0, ref_index, 0.0),
        ("ours, index ties", t_index, t_loop_index / t_index, ours_index, abs(ours_index - ref_index)),
        ("per-query loop, tie-aware (reference)", t_loop_tie, 1.0, ref_tie, 0.0),
        ("ours, tie-aware", t_tie, t_loop_tie / t_tie, ours_tie, abs(ours_tie - ref_tie)),
        ("ours, everything (both mAPs, mAP@1000, PR curve)", t_all, float("nan"), report["map"],
         abs(report["map"] - ref_index)),
    ]
    for name, t, speed, value, diff in rows:
        print(f"| {name:<50} | {t:8.3f} | {speed:8.1f} | {value:10.6f} | {diff:22.2e} |")


if __name__ == "__main__":
    main()

"""torchrun --standalone --nproc_per_node 2 ranked_metrics.py OUT: engine.scoring.ranking_metrics of
``metric_case(q)`` for several query counts (one below the number of ranks, one odd), each rank
scoring its share; the main process saves the summaries to OUT/metrics.json for the test to compare
with one process's metrics.retrieval_metrics. Then the same with the database read from the packed
tables OUT/codes.npy and OUT/labels.npy (``write_tables``) in blocks of ``DISK_CHUNK`` rows by the
streamed kernels (COMPILED_ABOVE 1), to OUT/metrics_disk.json."""

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from scbch_dist import dist as sdist
from scbch_dist import metrics
from scbch_dist.metrics.table import PackedTable
from scbch_dist.engine.scoring import ranking_metrics

QUERY_COUNTS = (1, 2, 77)
TOPK = [5, 300]
DISK_CHUNK = 700


def metric_case(q: int, n: int = 3000, bits: int = 32, classes: int = 70, seed: int = 4):
    """Random codes and labels: ``q`` queries against ``n`` database items (labels of 2 packed words)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (q, bits)).astype(bool), rng.integers(0, 2, (n, bits)).astype(bool),
            rng.random((q, classes)) < 0.05, rng.random((n, classes)) < 0.05)


def write_tables(folder: Path) -> tuple:
    """metric_case's database as packed tables on disk (in blocks of 1000 rows)."""
    _, dc, _, dl = metric_case(1)
    return metrics.write_table(folder / "codes.npy", dc, 1000), metrics.write_table(folder / "labels.npy", dl)


def disk_case(q: int, folder: Path) -> tuple:
    qc, _, ql, _ = metric_case(q)
    return qc, PackedTable.open(folder / "codes.npy"), ql, PackedTable.open(folder / "labels.npy")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    out_dir = Path(sys.argv[1])
    out = {q: ranking_metrics(*metric_case(q), topk=TOPK) for q in QUERY_COUNTS}
    if sdist.is_main():
        out_dir.joinpath("metrics.json").write_text(json.dumps(out))
    metrics.COMPILED_ABOVE = 1
    out = {q: ranking_metrics(*disk_case(q, out_dir), topk=TOPK, db_chunk=DISK_CHUNK) for q in QUERY_COUNTS}
    if sdist.is_main():
        out_dir.joinpath("metrics_disk.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()

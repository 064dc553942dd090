"""Shard loader throughput: the training stream (persistent workers), its first-epoch start-up
cost, and the exactly-once pass.

    python tests/benchmarks/bench_loader.py [--train 10000] [--img-dim 4096] [--txt-dim 1386]
                                            [--epochs 4] [--repeats 3]

Writes a MIRFlickr-shaped dataset (float16 image features, float16 text vectors) to a temporary
folder (so the page cache holds the shards, as it does from the second epoch of a real run), then
for each number of loader workers:
  - persistent: one TrainStream reads ``epochs`` epochs; its first epoch includes starting the
    workers, the later ones reuse them (what the trainer does);
  - restarted: a new TrainStream per epoch, so workers start every epoch (the trainer before
    workers persisted);
  - the exactly-once pass (refresh, evaluation), whose workers start with every pass.
Every measurement is taken ``repeats`` times, the repeats interleaved so that a burst of load
from another job lands on all settings alike; the table gives the median, and the range over the
repeats in brackets. Prints tables; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scbch_dist.data.format import DatasetMeta, write_dataset
from scbch_dist.data.pipeline import TrainStream, pass_batches

WORKERS = (0, 1, 2)


def epoch_seconds(stream: TrainStream, epoch: int) -> tuple[float, int]:
    """Seconds to read one epoch of ``stream`` (start-up of its workers included when they start
    here), and the samples read."""
    t = time.perf_counter()
    seen = sum(len(batch["id"]) for batch in stream.epoch(epoch))
    return time.perf_counter() - t, seen


def persistent_run(root: Path, meta: DatasetMeta, batch: int, workers: int, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` epochs read through one stream (workers started once)."""
    with TrainStream(root=root, meta=meta, batch_size=batch, seed=0, workers=workers) as stream:
        return [epoch_seconds(stream, e)[0] for e in range(epochs)]


def restarted_run(root: Path, meta: DatasetMeta, batch: int, workers: int, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` epochs, each read by a new stream (workers started per epoch)."""
    out = []
    for e in range(epochs):
        with TrainStream(root=root, meta=meta, batch_size=batch, seed=0, workers=workers) as stream:
            out.append(epoch_seconds(stream, e)[0])
    return out


def pass_seconds(root: Path, meta: DatasetMeta, workers: int) -> float:
    """Seconds of one exactly-once pass over the training split (workers started for it)."""
    t = time.perf_counter()
    for _ in pass_batches(root, meta, "train", batch_size=2048, workers=workers):
        pass
    return time.perf_counter() - t


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range in brackets when there is more than one value."""
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--img-dim", type=int, default=4096)
    p.add_argument("--txt-dim", type=int, default=1386)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4, help="epochs per stream (the first one starts the workers)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = a.train
    img = rng.random((n, a.img_dim), dtype=np.float32)
    txt = (rng.random((n, a.txt_dim)) < 0.005).astype(np.float32)
    lab = (rng.random((n, 24)) < 0.15).astype(np.uint8)
    small = (img[:8], txt[:8], lab[:8])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        meta = write_dataset(root, name="bench", classes=[f"c{i}" for i in range(24)],
                             splits={"train": (img, txt, lab), "query": small, "database": small})
        size = sum(f.stat().st_size for f in root.glob("train-*.tar")) / 2**20
        print(f"{n} samples: {a.img_dim}-d float16 image + {a.txt_dim}-d float16 text, "
              f"{len(meta.splits['train'].shards)} shards, {size:.0f} MiB; batch {a.batch}; "
              f"{a.epochs} epochs per stream; median [range] of {a.repeats} repeats")
        for _ in range(2):  # warm-up: page cache, imports, the allocator
            persistent_run(root, meta, a.batch, 0, 1)
        first: dict[int, list[float]] = {w: [] for w in WORKERS}
        later: dict[int, list[float]] = {w: [] for w in WORKERS}
        restarted: dict[int, list[float]] = {w: [] for w in WORKERS}
        passes: dict[int, list[float]] = {w: [] for w in (0, 2)}
        for _ in range(a.repeats):
            for w in WORKERS:
                seconds = persistent_run(root, meta, a.batch, w, a.epochs)
                first[w].append(seconds[0])
                later[w].append(statistics.median(seconds[1:]))
                # a restarted epoch: the median over epochs, each starting its workers
                restarted[w].append(statistics.median(restarted_run(root, meta, a.batch, w, a.epochs)))
            for w in passes:
                passes[w].append(pass_seconds(root, meta, w))

        print(f"\n| {'training stream, workers':<24} | {'first epoch s':>20} | {'later epochs s':>20} | "
              f"{'start-up s':>7} | {'later samples/s':>24} | {'restarted per epoch, samples/s':>30} |")
        print(f"|{'-' * 26}|{'-' * 22}|{'-' * 22}|{'-' * 12}|{'-' * 26}|{'-' * 32}|")
        for w in WORKERS:
            startup = [f - l for f, l in zip(first[w], later[w])]
            print(f"| {w:<24} | {spread(first[w], '.3f'):>20} | {spread(later[w], '.3f'):>20} | "
                  f"{statistics.median(startup):>10.3f} | {spread([n / s for s in later[w]], ',.0f'):>24} | "
                  f"{spread([n / s for s in restarted[w]], ',.0f'):>30} |")
        print(f"\n| {'exactly-once pass, workers':<26} | {'seconds':>20} | {'samples/s':>24} |")
        print(f"|{'-' * 28}|{'-' * 22}|{'-' * 26}|")
        for w, seconds in passes.items():
            print(f"| {w:<26} | {spread(seconds, '.3f'):>20} | {spread([n / s for s in seconds], ',.0f'):>24} |")


if __name__ == "__main__":
    main()

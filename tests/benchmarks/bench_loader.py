"""Shard loader throughput: samples/s of the training stream and the exactly-once pass.

    python tests/benchmarks/bench_loader.py [--train 10000] [--img-dim 4096] [--txt-dim 1386]

Writes a MIRFlickr-shaped dataset (float16 image features, float16 text vectors) to a temporary
folder, then times full epochs (after one warm-up epoch, so the page cache holds the shards, as
it does from the second epoch of a real run). Prints a table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scbch_dist.data.format import write_dataset
from scbch_dist.data.pipeline import TrainStream, pass_batches


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--img-dim", type=int, default=4096)
    p.add_argument("--txt-dim", type=int, default=1386)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
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
              f"{len(meta.splits['train'].shards)} shards, {size:.0f} MiB; batch {a.batch}")
        print(f"| {'reader':<34} | {'workers':>7} | {'samples/s':>10} | {'MiB/s':>7} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 12}|{'-' * 9}|")
        for workers in (0, 1, 2):
            stream = TrainStream(root=root, meta=meta, batch_size=a.batch, seed=0, workers=workers)
            for _ in stream.epoch(0):
                pass
            t = time.perf_counter()
            seen = 0
            for e in range(a.epochs):
                for batch in stream.epoch(e):
                    seen += len(batch["id"])
            rate = seen / (time.perf_counter() - t)
            print(f"| {'training stream (shuffled batches)':<34} | {workers:>7} | {rate:>10.0f} | {rate * size / n:>7.0f} |")
        for workers in (0, 2):
            t = time.perf_counter()
            seen = sum(len(b["id"]) for b in pass_batches(root, meta, "train", batch_size=2048, workers=workers))
            rate = seen / (time.perf_counter() - t)
            print(f"| {'exactly-once pass (refresh/eval)':<34} | {workers:>7} | {rate:>10.0f} | {rate * size / n:>7.0f} |")


if __name__ == "__main__":
    main()

"""Reading shards from a web server against reading them from the folder (docs/data.md, "Datasets
on a server"; docs/benchmarks.md, "Shards over HTTP").

    python tests/benchmarks/bench_http.py [--train 6000] [--images 2000] [--repeats 3] [--epochs 3]

Writes two datasets to a temporary folder, the embedded default's shape (feature shards: 512-d
float16 images, 1000-d uint8 texts) and the shapes dataset's (raw JPEG images and captions), and
serves the folder with a real nginx on 127.0.0.1 (tests/http_server.py; .ci/setup installs it).
For each dataset it reads ``epochs`` epochs of the training stream (one process, data.workers 0,
the default) from the folder, from nginx, and from nginx with data.cache, and prints the samples a
second of each epoch (median over ``repeats``, the range in brackets). The folder's shards sit in
the page cache, as from a real run's second epoch, so the difference is the cost of HTTP and the
per-shard hashing. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the nginx fixture

from http_server import NGINX, Nginx  # noqa: E402
from scbch_dist.config import ShapesConfig, SyntheticConfig  # noqa: E402
from scbch_dist.data.format import read_meta  # noqa: E402
from scbch_dist.data.pipeline import TrainStream  # noqa: E402
from scbch_dist.data.remote import RemoteRoot, Retry, ShardCache  # noqa: E402
from scbch_dist.data.shapes import ensure_shapes  # noqa: E402
from scbch_dist.data.synthetic import ensure_synthetic  # noqa: E402


def epochs_per_second(root, epochs: int, batch: int = 128) -> list[float]:
    """Samples a second of each of ``epochs`` epochs of one training stream over ``root``."""
    meta = read_meta(root)
    out = []
    with TrainStream(root=root, meta=meta, batch_size=batch, seed=0) as stream:
        for e in range(epochs):
            t = time.perf_counter()
            seen = sum(len(b["id"]) for b in stream.epoch(e))
            out.append(seen / (time.perf_counter() - t))
    return out


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=6000, help="training rows of the feature dataset")
    p.add_argument("--images", type=int, default=2000, help="training images of the JPEG dataset")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    if NGINX is None:
        sys.exit("bench_http.py: nginx is not installed (apt-get install nginx-light, as root: .ci/setup does)")
    with tempfile.TemporaryDirectory() as tmp:
        www = Path(tmp) / "www"
        ensure_synthetic(www / "features", SyntheticConfig(n_train=args.train, n_query=max(args.train // 6, 10),
                                                           n_extra_database=max(args.train // 2, 10)))
        ensure_shapes(www / "jpeg", ShapesConfig(n_train=args.images, n_query=max(args.images // 10, 10),
                                                 n_extra_database=max(args.images // 3, 10)))
        server = Nginx(Path(tmp) / "nginx", www).start()
        try:
            rows = []
            for name in ("features", "jpeg"):
                sources = {"folder": lambda: www / name,
                           "nginx": lambda: RemoteRoot(f"{server.url}/{name}", Retry()),
                           "nginx + data.cache": lambda: RemoteRoot(f"{server.url}/{name}", Retry(), cache=ShardCache(
                               tempfile.mkdtemp(dir=tmp), 10**12))}
                measured = {source: [] for source in sources}
                for _ in range(args.repeats):  # interleaved: a burst of other load lands on every source alike
                    for source, root in sources.items():
                        measured[source].append(epochs_per_second(root(), args.epochs))
                size = sum(f.stat().st_size for f in (www / name).glob("train-*.tar")) / 1e6
                for source, runs in measured.items():
                    rows.append((name, f"{size:.1f}", source,
                                 *[cell([run[e] for run in runs]) for e in range(args.epochs)]))
        finally:
            server.stop()
    head = ["dataset", "train MB", "source", *[f"epoch {e + 1} samples/s" for e in range(args.epochs)]]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

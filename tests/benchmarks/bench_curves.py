"""Cost curves: each phase of a training epoch at growing N, how each grows, and a projection to
100M rows on 8 and 64 GPUs. Prints tables; asserts nothing about speed.

    python tests/benchmarks/bench_curves.py [--sizes 10000 100000 1000000] [--img-dim 128] [--txt-dim 128]
                                            [--plot docs/img/cost_curves.png] [--json /tmp/curves.json]
    python tests/benchmarks/bench_curves.py --json /tmp/curves.json --only torch-ivf   # re-measure some phases
    python tests/benchmarks/bench_curves.py --from-json /tmp/curves.json   # tables and plot again, no measuring

Phases, in seconds per epoch at N training rows, 64 bits (bank rows [u, v] of 2L = 128 dims):
  loader: the faster of the second and third epochs (page cache warm) of the training stream
    (TrainStream, batches of 128, data.workers 0) over N samples of feature shards written with
    data.format.write_dataset to a temporary folder (``--tmp``, removed after):
    ``--img-dim``-d float16 image + ``--txt-dim``-d float16 text features (128 + 128 by default,
    about 0.5 GB at a million rows).
  training steps: the real engine train_step (SCBCH, batch 128, width 1024, MIRFlickr-shaped
    4096-d image + 1386-d text inputs, 1 process), the best of 3 rounds of ``--steps`` steps. A
    step's cost does not depend on N (its loss is over the global batch), so an epoch's steps cost
    ceil(N/128) steps: derived, not timed at each N.
  refresh, torch / faiss-cpu: the exact CSCC neighbour search (k = 20, self entry at 0) of every row
    of a bank of N unit rows (random Gaussian, normalised); where that takes minutes a slice of the
    queries is timed and scaled to N (exact search is linear in the queries), as
    bench_scale.py refresh does.
  refresh, faiss-ivf / torch-ivf: the approximate backends with their defaults over the whole bank
    (index build + search of every row, as a refresh does).
  evaluation: every metric (metrics.retrieval_metrics, both directions) for 2000 queries against a
    database of N codes, as bench_scale.py eval does.
  encode pass (derived, not timed): reading N rows (the loader's rate) plus a forward of N rows,
    taken as a third of a training step per 128 rows; what a refresh with bank.refresh: pass and an
    evaluation's database encoding cost.
Fit: the least-squares slope of log(seconds) against log(N) over the sizes.
Projection: a 100M-row epoch on 8 and 64 GPUs from the per-row costs measured here and the
assumptions printed with it (docs/benchmarks.md, "Cost curves").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

from scbch_dist.knn import backends as knn_mod  # noqa: E402
from scbch_dist import metrics  # noqa: E402
from scbch_dist.config import load_config  # noqa: E402
from scbch_dist.data.format import write_dataset  # noqa: E402
from scbch_dist.data.pipeline import TrainStream  # noqa: E402
from scbch_dist.engine.loop import train_step  # noqa: E402
from scbch_dist.engine.setup import make_optimizer  # noqa: E402
from scbch_dist.knn import KnnSettings, auto_nlist, faiss_available, neighbours  # noqa: E402
from scbch_dist.methods import SCBCH, Step, TrainingSet  # noqa: E402
from scbch_dist.models import SCBCHModel  # noqa: E402

BITS = 64
DIMS = 2 * BITS  # bank rows [u, v]
K = 20  # CSCC neighbours
BATCH = 128
HIDDEN = 1024
STEP_IMG, STEP_TXT = 4096, 1386  # the training step's inputs (MIRFlickr features, as bench_scale steps)
QUERIES = 2000  # evaluation queries

# Projection assumptions (printed with the projection; sources in docs/benchmarks.md, "Cost curves")
TARGET_N = 100_000_000
GPUS = (8, 64)
GPU_FLOPS = 25e12  # effective float32 FLOP/s of a brute-force search on one H100/H200 (assumed; docs/benchmarks.md)
GPU_SAMPLES = 20_000  # training samples/s per GPU, batch 128 per GPU, width 1024, 64 bits (assumed)
FORWARD_RATIO = 3  # a forward costs a third of a training step (forward + backward + optimizer)
LOADER_WORKERS = 8  # loader workers per GPU process, each reading at the rate measured here
LINK_BYTES = 25e9  # bytes/s each rank receives over the interconnect (InfiniBand-class)
LIST_OVERHEAD = 1e-4  # seconds of kernel launches per inverted list searched by torch-ivf on a GPU

PHASES = [  # key, label, how it was obtained
    ("loader", "loader (training stream, cache warm)", "measured"),
    ("steps", "training steps (N/128 x step)", "derived"),
    ("refresh_torch", "refresh: torch exact", "measured"),
    ("refresh_faiss-cpu", "refresh: faiss-cpu exact", "measured"),
    ("refresh_faiss-ivf", "refresh: faiss-ivf", "measured"),
    ("refresh_torch-ivf", "refresh: torch-ivf", "measured"),
    ("eval", "evaluation metrics (2000 queries)", "measured"),
    ("encode", "encode pass (derived)", "derived"),
]


def bank_rows(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, DIMS, generator=g), dim=1)


# ---------------------------------------------------------------------------------------- loader

def measure_loader(n: int, img_dim: int, txt_dim: int, tmp: str) -> dict:
    """Seconds of a warm epoch of the training stream over n samples, and the shard bytes."""
    rng = np.random.default_rng(0)
    img = rng.random((n, img_dim), dtype=np.float32).astype(np.float16)
    txt = (rng.random((n, txt_dim), dtype=np.float32) < 0.05).astype(np.float16)
    lab = (rng.random((n, 24), dtype=np.float32) < 0.15).astype(np.uint8)
    lab[np.arange(n), rng.integers(24, size=n)] = 1
    small = (img[:8], txt[:8], lab[:8])
    with tempfile.TemporaryDirectory(dir=tmp, prefix="bench_curves_") as folder:
        root = Path(folder) / "data"
        t = time.perf_counter()
        meta = write_dataset(root, name="curves", classes=[f"c{i}" for i in range(24)],
                             splits={"train": (img, txt, lab), "query": small, "database": small})
        written = time.perf_counter() - t
        del img, txt
        size = sum(f.stat().st_size for f in root.glob("train-*.tar"))
        epochs = []
        with TrainStream(root=root, meta=meta, batch_size=BATCH, seed=0, workers=0) as stream:
            for e in range(3):
                t = time.perf_counter()
                seen = sum(len(b["id"]) for b in stream.epoch(e))
                epochs.append(time.perf_counter() - t)
    if seen != n:
        raise RuntimeError(f"an epoch read {seen} samples of {n}")
    # the first epoch warms the page cache and the allocator; the faster of the next two, since
    # other jobs on the machine can only slow an epoch down
    return {"seconds": min(epochs[1:]), "epochs_s": epochs, "bytes": size, "write_s": written}


# ---------------------------------------------------------------------------------- training step

def measure_step(steps: int, rounds: int = 3) -> float:
    """Seconds per training step: bench_scale's STEP_WORKER, in this process (1 process); the best
    of ``rounds`` rounds of ``steps`` steps (other jobs on the machine can only slow a round down)."""
    acc = Accelerator(cpu=True)
    cfg = load_config(None, [f"model.hidden={HIDDEN}"])
    torch.manual_seed(0)
    model = SCBCHModel(STEP_IMG, STEP_TXT, BITS, HIDDEN, 24)
    opt = make_optimizer(model, cfg, acc.device)
    model, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(0)
    data = {"img": torch.randn(BATCH, STEP_IMG, generator=g),
            "txt": (torch.rand(BATCH, STEP_TXT, generator=g) < 0.01).float()}
    lab = (torch.rand(BATCH, 24, generator=g) < 0.2).to(torch.uint8)
    method = SCBCH(cfg, TrainingSet(BATCH, 24, lab, None, acc.device))
    step = Step(0, torch.arange(BATCH), lab)
    for _ in range(3):
        train_step(model, opt, acc, data, method, step)
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, acc, data, method, step)
        best = min(best, (time.perf_counter() - t) / steps)
    return best


# ---------------------------------------------------------------------------------------- refresh

def measure_exact(bank: torch.Tensor, backend: str, budget_pairs: float = 2e9) -> dict:
    """Seconds of an exact refresh of every row: a slice of q queries timed and scaled by N / q."""
    n = bank.shape[0]
    q = min(n, max(1000, int(budget_pairs // n)))
    # torch in blocks of at most 2^28 similarities (1 GiB); faiss-cpu in one call (it blocks the
    # queries itself, and each call copies the bank into a new index)
    block = max(1, min(q, (1 << 28) // n)) if backend == "torch" else q
    t = time.perf_counter()
    for start in range(0, q, block):
        stop = min(q, start + block)
        neighbours(bank[start:stop], bank, K, self_index=torch.arange(start, stop), settings=KnnSettings(knn=backend))
    return {"seconds": (time.perf_counter() - t) * n / q, "queries_timed": q}


@contextmanager
def recording_ivf():
    """Records what torch_ivf computes on its way (its k-means centroids, the two groupings by list
    and the lists each list's queries scan), to count the candidate pairs it scanned. Restores the
    module on exit."""
    names = {"kmeans_ip": "centroids", "_grouped": "grouped", "probe_lists": "probe"}
    seen: dict = {key: [] for key in names.values()}
    originals = {name: getattr(knn_mod, name) for name in names if hasattr(knn_mod, name)}

    def recorder(name):
        def call(*a, **kw):
            out = originals[name](*a, **kw)
            seen[names[name]].append(out)
            return out
        return call

    for name in originals:
        setattr(knn_mod, name, recorder(name))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(knn_mod, name, fn)


def ivf_nlist(n: int, settings: KnnSettings) -> int:
    """The lists torch-ivf makes for a bank of n rows: a power of two near sqrt(n) (auto_nlist's
    per_sqrt=1), or 4 sqrt(n) where auto_nlist predates that argument."""
    if settings.nlist:
        return min(settings.nlist, n)
    try:
        return min(auto_nlist(n, per_sqrt=1.0), n)
    except TypeError:
        return min(auto_nlist(n), n)


def ivf_work(n: int, settings: KnnSettings, seen: dict | None) -> dict:
    """Candidate pairs torch-ivf scanned over a bank of n rows searched by itself, and its
    multiply-adds per bank dimension (pairs + k-means + assigning the rows to lists). From what
    ``recording_ivf`` saw; if it saw something else, the pairs are estimated for lists of equal size."""
    nlist = ivf_nlist(n, settings)
    pairs, how = None, "estimated (equal lists)"
    if seen and len(seen["centroids"]) == 1 and len(seen["grouped"]) >= 1:
        centroids = seen["centroids"][0]
        nlist = centroids.shape[0]  # what the search made, whatever the rule
        sizes = torch.diff(seen["grouped"][0][1]).double()
        asks = torch.diff(seen["grouped"][-1][1]).double()
        if len(seen["probe"]) == 1:  # the lists each list's queries scan (probe_lists)
            probe = seen["probe"][0].cpu()
        else:  # the lists nearest to each list's centroid
            probe = torch.topk(centroids @ centroids.T, min(settings.nprobe, nlist), dim=1).indices.cpu()
        if sizes.numel() == nlist and asks.numel() == nlist and probe.shape[0] == nlist:
            pairs, how = float((asks * sizes[probe].sum(1)).sum()), "counted"
    train = min(n, max(settings.train_rows, 39 * nlist))
    nprobe = min(settings.nprobe, nlist)
    uniform = n * n * nprobe / nlist
    pairs = uniform if pairs is None else pairs
    macs = pairs + 10 * train * nlist + n * nlist  # per bank dimension; the k-means runs 10 iterations
    return {"pairs": pairs, "pairs_how": how, "imbalance": pairs / uniform, "macs_per_dim": macs,
            "nlist": nlist, "nprobe": nprobe}


def torch_ivf(bank: torch.Tensor, settings: KnnSettings):
    return neighbours(bank, bank, K, self_index=torch.arange(bank.shape[0]), settings=settings)


def measure_approx(bank: torch.Tensor, backend: str) -> dict:
    """Seconds of an approximate refresh over the whole bank (build + search of every row)."""
    settings = KnnSettings(knn=backend)
    n = bank.shape[0]
    if backend == "torch-ivf":
        before = cpu_matmul_flops()  # the matmul rate beside the search: other jobs move both
        with recording_ivf() as seen:
            t = time.perf_counter()
            torch_ivf(bank, settings)
            seconds = time.perf_counter() - t
        return {"seconds": seconds, "cpu_flops": max(before, cpu_matmul_flops()), **ivf_work(n, settings, seen)}
    t = time.perf_counter()
    neighbours(bank, bank, K, self_index=torch.arange(n), settings=settings)
    return {"seconds": time.perf_counter() - t}


def cpu_matmul_flops(repeats: int = 10) -> float:
    """Float32 FLOP/s of this machine's matrix product at torch-ivf's block shapes (a list's
    queries against its candidates), into a preallocated output (a fresh 128 MiB output costs
    page faults comparable to the product): the best of ``repeats``, since other jobs on the
    machine can only slow a product down."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, DIMS, generator=g), torch.randn(DIMS, 16384, generator=g)
    out = torch.empty(a.shape[0], b.shape[1])
    torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] * DIMS * b.shape[1] / best


# ------------------------------------------------------------------------------------- evaluation

def measure_eval(n: int, classes: int = 24) -> float:
    rng = np.random.default_rng(0)
    ql = rng.random((QUERIES, classes)) < 0.15
    qc = rng.integers(0, 2, (QUERIES, BITS), dtype=np.uint8)
    dl = rng.random((n, classes)) < 0.15
    dc = rng.integers(0, 2, (n, BITS), dtype=np.uint8)
    t = time.perf_counter()
    for _ in range(2):  # I2T and T2I
        metrics.retrieval_metrics(qc, dc, ql, dl, topk=[1000])
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------ measuring all

MEASURED = ("step", "loader", "torch", "faiss-cpu", "faiss-ivf", "torch-ivf", "eval")


def measure(sizes: list[int], a, res: dict | None = None, only: tuple[str, ...] = MEASURED) -> dict:
    """Measures the phases in ``only`` at each of ``sizes`` into ``res`` (a new record, or one read
    back from --json to re-measure some phases), then derives the steps and encode rows."""
    if res is None:
        res = {"sizes": sizes, "img_dim": a.img_dim, "txt_dim": a.txt_dim, "phases": {}, "detail": {}}
    if res["sizes"] != sizes:
        raise SystemExit(f"--sizes {sizes} differ from the record's {res['sizes']}")
    res.update(threads=torch.get_num_threads(), load_start=os.getloadavg())
    backends = [b for b in ("torch", "faiss-cpu", "faiss-ivf", "torch-ivf")
                if b in only and (faiss_available() or not b.startswith("faiss"))]
    if "step" in only:
        t = time.perf_counter()
        res["step_s"] = measure_step(a.steps)
        print(f"training step: {res['step_s'] * 1e3:.1f} ms ({BATCH / res['step_s']:,.0f} samples/s), "
              f"{time.perf_counter() - t:.0f} s to measure; load {os.getloadavg()[0]:.2f}", flush=True)
    if "torch-ivf" in only or "cpu_flops" not in res:
        res["cpu_flops"] = cpu_matmul_flops()
        print(f"float32 matmul (2048 x {DIMS} @ {DIMS} x 16384): {res['cpu_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    phases = res["phases"]
    for i, n in enumerate(sizes):
        d = res["detail"].setdefault(str(n), {})

        def put(key: str, seconds: float) -> None:
            phases.setdefault(key, [None] * len(sizes))[i] = seconds

        if "loader" in only:
            ld = d["loader"] = measure_loader(n, a.img_dim, a.txt_dim, a.tmp)
            put("loader", ld["seconds"])
            print(f"N={n:,}: loader {ld['seconds']:.2f} s ({ld['bytes'] / 2**20:.0f} MiB, written in "
                  f"{ld['write_s']:.0f} s); load {os.getloadavg()[0]:.2f}", flush=True)
        bank = bank_rows(n) if backends else None
        for backend in backends:
            r = measure_exact(bank, backend) if backend in ("torch", "faiss-cpu") else measure_approx(bank, backend)
            d[backend] = r
            put(f"refresh_{backend}", r["seconds"])
            extra = f", {r['queries_timed']} queries timed" if "queries_timed" in r else ""
            if "pairs" in r:
                extra = (f", {r['nlist']} lists, nprobe {r['nprobe']}: {r['pairs']:.3g} candidate pairs "
                         f"({r['pairs_how']}, {r['imbalance']:.2f}x equal lists)")
            print(f"N={n:,}: refresh {backend} {r['seconds']:.2f} s{extra}; load {os.getloadavg()[0]:.2f}", flush=True)
        del bank
        if "eval" in only:
            put("eval", measure_eval(n))
            print(f"N={n:,}: evaluation {phases['eval'][i]:.2f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    if "step_s" in res:
        phases["steps"] = [math.ceil(n / BATCH) * res["step_s"] for n in sizes]
        if "loader" in phases:
            phases["encode"] = [ld + n / BATCH * res["step_s"] / FORWARD_RATIO
                                for ld, n in zip(phases["loader"], sizes)]
    res["load_end"] = os.getloadavg()
    res.setdefault("runs", []).append({"only": list(only), "load_start": res["load_start"], "load_end": res["load_end"],
                                       "at": time.strftime("%Y-%m-%d %H:%M")})
    return res


# ------------------------------------------------------------------------------------ fit, tables

def exponent(sizes, seconds) -> float:
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def growth(e: float) -> str:
    """The nearest of the usual growth laws. Over 10k-1M rows N log N fits an exponent of about
    1.09 (log N grows 1.5x over the two decades); IVF with about 4 sqrt(N) lists scans N^1.5 pairs."""
    if e < 0.85:
        return "below N (fixed costs dominate)"
    if e < 1.05:
        return "N"
    if e < 1.25:
        return "N log N"
    if e < 1.75:
        return "N^1.5"
    return "N^2"


def fmt_s(x: float) -> str:
    if x < 10:
        return f"{x:.2f}"
    if x < 100:
        return f"{x:.1f}"
    return f"{x:,.0f}"


def print_table(res: dict) -> dict:
    sizes = res["sizes"]
    fits = {}
    print(f"\nseconds per epoch at N rows ({res['img_dim']}-d + {res['txt_dim']}-d float16 features read; "
          f"{BITS} bits; {res['threads']} threads)\n")
    print("| phase | " + " | ".join(f"{n:,}" for n in sizes) + " | exponent | growth |")
    print("| --- |" + " --- |" * len(sizes) + " --- | --- |")
    for key, label, _ in PHASES:
        if None in res["phases"].get(key, [None]):
            continue
        secs = res["phases"][key]
        e = exponent(sizes, secs) if len(sizes) > 1 else float("nan")
        fits[key] = e
        print(f"| {label} | " + " | ".join(fmt_s(s) for s in secs) + f" | {e:.2f} | {growth(e)} |")
    return fits


def plot(res: dict, path: Path) -> None:
    sizes = np.asarray(res["sizes"], dtype=float)
    fig, ax = plt.subplots(figsize=(9, 4.6))
    markers = "osD^v<>p"
    for (key, label, how), marker in zip(PHASES, markers):
        if None in res["phases"].get(key, [None]):
            continue
        ax.plot(sizes, res["phases"][key], marker=marker, ls="--" if how == "derived" else "-", label=label)
    # guides: proportional to N and to N^2 through the smallest torch refresh
    anchor = res["phases"].get("refresh_torch", [1.0])[0]
    ax.plot(sizes, anchor * sizes / sizes[0], color="gray", ls=":", lw=1, label="∝ N (guide)")
    ax.plot(sizes, anchor * (sizes / sizes[0]) ** 2, color="black", ls=":", lw=1, label="∝ N² (guide)")
    ax.set(xscale="log", yscale="log", xlabel="training rows N", ylabel="seconds per epoch",
           title=f"Cost per epoch by phase ({BITS} bits, {res['threads']} CPU threads)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    # a 64-colour palette keeps the PNG small
    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)
    print(f"\nplot: {path} ({path.stat().st_size / 1024:.0f} KiB)")


# ------------------------------------------------------------------------------------- projection

def project(res: dict) -> None:
    n = TARGET_N
    last = str(res["sizes"][-1])
    d = res["detail"][last]
    if "loader" not in d or "step_s" not in res or None in res["phases"].get("eval", [None]):
        print("\nno projection: it needs the loader, step and eval measurements")
        return
    n_meas = int(last)
    loader_rate = n_meas / d["loader"]["seconds"]  # samples/s of one reader (this machine's CPU)
    eval_per_row = res["phases"]["eval"][-1] / n_meas
    ivf = d.get("torch-ivf")
    settings = KnnSettings()
    row_bytes = DIMS * 2  # float16 bank rows (knn takes a float16 bank; the engine's float32 doubles this)
    top_bytes = (K + 1) * (4 + 8)  # a query's running top-(k+1): float32 similarities, int64 ids
    if ivf:
        # torch-ivf's fraction of this CPU's matmul rate, assumed the same on a GPU
        cpu_flops = ivf.get("cpu_flops", res["cpu_flops"])
        ivf_eff = 2 * DIMS * ivf["macs_per_dim"] / ivf["seconds"] / cpu_flops

    def ivf_seconds(bank: int, queries: int, searches: int, own: bool) -> float:
        """torch-ivf on a GPU: ``searches`` indexes over ``bank`` rows, each searched by ``queries``."""
        nlist = ivf_nlist(bank, settings)
        train = min(bank, max(settings.train_rows, 39 * nlist))
        nprobe = min(settings.nprobe, nlist)
        pairs = ivf["imbalance"] * queries * bank * nprobe / nlist
        macs = pairs + 10 * train * nlist + bank * nlist + (0 if own else queries * nlist)
        return searches * (2 * DIMS * macs / (ivf_eff * GPU_FLOPS) + nlist * LIST_OVERHEAD)

    rows: list[tuple[str, list[float]]] = []
    for w in GPUS:
        part = n / w
        cols = {
            "loader": part / (loader_rate * LOADER_WORKERS),
            "steps": part / GPU_SAMPLES,
            "encode": part / (loader_rate * LOADER_WORKERS) + part / (GPU_SAMPLES * FORWARD_RATIO),
            "exact": n * part * DIMS * 2 / GPU_FLOPS,
            "ring": (w - 1) / w * n * (row_bytes + top_bytes) / LINK_BYTES,
            "gather": (w - 1) / w * n * row_bytes / LINK_BYTES,
            "eval": eval_per_row * n,
        }
        if ivf:
            cols["ivf_shard"] = ivf_seconds(int(part), int(part), w, own=False)
            cols["ivf_gather"] = ivf_seconds(n, int(part), 1, own=True)
        base = cols["loader"] + cols["steps"] + cols["encode"]
        cols["total_exact"] = base + cols["exact"] + cols["ring"]
        if ivf:
            cols["total_ivf_shard"] = base + cols["ivf_shard"] + cols["ring"]
            cols["total_ivf_gather"] = base + cols["ivf_gather"] + cols["gather"]
        rows.append((w, cols))

    labels = [
        ("loader", "loader (reading N/W rows per rank)"),
        ("steps", "training steps"),
        ("encode", "refresh encode pass (bank.refresh: pass)"),
        ("exact", "refresh search, exact (faiss-gpu brute force, sharded ring)"),
        ("ring", "ring traffic of the sharded search"),
        ("ivf_shard", "refresh search, torch-ivf on GPU, sharded (an index per shard at each stop)"),
        ("ivf_gather", "refresh search, torch-ivf on GPU, gathered bank (one index over N per rank)"),
        ("gather", "bank gather (gathered refresh)"),
        ("total_exact", "**epoch, exact refresh (sharded)**"),
        ("total_ivf_shard", "**epoch, torch-ivf refresh (sharded)**"),
        ("total_ivf_gather", "**epoch, torch-ivf refresh (gathered bank)**"),
        ("eval", "one evaluation's metrics (main process CPU, 2 threads; every eval.every epochs)"),
    ]
    print(f"\nprojection: one epoch at {n:,} rows (seconds; minutes in brackets)\n")
    print(f"| {n // 1_000_000}M rows | " + " | ".join(f"{w} GPUs" for w in GPUS) + " |")
    print("| --- |" + " --- |" * len(GPUS))
    for key, label in labels:
        if key not in rows[0][1]:
            continue
        cells = []
        for _, cols in rows:
            s = cols[key]
            cells.append(f"{fmt_s(s)} s ({s / 60:,.1f} min)" if s >= 60 else f"{fmt_s(s)} s")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nassumptions:")
    print(f"- GPU float32 brute-force search at {GPU_FLOPS / 1e12:.0f} TFLOP/s effective per H100/H200 "
          "(N^2/W x 2L x 2 flops per rank)")
    print(f"- training: {GPU_SAMPLES:,} samples/s per GPU (batch {BATCH} per GPU, width {HIDDEN}, {BITS} bits, "
          f"{STEP_IMG}+{STEP_TXT}-d inputs); a forward at {FORWARD_RATIO}x that rate; measured here on the CPU: "
          f"{BATCH / res['step_s']:,.0f} samples/s")
    print(f"- loader: {LOADER_WORKERS} workers per GPU process, each at the {loader_rate:,.0f} samples/s measured "
          f"here with {res['img_dim']}+{res['txt_dim']}-d float16 features "
          f"({loader_rate * (res['img_dim'] + res['txt_dim']) * 2 / 2**20:,.0f} MiB/s)")
    print(f"- interconnect: {LINK_BYTES / 1e9:.0f} GB/s received per rank; bank rows float16 "
          f"({row_bytes} bytes), the ring also carries each query's top-(k+1) ({top_bytes} bytes)")
    if ivf:
        print(f"- torch-ivf: {ivf['seconds']:.0f} s at {n_meas:,} rows ({ivf['nlist']} lists, "
              f"nprobe {ivf['nprobe']}) = {ivf['pairs']:.3g} candidate pairs "
              f"({ivf['pairs_how']}, {ivf['imbalance']:.2f}x equal lists) + k-means and list assignment: "
              f"{2 * DIMS * ivf['macs_per_dim'] / ivf['seconds'] / 1e9:.1f} GFLOP/s, "
              f"{ivf['seconds'] / ivf['pairs'] * 1e9:.2f} ns per candidate pair, {ivf_eff:.0%} of this CPU's "
              f"{cpu_flops / 1e9:.0f} GFLOP/s matmul (the best measured beside it); on a GPU the same fraction of "
              f"{GPU_FLOPS / 1e12:.0f} TFLOP/s (CPU->GPU ratio {GPU_FLOPS / cpu_flops:,.0f}x), plus "
              f"{LIST_OVERHEAD * 1e3:.1f} ms of launches per list; lists as unbalanced as measured here; "
              f"nprobe {settings.nprobe} of "
              f"{ivf_nlist(n, settings)} lists over the gathered bank, of "
              + ", ".join(f"{ivf_nlist(n // w, settings)} over a {w}-way shard" for w in GPUS))
    print(f"- evaluation metrics per database row as measured at {n_meas:,} rows ({eval_per_row * 1e6:.1f} us), "
          "computed once on the main process; the database encoding costs about the encode pass")
    print("- phases summed, no overlap (an upper bound: loader workers overlap the steps)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--img-dim", type=int, default=128)
    p.add_argument("--txt-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the shards are written (removed after)")
    p.add_argument("--plot", type=Path, default=Path("docs/img/cost_curves.png"))
    p.add_argument("--json", type=Path, help="write the measurements here")
    p.add_argument("--from-json", type=Path, help="no measuring: tables, plot and projection from this file")
    p.add_argument("--only", nargs="+", choices=MEASURED, default=list(MEASURED),
                   help="measure these phases only; with --json naming an existing record, the others are kept")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.from_json:
        res = json.loads(a.from_json.read_text())
    else:
        only = tuple(a.only)
        old = json.loads(a.json.read_text()) if a.json and a.json.exists() and only != MEASURED else None
        res = measure(sorted(a.sizes), a, old, only)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    for run in res.get("runs", [res]):
        print(f"measured {', '.join(run.get('only', MEASURED))}{' at ' + run['at'] if 'at' in run else ''}: "
              f"load average (1, 5, 15 min) {tuple(round(x, 2) for x in run['load_start'])} at the start, "
              f"{tuple(round(x, 2) for x in run['load_end'])} at the end")
    print_table(res)
    plot(res, a.plot)
    project(res)


if __name__ == "__main__":
    main()

"""Scale-out benchmarks. Prints tables; asserts nothing.

    python tests/benchmarks/bench_scale.py refresh [--sizes 10000 100000 1000000] [--bits 64 128]
    python tests/benchmarks/bench_scale.py quality [--sizes 100000 1000000] [--bits 64] [--backends ...]
                                                   [--bank trained-like|labelled] [--float16] [--nprobe 32]
    python tests/benchmarks/bench_scale.py memory  [--sizes 1000000] [--bits 128] [--backends auto]
    python tests/benchmarks/bench_scale.py eval    [--sizes 18015 100000 1000000]
    python tests/benchmarks/bench_scale.py eval-ranks [--sizes 100000 1000000] [--queries 2000] [--disk DIR]
                                                      [--layouts 1x1 1x2 2x1]
    python tests/benchmarks/bench_scale.py paths   [--sizes 1000000] [--queries 200]
    python tests/benchmarks/bench_scale.py steps   [--hidden 1024] [--batch 128] [--steps 30]

refresh: the CSCC neighbour search (k = 20, self entry at 0) over a bank of N rows of [u, v]
  (2L dims), per backend. Brute force costs N^2; for banks where that takes minutes, a slice of
  the queries is timed and scaled to N (exact for brute force, which is linear in the queries).
quality: each approximate backend over the whole bank (index build + search of every row, as a
  refresh does), against the exact neighbours of 2000 sampled rows: recall@20, the error of the
  CSCC weights and of NACD's reconstructed confidences computed from the approximate neighbours
  (mean and max |approx - exact|), and the refresh's peak memory above the bank itself (the
  process's high-water mark, reset before the search).
  Banks: ``trained-like`` (default), the embedded dataset's label model (topics, co-occurrence) with
  [u, v] halves tanh(y P + noise / 2), calibrated so that IVF finds its neighbours no more easily
  than in the bank of the trained default model (docs/benchmarks.md); ``labelled``: independent
  labels and rows tanh(y P / 2 + noise), a harder bank than any trained model's.
memory: the peak memory of one refresh as the engine makes it with the defaults (the bank's dtype
  from bank.float16_above, bank.knn from --backends, one process searching every row) over a random
  unit bank: the process's high-water mark, reset once the bank is built.
eval: every metric (both mAPs, mAP@1000, P@1000, PR curves) for 2000 queries against databases
  of N codes, both directions.
eval-ranks: the same through engine.scoring.ranking_metrics, one process on 1 and 2 threads and
  two gloo processes of one thread each (each scores half the queries), with whether the numbers
  are identical.
paths: each index-tie ranking path of metrics.score_queries on one thread (numpy and the kernel in
  one block, numpy blocks and the streamed kernels in blocks of a quarter of the database, torch on
  the CPU), every metric with topk [1000]: seconds and nanoseconds a (query, item) pair, and the
  mean AP@all of each (the paths' sums agree to rounding).
steps: training steps/s of 1 process (2 threads) and 2 processes (gloo, 1 thread each) at the same
  global batch, through the real train_step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from scbch_dist import metrics
from scbch_dist.config import SyntheticConfig, load_config
from scbch_dist.data.synthetic import generate_arrays
from scbch_dist import knn
from scbch_dist.knn import KnnSettings, exact_topk, faiss_available
from scbch_dist.losses import confidence_from_neighbors, weights_from_neighbors
from scbch_dist.methods.base import Bank, neighbours


def bench_refresh(sizes, bits_list, budget_pairs=2e9):
    backends = ["torch"] + (["faiss-cpu"] if faiss_available() else []) + \
        (["faiss-gpu"] if faiss_available(gpu=True) else [])
    print(f"| {'bank rows':>10} | {'bits':>4} | {'backend':<9} | {'queries timed':>13} | {'refresh search (s)':>18} |")
    print(f"|{'-' * 12}|{'-' * 6}|{'-' * 11}|{'-' * 15}|{'-' * 20}|")
    for n in sizes:
        for bits in bits_list:
            g = torch.Generator().manual_seed(0)
            bank = F.normalize(torch.randn(n, 2 * bits, generator=g), dim=1)
            q = min(n, max(1000, int(budget_pairs // n)))
            for backend in backends:
                dev = torch.device("cuda" if backend == "faiss-gpu" else "cpu")
                b = bank.to(dev)
                t = time.perf_counter()
                knn.neighbours(b[:q], b, 20, self_index=torch.arange(q, device=dev), settings=KnnSettings(knn=backend))
                seconds = (time.perf_counter() - t) * n / q
                print(f"| {n:>10} | {bits:>4} | {backend:<9} | {q:>13} | {seconds:>18.2f} |")


def labelled_bank(n: int, bits: int, classes: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2 bits) unit rows that follow (n, classes) multi-hot labels, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, classes), dtype=np.float32) < 0.12
    labels[np.arange(n), rng.integers(classes, size=n)] = True
    proj = rng.standard_normal((classes, 2 * bits), dtype=np.float32)
    z = np.tanh(labels.astype(np.float32) @ proj / 2 + rng.standard_normal((n, 2 * bits), dtype=np.float32))
    return F.normalize(torch.from_numpy(z), dim=1), torch.from_numpy(labels.astype(np.uint8))


def trained_like_bank(n: int, bits: int, noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2 bits) rows [u, v] (each half unit, as losses.cscc_bank_rows) and (n, 24) labels: the
    embedded dataset's labels, each half tanh(y P + noise * e) normalised, P random per half."""
    labels = generate_arrays(SyntheticConfig(seed=seed, n_query=0, n_train=n, n_extra_database=0,
                                             img_dim=4, txt_dim=48))["lab"]
    rng = np.random.default_rng(seed)
    y = labels.astype(np.float32)
    halves = []
    for _ in range(2):
        proj = rng.standard_normal((y.shape[1], bits), dtype=np.float32)
        h = np.tanh(y @ proj + noise * rng.standard_normal((n, bits), dtype=np.float32))
        halves.append(F.normalize(torch.from_numpy(h), dim=1))
    return torch.cat(halves, 1), torch.from_numpy(labels)


BANKS = {"trained-like": trained_like_bank, "labelled": labelled_bank}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_memory() -> int:
    """Resets the process's resident high-water mark (Linux); returns the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def bench_quality(sizes, bits_list, backends, k=20, sample=2000, settings=KnnSettings(), bank="trained-like",
                  float16=False):
    print(f"{bank} bank, {'float16' if float16 else 'float32'} rows, nprobe {settings.nprobe}")
    print(f"| {'bank rows':>10} | {'bits':>4} | {'backend':<11} | {'search (s)':>10} | {'bank (MB)':>9} | "
          f"{'peak above bank (MB)':>20} | {'recall@20':>9} | {'mean |dw|':>9} | {'max |dw|':>8} | "
          f"{'mean |dc|':>9} | {'max |dc|':>8} |")
    print(f"|{'-' * 12}|{'-' * 6}|{'-' * 13}|{'-' * 12}|{'-' * 11}|{'-' * 22}|{'-' * 11}|{'-' * 11}|{'-' * 10}|"
          f"{'-' * 11}|{'-' * 10}|")
    for n in sizes:
        for bits in bits_list:
            z, labels = BANKS[bank](n, bits)
            if float16:
                z = z.half()
            rows = torch.from_numpy(np.sort(np.random.default_rng(1).choice(n, min(sample, n), replace=False)))
            ref_s, ref_i = exact_topk(z[rows], z, k, self_index=rows)
            # NACD's reconstruction reads the neighbours' confidences: a fixed random table on the labels
            confidence = labels.float() * torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))
            w_ref = weights_from_neighbors(ref_s / 2, ref_i, labels, own_index=rows)
            c_ref = confidence_from_neighbors(ref_s / 2, ref_i, confidence, labels, own_index=rows)
            candidates = labels[rows] > 0
            for backend in backends:
                base = reset_peak_memory()
                t = time.perf_counter()
                cfg = load_config(None, [f"bank.knn={backend}", f"bank.nprobe={settings.nprobe}",
                                         f"bank.nlist={settings.nlist}"])
                sims, index = neighbours(cfg, Bank(z, torch.arange(n), "pass", 0.0), k)  # as the refresh of 1 process
                seconds = time.perf_counter() - t
                peak = (_status_bytes("VmHWM") - base) / 2**20
                s_rows, i_rows = sims[rows], index[rows]
                recall = float((i_rows[:, :, None] == ref_i[:, None, :]).any(2).float().mean())
                dw = (weights_from_neighbors(s_rows / 2, i_rows, labels, own_index=rows) - w_ref).abs()
                dc = (confidence_from_neighbors(s_rows / 2, i_rows, confidence, labels, own_index=rows)
                      - c_ref).abs()[candidates]
                print(f"| {n:>10} | {bits:>4} | {backend:<11} | {seconds:>10.1f} | {z.nbytes / 2**20:>9.0f} | "
                      f"{peak:>20.0f} | {recall:>9.4f} | {float(dw.mean()):>9.5f} | {float(dw.max()):>8.4f} | "
                      f"{float(dc.mean()):>9.5f} | {float(dc.max()):>8.4f} |", flush=True)
                del sims, index


def bench_memory(sizes, bits_list, backends):
    print(f"| {'bank rows':>10} | {'bits':>4} | {'backend':<9} | {'bank':>14} | {'search (s)':>10} | "
          f"{'peak above the bank (MB)':>24} | {'peak with the bank (MB)':>23} |")
    print(f"|{'-' * 12}|{'-' * 6}|{'-' * 11}|{'-' * 16}|{'-' * 12}|{'-' * 26}|{'-' * 25}|")
    for n in sizes:
        for bits in bits_list:
            for backend in backends:
                cfg = load_config(None, [f"bank.knn={backend}"])
                dtype = torch.float16 if n >= cfg.bank.float16_above else torch.float32
                g = torch.Generator().manual_seed(0)
                rows = torch.empty(n, 2 * bits, dtype=dtype)
                for a in range(0, n, 65536):  # built in pieces: the bank is the only large thing held
                    rows[a:a + 65536] = F.normalize(torch.randn(min(65536, n - a), 2 * bits, generator=g), dim=1)
                base = reset_peak_memory()
                t = time.perf_counter()
                result = neighbours(cfg, Bank(rows, torch.arange(n), "pass", 0.0), 20)
                seconds = time.perf_counter() - t
                above = (_status_bytes("VmHWM") - base) / 2**20
                print(f"| {n:>10} | {bits:>4} | {backend:<9} | {str(dtype)[6:] + f' {rows.nbytes / 2**20:.0f} MB':>14} | "
                      f"{seconds:>10.0f} | {above:>24.0f} | {above + rows.nbytes / 2**20:>23.0f} |", flush=True)
                del rows, result


def random_rows(rng: np.random.Generator, n: int, bits: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """n random labels (each class with probability 0.15) and codes: (n, classes) bool, (n, bits) uint8."""
    return rng.random((n, classes)) < 0.15, rng.integers(0, 2, (n, bits), dtype=np.uint8)


def bench_eval(sizes, bits=64, queries=2000, classes=24):
    print(f"| {'database codes':>14} | {'queries':>7} | {'all metrics, both directions (s)':>32} |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 34}|")
    rng = np.random.default_rng(0)
    ql, qc = random_rows(rng, queries, bits, classes)
    for n in sizes:
        dl, dc = random_rows(rng, n, bits, classes)
        t = time.perf_counter()
        for _ in range(2):  # I2T and T2I
            metrics.retrieval_metrics(qc, dc, ql, dl, topk=[1000])
        print(f"| {n:>14} | {queries:>7} | {time.perf_counter() - t:>32.2f} |")


def bench_paths(sizes, bits=64, queries=200, classes=24):
    print(f"| {'database codes':>14} | {'path':<22} | {'seconds':>8} | {'ns a pair':>9} | {'mean AP':>10} |")
    print(f"|{'-' * 16}|{'-' * 24}|{'-' * 10}|{'-' * 11}|{'-' * 12}|")
    rng = np.random.default_rng(0)
    ql, qc = random_rows(rng, queries, bits, classes)
    torch.set_num_threads(1)
    for n in sizes:
        dl, dc = random_rows(rng, n, bits, classes)
        quarter = -(-n // 4)
        paths = {"numpy, one block": dict(compiled=False, db_chunk=None),
                 "kernel, one block": dict(compiled=True, db_chunk=None),
                 "numpy, 4 blocks": dict(compiled=False, db_chunk=quarter),
                 "kernels, 4 blocks": dict(compiled=True, db_chunk=quarter)}
        metrics.score_queries(qc[:2], dc[:1000], ql[:2], dl[:1000], topk=[10], compiled=True)  # numba's compile
        for name, kw in [*paths.items(), ("torch (CPU)", None)]:
            t = time.perf_counter()
            if kw is None:
                scores = metrics.score_queries_torch(*(torch.from_numpy(a) for a in (qc, dc, ql, dl)), topk=[1000])
            else:
                scores = metrics.score_queries(qc, dc, ql, dl, topk=[1000], threads=1, **kw)
            seconds = time.perf_counter() - t
            print(f"| {n:>14} | {name:<22} | {seconds:>8.2f} | {seconds / (queries * n) * 1e9:>9.1f} | "
                  f"{np.nanmean(scores.index_ap[:, 0]):>10.6f} |")


EVAL_WORKER = r"""
import json, sys, time, numpy as np, torch, torch.distributed as dist
from scbch_dist.engine.scoring import ranking_metrics
n, bits, queries, classes = (int(v) for v in sys.argv[1:5])
if "WORLD_SIZE" in __import__("os").environ:
    dist.init_process_group("gloo")
rng = np.random.default_rng(0)  # every rank builds the same codes: the tables a run's ranks hold
ql, qc = rng.random((queries, classes)) < 0.15, rng.integers(0, 2, (queries, bits), dtype=np.uint8)
if len(sys.argv) > 5:  # the database on disk, in packed tables (bench_eval_ranks --disk)
    from scbch_dist.metrics.table import PackedTable
    dl, dc = PackedTable.open(sys.argv[5] + "/labels.npy"), PackedTable.open(sys.argv[5] + "/codes.npy")
else:
    dl, dc = rng.random((n, classes)) < 0.15, rng.integers(0, 2, (n, bits), dtype=np.uint8)
if dist.is_initialized():
    dist.barrier()
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:  # the high-water mark from here: the evaluation's own memory
    f.write("5")
held = status("VmRSS")
t = time.perf_counter()
out = [ranking_metrics(qc, dc, ql, dl, topk=[1000]) for _ in range(2)]  # I2T and T2I
seconds = time.perf_counter() - t
peak = (status("VmHWM") - held) / 2**20  # MiB above the codes and labels the process held before
if not dist.is_initialized() or dist.get_rank() == 0:
    print("EVAL", seconds, peak, json.dumps(out[0]["map"]), json.dumps(out[0]["ndcg_at_k"]))
if dist.is_initialized():
    dist.barrier(); dist.destroy_process_group()
"""


def write_tables(folder: str, n: int, bits: int, classes: int, rows: int = 1 << 20) -> None:
    """A random database of n codes and labels as packed tables (metrics.table), made and written a
    block of rows at a time: it is never in memory whole."""
    from scbch_dist.metrics.table import PackedTable

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, width, p in (("labels", classes, 0.15), ("codes", bits, 0.5)):
        blocks = (metrics.pack_words(rng.random((min(rows, n - a), width)) < p) for a in range(0, n, rows))
        PackedTable.write(f"{folder}/{name}.npy", blocks, width)


def bench_eval_ranks(sizes, bits=64, queries=2000, classes=24, disk=None, layouts=((1, 1), (1, 2), (2, 1))):
    """Every metric of both directions through engine.scoring.ranking_metrics: one process on one
    and on two threads, and two gloo processes on one thread each (each scoring half the queries).
    With ``disk`` (a folder), the database is written there as packed tables and streamed from them
    in blocks (metrics.DB_CHUNK rows)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with open("/tmp/_scbch_eval_worker.py", "w") as f:
        f.write(EVAL_WORKER)
    print(f"{queries} queries of {bits} bits, every metric of both directions"
          + (f", the database streamed from packed tables on disk in blocks of {metrics.DB_CHUNK} rows" if disk else ""))
    print(f"| {'database codes':>14} | {'processes x threads':>19} | {'seconds':>8} | {'vs 1 x 1':>8} | "
          f"peak MiB above the inputs (rank 0) | mAP I2T (identical?) |")
    print(f"|{'-' * 16}|{'-' * 21}|{'-' * 10}|{'-' * 10}|{'-' * 36}|{'-' * 22}|")
    for n in sizes:
        args = [str(n), str(bits), str(queries), str(classes)]
        if disk:
            write_tables(f"{disk}/{n}", n, bits, classes)
            args.append(f"{disk}/{n}")
        rows = []
        for procs, threads in layouts:
            cmd = ([sys.executable, "/tmp/_scbch_eval_worker.py"] if procs == 1 else
                   [torchrun, "--standalone", "--nproc_per_node", str(procs), "/tmp/_scbch_eval_worker.py"])
            out = subprocess.run(cmd + args, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                 capture_output=True, text=True, check=True).stdout
            line = next(line for line in out.splitlines() if line.startswith("EVAL"))
            _, seconds, peak, value, ndcg = line.split(" ", 4)
            rows.append((procs, threads, float(seconds), value + " " + ndcg, float(peak)))
        for procs, threads, seconds, value, peak in rows:
            same = "yes" if value == rows[0][3] else "NO"
            print(f"| {n:>14} | {f'{procs} x {threads}':>19} | {seconds:>8.2f} | {seconds / rows[0][2]:>8.2f} | "
                  f"{peak:>34.0f} | {value.split()[0][:8]} ({same}) |", flush=True)


STEP_WORKER = r"""
import sys, time, torch
from accelerate import Accelerator
from scbch_dist.config import load_config
from scbch_dist.engine.loop import train_step
from scbch_dist.engine.setup import make_optimizer
from scbch_dist.methods import SCBCH, Step, TrainingSet
from scbch_dist.models import SCBCHModel
hidden, batch, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
acc = Accelerator(cpu=True)
cfg = load_config(None, [f"model.hidden={hidden}"])
torch.manual_seed(0)
model = SCBCHModel(4096, 1386, 64, hidden, 24)
opt = make_optimizer(model, cfg, acc.device)
model, opt = acc.prepare(model, opt)
local = batch // acc.num_processes
g = torch.Generator().manual_seed(acc.process_index)
data = {"img": torch.randn(local, 4096, generator=g), "txt": (torch.rand(local, 1386, generator=g) < 0.01).float()}
lab = (torch.rand(local, 24, generator=g) < 0.2).to(torch.uint8)
method = SCBCH(cfg, TrainingSet(local, 24, lab, None, acc.device))
step = Step(0, torch.arange(local), lab)
for i in range(steps + 3):
    if i == 3:
        acc.wait_for_everyone(); t = time.perf_counter()
    train_step(model, opt, acc, data, method, step)
acc.wait_for_everyone()
if acc.is_main_process:
    print("STEPS_PER_S", steps / (time.perf_counter() - t))
"""


def bench_steps(hidden, batch, steps):
    def run(cmd, threads):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return float(next(line.split()[1] for line in out.splitlines() if line.startswith("STEPS_PER_S")))
    args = [str(hidden), str(batch), str(steps)]
    one = run([sys.executable, "-c", STEP_WORKER, *args], 2)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with open("/tmp/_scbch_step_worker.py", "w") as f:
        f.write(STEP_WORKER)
    two = run([torchrun, "--standalone", "--nproc_per_node", "2", "/tmp/_scbch_step_worker.py", *args], 1)
    print(f"global batch {batch}, width {hidden}, 4096-d image + 1386-d text features, 64 bits")
    print(f"| {'processes':>9} | {'threads each':>12} | {'steps/s':>8} | {'samples/s':>9} |")
    print(f"|{'-' * 11}|{'-' * 14}|{'-' * 10}|{'-' * 11}|")
    for procs, threads, rate in ((1, 2, one), (2, 1, two)):
        print(f"| {procs:>9} | {threads:>12} | {rate:>8.2f} | {rate * batch:>9.0f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["refresh", "quality", "memory", "eval", "eval-ranks", "paths", "steps"])
    p.add_argument("--backends", nargs="+", default=["torch-ivf", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw"])
    p.add_argument("--bank", choices=sorted(BANKS), default="trained-like")
    p.add_argument("--float16", action="store_true", help="the bank's rows in float16 (bank.float16_above)")
    p.add_argument("--nlist", type=int, default=KnnSettings.nlist)
    p.add_argument("--nprobe", type=int, default=KnnSettings.nprobe)
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--queries", type=int, default=None,
                   help="eval-ranks (default 2000), paths (default 200): query codes (the time is linear in them)")
    p.add_argument("--disk", help="eval-ranks: write the database to packed tables in this folder and stream it")
    p.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "2x1"], help="eval-ranks: processes x threads")
    a = p.parse_args()
    if a.what == "refresh":
        bench_refresh(a.sizes or [10000, 100000, 1000000], a.bits)
    elif a.what == "quality":
        bench_quality(a.sizes or [100000, 1000000], a.bits, a.backends, bank=a.bank, float16=a.float16,
                      settings=KnnSettings(nprobe=a.nprobe, nlist=a.nlist))
    elif a.what == "memory":
        bench_memory(a.sizes or [1000000], a.bits if a.bits != [64, 128] else [128],
                     a.backends if a.backends != p.get_default("backends") else ["auto"])
    elif a.what == "eval":
        bench_eval(a.sizes or [18015, 100000, 1000000])
    elif a.what == "eval-ranks":
        bench_eval_ranks(a.sizes or [100000, 1000000], queries=a.queries or 2000, disk=a.disk,
                         layouts=[tuple(int(v) for v in x.split("x")) for x in a.layouts])
    elif a.what == "paths":
        bench_paths(a.sizes or [1000000], queries=a.queries or 200)
    else:
        bench_steps(a.hidden, a.batch, a.steps)


if __name__ == "__main__":
    main()

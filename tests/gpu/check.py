"""The prepared GPU check: every GPU path in one run, one table, a non-zero exit on any failure
(docs/distributed.md, "The GPU check").

    bash tests/gpu/check.sh [--wheels DIR] [--only NAME ...] [--budget S] [--out FILE.json]
    python tests/gpu/check.py --cpu [--only NAME ...]                # every check at toy size on the CPU

First the environment: the versions that matter and the device; a dependency of the package that
does not import stops the check at once, naming it (``check.sh --wheels DIR`` installs what a GPU
image lacks, from the wheels tests/gpu/wheels.sh fetched). Then each check runs in its own process
under a time limit (about 7 minutes in all on one H100/H200; ``--budget`` caps the whole run: a
check whose limit it cut and that runs out, or that it leaves under 20 s, is skipped by name) and reports pass, FAIL or "skip: <reason>" with its
figures; ``--out`` is rewritten after every check, so a run cut short still leaves what it found:
  train-bf16     the embedded default on CUDA, 3 epochs at the default precision (auto: bf16 where
                 the GPU has it) and in float32: what auto chose, samples/s and final mAP of each
                 (auto's must stay within 0.02 of float32's)
  metrics        metrics.score_queries_torch on the GPU against the numpy path on the CPU, 200
                 queries x 1M codes: integer rows equal, AP/NDCG within 1e-9; seconds of each
  refresh        the refresh's neighbour search over 1M clustered rows (128-d, as a 64-bit bank's)
                 on the GPU with torch-ivf (and faiss-gpu where FAISS has GPUs): seconds, recall@20
                 on 2000 rows against exact
  nccl           two processes (NCCL) train a small synthetic dataset; needs 2 GPUs
  deepspeed      DeepSpeed ZeRO-2 through Accelerate: a run stopped after epoch 1 resumes with its
                 optimizer state (tests/test_checkpoint.py); needs DeepSpeed
  finetune       tests/benchmarks/bench_finetune.py gpu: ViT-B/16 + BERT-base steps in bf16
  paper-epoch    one epoch of SCBCH at the paper's width (8192) on a MIRFlickr-sized synthetic
                 dataset (10,000 training rows, 4096 + 1386-d features), bf16: seconds

Without CUDA every check is skipped by name (a dry run, exit 0); ``--cpu`` runs each check's code at
toy size on the CPU instead (NCCL becomes gloo, DeepSpeed stays skipped), which is how CI tests
this script where no GPU exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT = "CHECK-RESULT "  # the line a check's process prints its figures on, as JSON


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def train_args(root: Path, run: Path, *sets: str) -> list[str]:
    base = [f"data.root={root}", "data.generate=synthetic", f"run.dir={run}", "run.progress=false",
            "run.tensorboard=false", "run.checkpoint=false"]
    return [sys.executable, "-m", "scbch_dist.train", *[a for s in (*base, *sets) for a in ("--set", s)]]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# -- the checks: each returns (command(s) to run, a function of the finished outputs -> figures) ------


def check_train_bf16(tmp: Path, cpu: bool):
    size = ["synthetic.n_train=400", "synthetic.n_query=80", "model.hidden=64"] if cpu else []
    epochs = "1" if cpu else "3"
    # the default (auto: bf16 where the hardware has it), against float32
    runs = {p: tmp / f"train-{p}" for p in ("auto", "no")}
    commands = [train_args(tmp / "data", runs[p], f"train.mixed_precision={p}", f"train.epochs={epochs}",
                           f"eval.every={epochs}", *size) for p in runs]

    def figures() -> dict:
        s = {p: summary(r) for p, r in runs.items()}
        diff = abs(s["auto"]["final"]["avg_map"] - s["no"]["final"]["avg_map"])
        out = {"auto chose": s["auto"]["run"]["precision"]}
        out.update({f"{p} samples/s": round(s[p]["throughput"]["train_samples_per_s"]) for p in s})
        out.update({f"{p} mAP": round(s[p]["final"]["avg_map"], 4) for p in s}, **{"|mAP diff|": round(diff, 4)})
        if diff > 0.02:
            raise AssertionError(f"the final mAP of auto ({out['auto chose']}) differs from float32's by {diff:.4f} (> 0.02)")
        return out
    return commands, figures


METRICS = r"""
import json, sys, time, numpy as np, torch
from scbch_dist import metrics
n, q, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
qc, dc = rng.integers(0, 2, (q, 64), dtype=np.uint8), rng.integers(0, 2, (n, 64), dtype=np.uint8)
ql, dl = rng.random((q, 24)) < 0.15, rng.random((n, 24)) < 0.15
t = time.perf_counter(); ref = metrics.score_queries(qc, dc, ql, dl, topk=[1000]); cpu_s = time.perf_counter() - t
args = [torch.from_numpy(a).to(device) for a in (qc, dc, ql, dl)]
metrics.score_queries_torch(*[a[:2] if i % 2 == 0 else a for i, a in enumerate(args)], topk=[1000])  # warm-up
if device == "cuda": torch.cuda.synchronize()
t = time.perf_counter(); got = metrics.score_queries_torch(*args, topk=[1000]); dev_s = time.perf_counter() - t
for f in ("count", "relevant", "hits"):
    assert np.array_equal(getattr(got, f), getattr(ref, f)), f
worst = max(float(np.nanmax(np.abs(getattr(got, f) - getattr(ref, f)))) for f in ("index_ap", "ndcg"))
assert worst < 1e-9, worst
print("CHECK-RESULT " + json.dumps({"pairs": n * q, "device s": round(dev_s, 3), "numpy s": round(cpu_s, 2),
                                    "max |AP diff|": worst}))
"""


def check_metrics(tmp: Path, cpu: bool):
    return [python(METRICS, "20000" if cpu else "1000000", "50" if cpu else "200", "cpu" if cpu else "cuda")], None


REFRESH = r"""
import json, sys, time, torch
import torch.nn.functional as F
from scbch_dist.knn import KnnSettings, exact_topk, faiss_available, neighbours
n, device = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
# clustered rows, as a trained bank's are (codes of the same labels gather): 1000 centres, noise 0.5
centres = torch.randn(1000, 128, generator=g)
rows = F.normalize(centres[torch.randint(1000, (n,), generator=g)] + 0.5 * torch.randn(n, 128, generator=g), dim=1)
rows = rows.to(device)
sample = torch.randperm(n, generator=g)[:2000].to(device)
_, exact = exact_topk(rows[sample], rows, 20, self_index=sample)
out = {}
backends = ["torch-ivf"] + (["faiss-gpu"] if device == "cuda" and faiss_available(gpu=True) else [])
for backend in backends:
    t = time.perf_counter()
    _, found = neighbours(rows, rows, 20, self_index=torch.arange(n, device=device), settings=KnnSettings(knn=backend))
    if device == "cuda": torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    hit = (found[sample][:, :, None] == exact[:, None, :]).any(2).float().mean().item()
    out[f"{backend} s"], out[f"{backend} recall@20"] = round(seconds, 2), round(hit, 4)
    assert hit > 0.5, (backend, hit)
print("CHECK-RESULT " + json.dumps(out))
"""


def check_refresh(tmp: Path, cpu: bool):
    return [python(REFRESH, "20000" if cpu else "1000000", "cpu" if cpu else "cuda")], None


def check_nccl(tmp: Path, cpu: bool):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run = tmp / "nccl"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "scbch_dist.train",
               *train_args(tmp / "data-small", run, "synthetic.n_train=400", "synthetic.n_query=80",
                           "synthetic.samples_per_shard=100", "model.hidden=64", "train.epochs=2",
                           "eval.every=2")[3:]]

    def figures() -> dict:
        s = summary(run)
        assert s["run"]["world_size"] == 2, s["run"]
        return {"processes": 2, "device": s["run"]["device"], "final mAP": round(s["final"]["avg_map"], 4)}
    return [command], figures


def check_deepspeed(tmp: Path, cpu: bool):
    return [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
             "tests/test_checkpoint.py::test_a_deepspeed_run_resumes_with_its_optimizer_state"]], None


def check_finetune(tmp: Path, cpu: bool):
    bench = str(REPO / "tests" / "benchmarks" / "bench_finetune.py")
    return [[sys.executable, bench, "model", "--steps", "2"] if cpu else [sys.executable, bench, "gpu", "--steps", "10"]], None


def check_paper_epoch(tmp: Path, cpu: bool):
    size = (["synthetic.n_train=400", "synthetic.n_query=80", "model.hidden=256", "train.mixed_precision=bf16"] if cpu
            else ["synthetic.n_train=10000", "synthetic.n_query=2000", "synthetic.n_extra_database=8015",
                  "synthetic.img_dim=4096", "synthetic.txt_dim=1386", "model.hidden=8192", "train.mixed_precision=bf16"])
    run = tmp / "paper-epoch"
    command = train_args(tmp / "data-paper", run, "train.epochs=1", "eval.every=1", *size)

    def figures() -> dict:
        s = summary(run)
        return {"epoch s": round(s["timings_s"]["per_epoch"], 2), "eval s": round(s["timings_s"]["eval"], 2),
                "samples/s": round(s["throughput"]["train_samples_per_s"])}
    return [command], figures


# name, function, limit (s), what a GPU machine must have beyond CUDA (None: nothing)
CHECKS = [
    ("train-bf16", check_train_bf16, 120, None),
    ("metrics", check_metrics, 60, None),
    ("refresh", check_refresh, 90, None),
    ("nccl", check_nccl, 60, "2 GPUs"),
    ("deepspeed", check_deepspeed, 90, "deepspeed"),
    ("finetune", check_finetune, 90, None),
    ("paper-epoch", check_paper_epoch, 120, None),
]


# the import names of pyproject's dependencies: a GPU image without one of them cannot run any check
REQUIRED = ("torch", "numpy", "accelerate", "webdataset", "yaml", "h5py", "scipy", "matplotlib", "tqdm", "omegaconf",
            "safetensors", "numba")
REPORTED = ("torch", "accelerate", "numpy", "numba", "faiss", "deepspeed", "timm", "transformers")


def environment() -> dict:
    """What the figures depend on: Python, the versions of REPORTED (None: not installed), the GPUs,
    and the REQUIRED modules that do not import (with why)."""
    import importlib
    import platform

    env: dict = {"python": platform.python_version()}
    broken = {}
    for name in dict.fromkeys(REQUIRED + REPORTED):
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a half-installed package fails with anything, not only ImportError
            module = None
            if name in REQUIRED:
                broken[name] = f"{type(e).__name__}: {e}"
        if name in REPORTED:
            env[name] = getattr(module, "__version__", "?") if module is not None else None
    if env.get("torch"):
        import torch

        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["missing"] = broken
    return env


def missing(need: str | None, cpu: bool) -> str | None:
    """Why a check cannot run here, or None."""
    import importlib.util

    import torch

    if cpu:
        return "DeepSpeed through Accelerate needs CUDA" if need == "deepspeed" else None
    if not torch.cuda.is_available():
        return "no CUDA device"
    if need == "2 GPUs" and torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} GPU(s), needs 2"
    if need == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed not installed"
    return None


def run(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``command`` in a process group of its own: at the time limit the whole group is killed, the
    processes a launcher (torchrun, accelerate) started included, so none holds the GPU into the
    next check."""
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_check(name: str, build, limit: float, tmp: Path, cpu: bool, cut: bool = False) -> dict:
    """``cut``: the --budget cut ``limit`` below the check's own (running out is then a skip)."""
    commands, figures = build(tmp, cpu)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    out: dict = {}
    for command in commands:
        left = limit - (time.perf_counter() - t0)
        try:
            proc = run(command, env, max(left, 1))
        except subprocess.TimeoutExpired:
            if cut:
                return {"status": f"skip: ran out of the {limit:.0f} s the --budget had left",
                        "seconds": time.perf_counter() - t0}
            return {"status": "FAIL", "reason": f"over its {limit:.0f} s limit", "seconds": time.perf_counter() - t0}
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            return {"status": "FAIL", "reason": f"exit {proc.returncode}: " + " | ".join(tail),
                    "seconds": time.perf_counter() - t0}
        if name == "deepspeed" and " skipped" in proc.stdout:
            return {"status": "FAIL", "reason": "the DeepSpeed test skipped itself", "seconds": time.perf_counter() - t0}
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT):
                out.update(json.loads(line[len(RESULT):]))
        if name == "finetune":
            out["table"] = [line for line in proc.stdout.splitlines() if line.startswith("|")][-3:]
    try:
        out.update(figures() if figures is not None else {})
    except (AssertionError, OSError, KeyError, ValueError) as e:
        return {"status": "FAIL", "reason": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    return {"status": "pass", "figures": out, "seconds": time.perf_counter() - t0}


def environment_line(env: dict) -> str:
    gpus = env.get("gpus") or []
    device = f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k in REPORTED and v is not None)
    absent = [k for k in REPORTED if env.get(k) is None]
    return (f"{device}; Python {env['python']}, {versions}" + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
            + (f"; not installed: {', '.join(absent)}" if absent else ""))


def table(results: dict) -> str:
    lines = ["| check | status | seconds | figures |", "| --- | --- | ---: | --- |"]
    for name, r in results.items():
        status = r["status"] + (f": {r['reason']}" if "reason" in r else "")
        figures = "; ".join(f"{k} {v}" for k, v in r.get("figures", {}).items() if k != "table")
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(f"| {name} | {status} | {seconds} | {figures} |")
        lines += [f"|   | | | {row} |" for row in r.get("figures", {}).get("table", [])]
    return "\n".join(lines)


# a check is started only with at least this many seconds of --budget left
MIN_CHECK_S = 20
clock = time.perf_counter  # the budget's clock (a test's to replace)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/gpu/check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[c[0] for c in CHECKS], help="run these checks alone")
    p.add_argument("--cpu", action="store_true", help="every check at toy size on the CPU (what CI runs)")
    p.add_argument("--budget", type=float, help="seconds for the whole run: each check's limit is cut to what is "
                                                "left, and a check with under %d s left is skipped" % MIN_CHECK_S)
    p.add_argument("--out", type=Path, help="the environment and the results as JSON, rewritten after every check")
    args = p.parse_args(argv)
    start = clock()
    env = environment()
    report = {"environment": env, "checks": {}}

    def save() -> None:
        if args.out:  # written whole under another name, then renamed: a run killed mid-write leaves the last one
            tmp = args.out.with_name(f".{args.out.name}.tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(args.out)

    print(f"environment: {environment_line(env)}", file=sys.stderr, flush=True)
    save()  # the environment at once: a run killed in its first check still leaves it
    if env["missing"]:
        print("cannot run: " + "; ".join(f"{k} ({v})" for k, v in env["missing"].items())
              + ". On a machine without the registries: bash tests/gpu/wheels.sh where pip works, carry .whl, "
                "then bash tests/gpu/check.sh --wheels .whl", file=sys.stderr)
        return 1
    results = report["checks"]
    with tempfile.TemporaryDirectory(prefix="scbch-gpu-check-") as tmp:
        for name, build, limit, need in CHECKS:
            if args.only and name not in args.only:
                continue
            left = None if args.budget is None else args.budget - (clock() - start)
            why = missing(need, args.cpu)
            if why:
                results[name] = {"status": f"skip: {why}"}
            elif left is not None and left < MIN_CHECK_S:
                results[name] = {"status": f"skip: {left:.0f} s left of the --budget of {args.budget:.0f} s "
                                            f"(a check starts with {MIN_CHECK_S} s)"}
            else:
                cut = left is not None and left < limit
                limit = min(limit, left) if cut else limit
                print(f"[{name}] running (limit {limit:.0f} s)", file=sys.stderr, flush=True)
                results[name] = run_check(name, build, limit, Path(tmp), args.cpu, cut)
                print(f"[{name}] {results[name]['status']} in {results[name]['seconds']:.1f} s", file=sys.stderr,
                      flush=True)
            save()
    print(f"environment: {environment_line(env)}")
    print(table(results))
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The SLURM paths under a real SLURM cluster (docs/distributed.md, "SLURM events"): slurmctld, two
slurmd (n1, n2: one CPU each) and munged started on this machine by tests/slurm/cluster.sh from
Debian's packages. Skipped, with the reason, where they are not installed or this is not root;
.ci/setup installs them and CI runs these tests.

Every test asserts what the run left (codes, summaries, checkpoints, what SLURM recorded), not only
exit codes. Comparisons of codes are bit for bit where the arithmetic is the same (one process
against one process, two against two, each with one thread); one process against two agree to
float32 rounding, which the engine promises, not bit for bit."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch

pytestmark = pytest.mark.slow

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
CODES = ("query_img", "query_txt", "database_img", "database_txt")

# a run of 75 s on one thread here (6000 training rows, 80 epochs, hidden 1024): SLURM's controller
# looks at its jobs every 30 s and warns at the first look past TIME - LEAD - 30 s, so
# --time=2 --signal=B:USR1@80 warns 10 to 40 s in, and the run must still be going then (at 40
# epochs, 37 s, a CI run finished first and was never warned)
EPOCHS = 80
LONG = ["--set", "model.bits=16", "--set", f"train.epochs={EPOCHS}", "--set", f"eval.every={EPOCHS}", "--set", "train.mixed_precision=no",
        "--set", "run.tensorboard=false", "--set", "run.progress=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running two-node cluster; yields the environment its commands and jobs take (SLURM_CONF,
    the test's Python first on PATH, one thread a process). Stopped after the module."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster runs as root (tests/slurm/cluster.sh); not root here")
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("slurm-wlm and munge are not installed (bash tests/slurm/cluster.sh install, as root)")
    folder = Path("/tmp/scbch-slurm-tests")  # short: the munge socket's path must fit a sockaddr
    started = subprocess.run(["bash", str(CLUSTER_SH), "start", str(folder)], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"the cluster did not start:\n{started.stderr[-3000:]}")
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    yield env
    subprocess.run(["bash", str(CLUSTER_SH), "stop", str(folder)], capture_output=True)


def sh(env: dict, *cmd: str, cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
    return out.stdout


def sbatch(env: dict, cwd: Path, *args: str) -> str:
    return sh(env, "sbatch", "--parsable", *args, cwd=cwd).strip().split(";")[0]


def jobs(env: dict, job: str) -> list[dict]:
    """``scontrol show job -o JOB`` as one dict per job (an array's tasks each)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]


def wait_for(what: str, check, timeout: float = 240, every: float = 0.5, *, explain=None):
    """Poll ``check()`` until it returns something true; fail naming ``what`` after ``timeout``
    seconds, with what ``explain()`` says (a job's record and output) appended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    pytest.fail(f"waited {timeout:.0f} s for {what}" + (f"\n{explain()}" if explain else ""))


def job_story(env: dict, job: str, folder: Path):
    """For a failure message: what SLURM records of ``job`` and the tail of its output file."""
    def story() -> str:
        out = folder / f"slurm-{job}.out"
        record = {k: v for j in jobs(env, job) for k, v in j.items()
                  if k in ("JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "NodeList")}
        return f"{record}\n{out.read_text()[-4000:] if out.is_file() else f'(no {out})'}"
    return story


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_done(env: dict, job: str, timeout: float = 300) -> list[dict]:
    """Every task of ``job`` in a final state; returns their records."""
    def done():
        found = jobs(env, job)
        return found if found and all(j["JobState"] in FINAL for j in found) else None
    return wait_for(f"job {job} to end", done, timeout, explain=lambda: str(jobs(env, job)))


def a_process_runs(text: str) -> bool:
    """Whether a process on this machine (the cluster's nodes are this machine) has ``text`` in its
    command line: the batch script has started its command, so its traps are set."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return True
        except OSError:  # a process that ended meanwhile
            continue
    return False


def log_has(run_dir: Path, text: str):
    log = run_dir / "log.txt"
    return lambda: log.is_file() and text in log.read_text()


def codes_of(run_dir: Path) -> dict:
    with np.load(run_dir / "codes.npz") as z:
        return {k: z[k] for k in CODES}


def assert_same_codes(a: Path, b: Path) -> None:
    ca, cb = codes_of(a), codes_of(b)
    for k in CODES:
        assert np.array_equal(ca[k], cb[k]), f"{k}: {(ca[k] != cb[k]).sum()} bits differ between {a} and {b}"
    sa, sb = (json.loads((d / "summary.json").read_text())["final"] for d in (a, b))
    assert sa["avg_map"] == sb["avg_map"] and sa["avg_map_tie_aware"] == sb["avg_map_tie_aware"]


def tiny_config(folder: Path, data_root: Path, **extra: str) -> Path:
    """A config of a few-second run on a small synthetic dataset it generates at ``data_root``."""
    lines = [f"data:\n  root: {data_root}\n  generate: synthetic\n  noise: mixed:0.5",
             "synthetic:\n  n_query: 80\n  n_train: 400\n  n_extra_database: 120\n  samples_per_shard: 96",
             "model:\n  bits: 16\n  hidden: 32", "train:\n  batch_size: 64\n  epochs: 4\n  mixed_precision: \"no\"",
             "eval:\n  every: 2", "scbch:\n  warmup_epochs: 1\n  k: 5", "run:\n  tensorboard: false\n  progress: false"]
    path = folder / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted one-process run of LONG on its own copy of the default dataset."""
    folder = tmp_path_factory.mktemp("long")
    run_dir = folder / "reference"
    proc = launch([sys.executable, "-m", "scbch_dist.train", "--set", f"data.root={folder / 'data'}",
                   "--set", "data.generate=synthetic", *LONG, "--set", f"run.dir={run_dir}"],
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, run_dir


def long_job(env: dict, folder: Path, *sbatch_args: str) -> tuple[str, Path]:
    """``launch/slurm.sbatch`` on one CPU node with the LONG run (its own run folder); returns the
    job id and the run folder."""
    job = sbatch(env, folder, "--nodes=1", *sbatch_args, str(REPO / "launch" / "slurm.sbatch"),
                 "--set", f"data.root={folder / 'data'}", *LONG)
    return job, folder / "runs" / f"{job}_0"


def test_a_grid_as_an_array_job_completes_and_reports_like_the_grid_run_here(cluster, tmp_path):
    """README: ``python launch/sweep.py GRID --slurm OUT && sbatch OUT``. Three tasks over two nodes,
    two of them generating the same data.root at once: every task COMPLETED, the dataset's digests
    check, and ``report`` equals that of the same grid run with --local, number for number."""
    config = tiny_config(tmp_path, tmp_path / "data" / "shared")
    for name in ("slurm", "local"):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nruns_dir: {tmp_path / 'runs' / name}\ndatasets: [{config}]\nbits: [16]\n"
            "noise: [0.2, 0.5, 0.8]\nseeds: [0]\nslurm: {time: \"00:10:00\"}\n")
    sh(cluster, sys.executable, str(REPO / "launch" / "sweep.py"), str(tmp_path / "slurm.yaml"), "--slurm", "grid.sbatch",
       cwd=tmp_path)
    job = sbatch(cluster, tmp_path, "grid.sbatch")
    tasks = wait_done(cluster, job)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}, [(t["ArrayTaskId"], t["JobState"]) for t in tasks]
    assert len({t["NodeList"] for t in tasks}) == 2  # both nodes took tasks
    verify = subprocess.run([sys.executable, "-m", "scbch_dist.data.verify", str(tmp_path / "data" / "shared")],
                            env=cluster, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert not list((tmp_path / "data").glob(".*.tmp"))  # the task whose copy lost the race left nothing

    local = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), str(tmp_path / "local.yaml"), "--local"],
                           env=cluster, cwd=tmp_path, capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-3000:]
    reports = {}
    for name in ("slurm", "local"):
        sh(cluster, sys.executable, "-m", "scbch_dist.experiments.report", str(tmp_path / "runs" / name), cwd=tmp_path)
        with open(tmp_path / "runs" / name / "report.csv", newline="") as f:  # every column but the timing
            reports[name] = [{k: v for k, v in row.items() if k != "seconds_per_epoch"} for row in csv.DictReader(f)]
    assert reports["slurm"] == reports["local"] and len(reports["slurm"]) == 3
    for run in sorted((tmp_path / "runs" / "slurm").rglob("summary.json")):
        local_run = tmp_path / "runs" / "local" / run.parent.relative_to(tmp_path / "runs" / "slurm")
        assert_same_codes(run.parent, local_run)


def test_two_cpu_nodes_train_like_two_processes_here_and_like_one(cluster, tmp_path):
    """``sbatch --nodes=2 launch/slurm.sbatch`` on CPU nodes: one gloo process a node, no flag. The
    codes and summary equal two processes on this machine bit for bit (``torchrun --standalone``,
    one thread each), and one process to float32 rounding."""
    config = tiny_config(tmp_path, tmp_path / "data")
    job = sbatch(cluster, tmp_path, "--nodes=2", str(REPO / "launch" / "slurm.sbatch"), "--config", str(config))
    (record,) = wait_done(cluster, job)
    assert record["JobState"] == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
    run_dir = tmp_path / "runs" / f"{job}_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2 and record["NodeList"] == "n[1-2]"

    exe = str(Path(sys.executable).parent / "torchrun")
    two = launch([exe, "--standalone", "--nproc_per_node", "2", "-m", "scbch_dist.train", "--config", str(config),
                  "--set", f"run.dir={tmp_path / 'two'}"], env=cluster)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_codes(run_dir, tmp_path / "two")

    one = launch([sys.executable, "-m", "scbch_dist.train", "--config", str(config), "--set", f"run.dir={tmp_path / 'one'}"],
                 env=cluster)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = codes_of(run_dir), codes_of(tmp_path / "one")  # packed bits
    differ = sum(int((np.unpackbits(a[k]) != np.unpackbits(b[k])).sum()) for k in CODES)
    assert differ <= 0.02 * 8 * sum(a[k].size for k in CODES)  # measured: 0.1 to 1.4 % of the bits
    final_one = json.loads((tmp_path / "one" / "summary.json").read_text())["final"]
    assert abs(summary["final"]["avg_map"] - final_one["avg_map"]) < 0.01


def test_time_limit_checkpoints_requeues_and_resumes_exactly(cluster, long_reference):
    """``--time=2 --signal=B:USR1@80``: SLURM warns the batch script at the first of its 30-s looks
    past TIME - LEAD - 30 s, 10-40 s in (``--time=1 --signal=B:USR1@50`` warned 0-30 s in); the run
    checkpoints inside its epoch, the job requeues itself (Restarts=1), resumes, and ends with the
    codes and mAP of the uninterrupted run, bit for bit."""
    folder, reference = long_reference
    job, run_dir = long_job(cluster, folder, "--time=2", "--signal=B:USR1@80")
    wait_for("the requeue", lambda: jobs(cluster, job)[0].get("Restarts") == "1", timeout=150,
             explain=job_story(cluster, job, folder))
    # the resumed incarnation gets room to finish (else it is warned, and requeued, again)
    sh(cluster, "scontrol", "update", f"JobId={job}", "TimeLimit=10")
    (record,) = wait_done(cluster, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    assert "resumed " in (run_dir / "log.txt").read_text()
    out = (folder / f"slurm-{job}.out").read_text()  # --open-mode=append: both incarnations' output
    assert "stopped by SIGUSR1" in out and "scontrol requeue" in out
    assert_same_codes(run_dir, reference)


def test_a_warning_in_the_first_second_requeues_and_resumes_exactly(cluster, long_reference):
    """The warning as the job starts (``scancel --batch --signal=USR1`` the moment it runs: what
    SLURM does when the lead reaches within 30 s of the start): the launcher, started deaf to
    SIGUSR1, learns of it from the batch shell's file; the run stops after its first step with a
    checkpoint, the job requeues (Restarts=1) and ends bit-identical. Before, the launcher died of
    the signal: FAILED, ``srun: error: n1: task 0: User defined signal 1``. The signal goes as soon
    as the script has started srun: sent when the job shows RUNNING, it can reach slurmd before the
    batch script exists, and SLURM drops it (a loaded run: 7 ms after "Launching batch job", the
    job COMPLETED unwarned)."""
    folder, reference = long_reference
    job, run_dir = long_job(cluster, folder, "--time=10")
    wait_for("the batch script's srun", lambda: a_process_runs(f"data.root={folder / 'data'}"), every=0.01,
             explain=job_story(cluster, job, folder))
    sh(cluster, "scancel", "--batch", "--signal=USR1", job)
    wait_for("the requeue", lambda: jobs(cluster, job)[0].get("Restarts") == "1", timeout=150,
             explain=job_story(cluster, job, folder))
    (record,) = wait_done(cluster, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    assert "stopped before the time limit; scontrol requeue" in (folder / f"slurm-{job}.out").read_text()
    assert "resumed " in (run_dir / "log.txt").read_text()
    assert_same_codes(run_dir, reference)


def test_an_array_task_warned_the_moment_it_runs_requeues_and_completes(cluster, tmp_path):
    """A sweep's array task is the trainer itself, started deaf to SIGUSR1 by its script: warned the
    moment it runs, its run learns of the warning from the batch shell's file, stops after its first
    step with a checkpoint and requeues the task (Restarts=1), which resumes and completes. Before,
    the trainer could die of the signal (FAILED). The signal goes as soon as the script has started
    its command (a signal sent before the batch script exists is dropped by SLURM: the test above)."""
    config = tiny_config(tmp_path, tmp_path / "data")
    (tmp_path / "grid.yaml").write_text(f"name: early\nruns_dir: {tmp_path / 'runs'}\ndatasets: [{config}]\n"
                                        "bits: [16]\nnoise: [0.5]\nseeds: [0]\nslurm: {time: \"00:10:00\"}\n")
    sh(cluster, sys.executable, str(REPO / "launch" / "sweep.py"), str(tmp_path / "grid.yaml"), "--slurm", "grid.sbatch",
       cwd=tmp_path)
    task = f"{sbatch(cluster, tmp_path, 'grid.sbatch')}_0"
    out = tmp_path / "runs" / "slurm" / f"{task}.out"
    wait_for("the task's command", lambda: a_process_runs(f"{tmp_path / 'grid.yaml'} --task"), every=0.01,
             explain=lambda: str(jobs(cluster, task)))
    sh(cluster, "scancel", "--batch", "--signal=USR1", task)
    wait_for("the requeue", lambda: jobs(cluster, task)[0].get("Restarts") == "1", timeout=150,
             explain=lambda: f"{jobs(cluster, task)}\n{out.read_text()[-3000:] if out.is_file() else ''}")
    (record,) = wait_done(cluster, task)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    text = out.read_text()
    assert "stopped by SIGUSR1" in text and "scontrol requeue" in text, text[-3000:]
    (log,) = (tmp_path / "runs").rglob("log.txt")
    assert "resumed " in log.read_text()


def test_scancel_stops_with_a_checkpoint_and_never_requeues(cluster, long_reference):
    """``scancel --signal=USR1`` takes the requeue path (Restarts=1, the run resumes); a plain
    ``scancel`` then ends the job CANCELLED with a checkpoint, and it never comes back."""
    folder, _ = long_reference
    job, run_dir = long_job(cluster, folder)
    wait_for("epoch 2", log_has(run_dir, f"epoch 2/{EPOCHS}"), timeout=120, explain=job_story(cluster, job, folder))
    sh(cluster, "scancel", "--signal=USR1", job)
    wait_for("the requeue", lambda: jobs(cluster, job)[0].get("Restarts") == "1", timeout=60,
             explain=job_story(cluster, job, folder))
    wait_for("the resumed run's next epoch", lambda: jobs(cluster, job)[0]["JobState"] == "RUNNING"
             and epochs_after_resume(run_dir) >= 1, timeout=120)
    sh(cluster, "scancel", job)
    (record,) = wait_done(cluster, job)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "1", record
    time.sleep(15)  # past the requeue delay (cred_expire): a requeued job would be pending or running by now
    (record,) = jobs(cluster, job)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "1", record
    assert (run_dir / "checkpoints" / "latest").read_text().strip().startswith("epoch-")
    assert not (run_dir / "summary.json").exists() and not (run_dir / "run.lock").exists()
    out = (folder / f"slurm-{job}.out").read_text()
    assert "stopped by SIGUSR1" in out and "stopped by SIGTERM" in out and "not requeued" in out


def epochs_after_resume(run_dir: Path) -> int:
    """Epoch lines the log gained after its last 'resuming' line."""
    log = run_dir / "log.txt"
    if not log.is_file():
        return 0
    lines = log.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if "resumed " in line]
    return sum(" | epoch " in line for line in lines[starts[-1]:]) if starts else 0


def test_preemption_by_the_high_partition_requeues_once_and_resumes_exactly(cluster, long_reference):
    """A job in ``high`` that needs the node preempts the running ``cpu`` job (PreemptMode=REQUEUE):
    SIGTERM, a checkpoint inside the grace time, and the job is back in the queue once (ended inside
    the grace time, SLURM would not requeue it: the launcher does, and SLURM does not again:
    Restarts=1); it ends with the uninterrupted run's codes, bit for bit."""
    folder, reference = long_reference
    job, run_dir = long_job(cluster, folder, "--nodelist=n1", "--partition=cpu")
    wait_for("epoch 3", log_has(run_dir, f"epoch 3/{EPOCHS}"), timeout=120, explain=job_story(cluster, job, folder))
    high = sbatch(cluster, folder, "--partition=high", "--nodelist=n1", "--output=/dev/null", "--wrap", "sleep 3")
    (record,) = wait_done(cluster, high)
    assert record["JobState"] == "COMPLETED"
    (record,) = wait_done(cluster, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    out = (folder / f"slurm-{job}.out").read_text()
    assert "stopped by SIGTERM" in out and "preempted; scontrol requeue" in out
    assert_same_codes(run_dir, reference)


def test_a_node_taken_down_mid_run_requeues_and_the_run_resumes(cluster, tmp_path):
    """``scontrol update nodename=n2 state=down`` under a two-node run: SLURM kills and requeues the
    job, which waits for two nodes, takes its own stale lock over once n2 is back, resumes from its
    checkpoint and ends as an uninterrupted two-node run does, bit for bit; nothing half-written."""
    config = tiny_config(tmp_path, tmp_path / "data")
    config.write_text(config.read_text().replace("epochs: 4", "epochs: 60").replace("every: 2", "every: 60"))
    script = str(REPO / "launch" / "slurm.sbatch")
    reference = sbatch(cluster, tmp_path, "--nodes=2", script, "--config", str(config))
    assert wait_done(cluster, reference)[0]["JobState"] == "COMPLETED"
    job = sbatch(cluster, tmp_path, "--nodes=2", script, "--config", str(config))
    run_dir = tmp_path / "runs" / f"{job}_0"
    wait_for("epoch 5", log_has(run_dir, "epoch 5/60"), timeout=120, every=0.1)
    try:
        sh(cluster, "scontrol", "update", "nodename=n2", "state=down", "reason=lost in a test")
        wait_for("the requeue", lambda: jobs(cluster, job)[0].get("Restarts") == "1", timeout=90)
        assert jobs(cluster, job)[0]["JobState"] in ("PENDING", "REQUEUED", "COMPLETING")
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], env=cluster, capture_output=True)
    (record,) = wait_done(cluster, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "run.lock").exists()
    assert "resumed " in (run_dir / "log.txt").read_text()
    assert_same_codes(run_dir, tmp_path / "runs" / f"{reference}_0")

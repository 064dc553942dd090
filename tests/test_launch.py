"""Launchers: the SLURM command resolution (dry runs) and the 2-CPU-process accelerate config."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import launch
from scbch_dist.experiments import slurm
from scbch_dist.experiments.slurm import accelerate_command, first_host, rendezvous_port

REPO = Path(__file__).resolve().parents[1]


def test_first_host_of_node_lists():
    assert first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert first_host("node17") == "node17"
    assert first_host("a,b,c") == "a"


def test_multi_node_command_from_the_slurm_environment(tmp_path):
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[10-13]"}
    cmd = accelerate_command(env, 8, ["--config", "configs/coco.yaml"], accelerate_config="accelerate_config.yaml",
                             run_dir=str(tmp_path / "r"))
    text = " ".join(cmd)
    assert "--num_machines 4 --machine_rank 2 --num_processes 32" in text
    assert f"--main_process_ip gpu10 --main_process_port {20000 + 123456 % 40000}" in text
    assert text.endswith(f"-m scbch_dist.train --config configs/coco.yaml --set run.dir={tmp_path / 'r'} "
                         "--set run.progress=false")
    # after a requeue the same command resumes the run
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "latest").write_text("epoch-0001\n")
    cmd = accelerate_command(env, 8, ["--config", "configs/coco.yaml", "--set", "train.epochs=60"],
                             accelerate_config="accelerate_config.yaml", run_dir=str(tmp_path / "r"))
    assert cmd[cmd.index("scbch_dist.train") + 1:] == ["--resume", str(tmp_path / "r"), "--set", "train.epochs=60"]
    cmd = accelerate_command(env, 8, ["--config=configs/coco.yaml"], accelerate_config="a.yaml", run_dir=str(tmp_path / "r"))
    assert cmd[cmd.index("scbch_dist.train") + 1:] == ["--resume", str(tmp_path / "r")]  # either spelling goes


def test_array_tasks_get_their_own_port_and_folder():
    a = {"SLURM_JOB_ID": "1001", "SLURM_ARRAY_JOB_ID": "1000", "SLURM_ARRAY_TASK_ID": "0"}
    b = {"SLURM_JOB_ID": "1002", "SLURM_ARRAY_JOB_ID": "1000", "SLURM_ARRAY_TASK_ID": "1"}
    ca, cb = (" ".join(accelerate_command(e, 1, [], accelerate_config="x.yaml")) for e in (a, b))
    assert rendezvous_port(1001) != rendezvous_port(1002)
    assert "run.dir=runs/1000_0" in ca and "run.dir=runs/1000_1" in cb


def test_dry_run_prints_the_command():
    env = {**os.environ, "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]"}
    out = subprocess.run([sys.executable, "-m", "scbch_dist.experiments.slurm", "--dry-run", "--gpus-per-node", "4", "--",
                          "--config", "configs/flickr.yaml"], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--num_processes 8" in out.stdout and "--main_process_ip n1" in out.stdout
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")]).returncode == 0


def test_the_batch_script_asks_for_a_warning_signal_and_passes_it_on():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@180" in text
    # the batch shell hands the warning to srun, and the launcher starts deaf to it (one relay, the
    # sweep's array scripts' too)
    assert "\n".join(slurm.warning_relay(f'srun {slurm.IGNORING_USR1} "${{PYTHON:-python}}" -m scbch_dist.experiments.slurm '
                                         '-- "$@"')) in text
    assert "trap ':' TERM" in text  # SIGTERM (scancel) reached every process: not turned into the warning
    assert "#SBATCH --open-mode=append" in text  # a requeued job's output follows the earlier one's


LISTENER = """
import signal, sys, time
from scbch_dist import cli
caught = []
signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
print("warned before", cli.warned_before_start(), flush=True)
deadline = time.monotonic() + 60
while not caught and time.monotonic() < deadline:
    time.sleep(0.01)
print("caught", bool(caught), flush=True)
"""


@pytest.mark.parametrize("folder", ["writable", "missing"])
def test_the_relay_passes_a_warning_on_only_once_the_command_listens(tmp_path, folder):
    """The relay's lines run by bash as a batch script would. A warning while the command is still a
    shell that would die of SIGUSR1 (what srun starts, before its ``trap "" USR1``) is kept in the
    file, not passed on, and the Python that follows reads it; a later warning reaches that Python as
    the signal. Before, the first warning was passed on at once: the command died of it
    (status 138; under SLURM, ``srun: error: n1: task 0: User defined signal 1``). Where the
    script's folder is missing (no file, no .listening), a warning is passed on at once, as before."""
    import signal

    started, go = tmp_path / "started", tmp_path / "go"
    command = (f"bash -c ': > {started}; until [ -e {go} ]; do sleep 0.01; done; exec \"$0\" -c \"$1\"' "
               f"{sys.executable} {shlex.quote(LISTENER)}")
    (tmp_path / "job.sh").write_text("\n".join(["set -uo pipefail", *slurm.warning_relay(command)]) + "\n")
    scratch = tmp_path / ("scratch" if folder == "writable" else "gone")
    if folder == "writable":
        scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "SLURM_JOB_ID": "5", "SLURM_NODEID": "0", "PYTHONPATH": str(REPO)}
    env.pop("SCBCH_WARNING_FILE", None)
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:  # the relay's trap is set by now
            time.sleep(0.01)
        if folder == "writable":
            time.sleep(0.2)  # the script holds the command's pid by now (an empty one is never signalled)
            os.kill(job.pid, signal.SIGUSR1)  # the command waits for `go`, deaf to nothing
            while not list(scratch.glob("scbch-warning-5-*")) and time.monotonic() < deadline:
                time.sleep(0.01)
        go.touch()
        assert job.stdout.readline() == f"warned before {folder == 'writable'}\n"
        os.kill(job.pid, signal.SIGUSR1)  # it listens now: the signal itself
        assert job.stdout.readline() == "caught True\n"
        assert job.wait(timeout=60) == 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    if folder == "writable":
        assert list(scratch.iterdir()) == []  # the file and its .listening are gone
    else:
        assert "cannot tell the batch script that this process listens" in job.stderr.read()


def test_only_node_0_tells_the_batch_script_it_listens(tmp_path, monkeypatch):
    """The batch script runs on node 0: another node reads the warning file it may have, but leaves
    no .listening in its own folder, which nothing would read or remove; nor does a process without
    a handler (a stop request entered off the main thread)."""
    from scbch_dist import cli

    warned = tmp_path / "warned"
    monkeypatch.setenv("SCBCH_WARNING_FILE", str(warned))
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert not cli.warned_before_start() and list(tmp_path.iterdir()) == []
    warned.touch()
    assert cli.warned_before_start() and list(tmp_path.iterdir()) == [warned]
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert cli.warned_before_start(listening=False) and list(tmp_path.iterdir()) == [warned]  # no handler: says nothing
    assert cli.warned_before_start() and (tmp_path / "warned.listening").is_file()


CHILD = """
import pathlib, sys, time
run = pathlib.Path(sys.argv[1])
stop = run / "STOP"
while not stop.exists():
    time.sleep(0.01)
if sys.argv[2:] == ["checkpoint"]:  # what the trainer does: a checkpoint, then 75
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "latest").write_text("epoch-0002-step-000003\\n")
sys.exit(75)
"""


def supervised(tmp_path, monkeypatch, signum, *child_args: str, preempting: bool = False) -> tuple[int, list]:
    """``slurm.supervise`` of CHILD with ``signum`` sent to this process a second in (``preempting``:
    SLURM shows the job preempted); the status and the requeue commands it ran."""
    import signal
    import threading

    calls = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(slurm, "preempted", lambda env: preempting)
    env = {"SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "503", "SLURM_NODEID": "0"}
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signum)) if signum else None
    if timer:
        timer.start()
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    status = slurm.supervise([sys.executable, "-c", CHILD, str(tmp_path), *child_args], str(tmp_path), env)
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before  # the handlers are put back
    return status, calls


def test_the_launcher_turns_sigusr1_into_a_stop_and_requeues(tmp_path, monkeypatch):
    """SIGUSR1 (the time-limit warning) to the launcher writes RUN_DIR/STOP (the run's own process
    tree is left alone: a signal would kill the accelerate launcher before the checkpoint); the run
    wrote a newer checkpoint and ended with 75, so the task is requeued."""
    import signal

    status, calls = supervised(tmp_path, monkeypatch, signal.SIGUSR1, "checkpoint")
    assert status == 75 and (tmp_path / "STOP").exists()
    assert calls == [["scontrol", "requeue", "500_3"]]
    assert slurm.requeue_command({"SLURM_JOB_ID": "77"}) == ["scontrol", "requeue", "77"]
    assert slurm.requeue_command({}) is None


@pytest.mark.parametrize("how", ["signal while starting", "the batch shell's file"])
def test_a_warning_before_the_run_started_stops_it_at_its_start_and_requeues(tmp_path, monkeypatch, how):
    """SLURM can warn a job in its first second (it looks every 30 s, and the lead may reach past
    the start). A SIGUSR1 while the launcher is still starting (here: while it builds the command)
    is caught; one that came before it could catch anything was ignored (launch/slurm.sbatch starts
    it so) and is read from $SCBCH_WARNING_FILE. Either way the run finds RUN_DIR/STOP from its
    start, checkpoints, and the task is requeued. Before, the launcher died of the SIGUSR1 and the
    job FAILED."""
    import signal

    calls = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, check: calls.append(cmd))
    run_dir = tmp_path / "run"

    def command(*args, **kwargs):
        if how == "signal while starting":
            os.kill(os.getpid(), signal.SIGUSR1)
        return [sys.executable, "-c", CHILD, str(run_dir), "checkpoint"]

    monkeypatch.setattr(slurm, "accelerate_command", command)
    for key, value in {"SLURM_JOB_ID": "88", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SCBCH_WARNING_FILE", str(tmp_path / "warned"))
    if how == "the batch shell's file":
        (tmp_path / "warned").touch()
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ended:
        slurm.main(["--gpus-per-node", "0", "--run-dir", str(run_dir), "--"])
    assert ended.value.code == 75 and calls == [["scontrol", "requeue", "88"]]
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_a_run_whose_batch_script_was_warned_before_it_started_stops_and_asks_for_a_requeue(tmp_path, monkeypatch):
    """A sweep's array task is the trainer itself: a warning that came before its stop request
    caught SIGUSR1 (the task started deaf to it) is read from $SCBCH_WARNING_FILE, and the run stops
    after its first step asking for the requeue, as SIGUSR1 itself would. No file: no stop."""
    from scbch_dist.engine.stop import StopRequest

    monkeypatch.setenv("SCBCH_WARNING_FILE", str(tmp_path / "warned"))
    with StopRequest(tmp_path, is_main=True) as stop:
        assert not stop.local() and not stop.requeue
    (tmp_path / "warned").touch()
    with StopRequest(tmp_path, is_main=True) as stop:
        assert stop.local() and stop.requeue and stop.describe() == "SIGUSR1"


def test_the_launcher_catches_the_stop_signals_before_it_imports_torch():
    """What makes the catch above early: importing the launcher does not import torch (seconds)."""
    probe = "import sys, scbch_dist.experiments.slurm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", out


def test_the_launcher_requeues_after_sigterm_only_when_preempted(tmp_path, monkeypatch, capsys):
    """SIGTERM of a preemption (SLURM shows a PreemptTime): the stopped run would end inside the grace
    time and SLURM would not requeue it, so the launcher does. SIGTERM of scancel: no requeue."""
    import signal

    status, calls = supervised(tmp_path, monkeypatch, signal.SIGTERM, "checkpoint", preempting=True)
    assert status == 75 and calls == [["scontrol", "requeue", "500_3"]] and "preempted;" in capsys.readouterr().err
    (tmp_path / "STOP").unlink()
    status, calls = supervised(tmp_path, monkeypatch, signal.SIGTERM, "checkpoint")
    assert status == 75 and calls == [] and "not requeued" in capsys.readouterr().err


def test_the_launcher_does_not_requeue_after_a_stop_file_or_no_progress(tmp_path, monkeypatch, capsys):
    """A STOP written by hand: no requeue. SIGUSR1 when the run wrote no newer checkpoint than it
    started from (the warning came before any progress): no requeue, which would only repeat it."""
    import signal

    status, calls = supervised(tmp_path, monkeypatch, signal.SIGTERM, "checkpoint")
    assert status == 75 and calls == [] and "not requeued" in capsys.readouterr().err
    (tmp_path / "STOP").touch()
    assert supervised(tmp_path, monkeypatch, None, "checkpoint") == (75, [])
    (tmp_path / "STOP").unlink()  # the trainer removes it when it has served
    status, calls = supervised(tmp_path, monkeypatch, signal.SIGUSR1, "checkpoint")  # the same checkpoint again
    assert status == 75 and calls == [] and "no checkpoint newer than the one it started from" in capsys.readouterr().err


def test_cpu_nodes_run_one_gloo_process_each(tmp_path):
    """No GPU on the node: accelerate's CPU config, one process a node, the task's CPUs as threads;
    one CPU node in all: the trainer itself, without a launcher."""
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_CPUS_ON_NODE": "4"}
    cmd = accelerate_command(env, 0, ["--config", "c.yaml"], run_dir=str(tmp_path / "r"))
    text = " ".join(cmd)
    assert cmd[cmd.index("--config_file") + 1].endswith("configs/accelerate/cpu_2proc.yaml")
    assert "--num_cpu_threads_per_process 4 --num_machines 2 --machine_rank 1 --num_processes 2" in text
    assert "--main_process_ip n1" in text
    cmd = accelerate_command({**env, "SLURM_NNODES": "1", "SLURM_NODEID": "0"}, 0, ["--config", "c.yaml"],
                             run_dir=str(tmp_path / "r"), python="py")
    assert cmd[:4] == ["py", "-m", "scbch_dist.train", "--config"]
    assert slurm.node_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 4 and slurm.node_gpus({"SLURM_GPUS_PER_NODE": "a100:8"}) == 8


@pytest.mark.parametrize("env, args, expected", [
    ({"SLURM_NNODES": "x"}, ["--gpus-per-node", "1"], "SLURM_NNODES='x' is not a whole number >= 1"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "2"}, ["--gpus-per-node", "1"], "SLURM_NODEID=2 is not below SLURM_NNODES=2"),
    ({}, ["--gpus-per-node", "-1"], "--gpus-per-node -1: give 0 (one CPU process a node) or more"),
    ({"SLURM_GPUS_ON_NODE": "many"}, [], "SLURM_GPUS_ON_NODE='many': cannot read a GPU count"),
    ({"SLURM_CPUS_ON_NODE": "0"}, ["--gpus-per-node", "0"], "SLURM_CPUS_ON_NODE='0' is not a whole number >= 1"),
])
def test_bad_slurm_settings_are_one_line(capsys, monkeypatch, tmp_path, env, args, expected):
    from conftest import one_line_exit

    for key in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_CPUS_PER_TASK",
                "SLURM_CPUS_ON_NODE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    line = one_line_exit(capsys, slurm.main, [*args, "--dry-run", "--run-dir", str(tmp_path / "r"), "--"])
    assert expected in line


@pytest.mark.slow
def test_accelerate_config_for_two_cpu_processes(tiny_dataset, tmp_path):
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    run_dir = tmp_path / "acc2"
    sets = [f"data.root={tiny_dataset}", "data.generate=", f"run.dir={run_dir}", "model.bits=16", "model.hidden=32",
            "train.batch_size=64", "train.epochs=2", "eval.every=2", "scbch.warmup_epochs=1", "scbch.k=5",
            "run.progress=false", "run.tensorboard=false"]
    cmd = [exe, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
           "--main_process_port", "0", "-m", "scbch_dist.train", *[a for s in sets for a in ("--set", s)]]
    proc = launch(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["run"]["world_size"] == 2


def test_dry_run_prints_a_command_that_reads_back_as_given(tmp_path, monkeypatch, capsys):
    """Nothing is joined into a shell string by hand: odd train arguments survive the printed command."""
    import shlex

    env = {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    odd = ["--config", "my configs/x $(id).yaml", "--set", "run.method=it's `x`; y"]
    run_dir = str(tmp_path / "run dir")
    slurm.main(["--dry-run", "--gpus-per-node", "2", "--run-dir", run_dir, "--", *odd])
    printed = shlex.split(capsys.readouterr().out)
    assert printed[printed.index("scbch_dist.train") + 1:] == [*odd, "--set", f"run.dir={run_dir}",
                                                               "--set", "run.progress=false"]


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_two_processes_on_one(tiny_dataset, tmp_path):
    """Multi-node without SLURM (docs/distributed.md): ``torchrun --nnodes 2 --node_rank {0,1}``
    with a c10d rendezvous, both launched on this machine, end with the codes and summary of
    ``torchrun --standalone --nproc_per_node 2`` bit for bit (one thread a process)."""
    import socket

    import numpy as np

    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    sets = [f"data.root={tiny_dataset}", "data.generate=", "model.bits=16", "model.hidden=32", "train.batch_size=64",
            "train.epochs=3", "eval.every=3", "scbch.warmup_epochs=1", "scbch.k=5", "run.progress=false",
            "run.tensorboard=false", "train.mixed_precision=no"]
    args = lambda run_dir: ["-m", "scbch_dist.train", *[a for s in [*sets, f"run.dir={run_dir}"] for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([exe, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t",
                               *args(tmp_path / "nodes")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    proc = launch([exe, "--standalone", "--nproc_per_node", "2", *args(tmp_path / "one")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "nodes" / "codes.npz") as a, np.load(tmp_path / "one" / "codes.npz") as b:
        for k in ("query_img", "query_txt", "database_img", "database_txt"):
            assert np.array_equal(a[k], b[k]), k
    finals = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("nodes", "one")]
    assert finals[0]["run"]["world_size"] == 2 and finals[0]["final"] == finals[1]["final"]

"""Errors under a launcher, and the file-system safety net (docs/engine.md, "Errors and exit codes";
docs/distributed.md, "Errors under a launcher"): rank 0 alone prints a known error as one line,
every rank exits with the same status and leaves the line in the launcher's failure report, no
worker prints a traceback for it; a GPU launcher config on a machine without GPUs is refused in
one line; an OSError in which the file system refuses the run is one line naming the file."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch
from scbch_dist import cli, dist
from scbch_dist.config import ConfigError
from scbch_dist.engine import setup
from scbch_dist.errors import Preempted, ScbchError
from scbch_dist.train import main

PROG = "python -m scbch_dist.train"
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def exits(capsys, fn, prog: str = "prog") -> tuple[int, list[str]]:
    """``cli.run(fn)``: its exit status and its stderr lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(fn, prog)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def raises(error: BaseException):
    def fn():
        raise error
    return fn


# --- one rank reports ---------------------------------------------------------------------------

def test_rank_zero_prints_the_others_leave_the_line_to_the_launcher(capsys, monkeypatch, tmp_path):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(cli, "RANK_ZERO_GRACE_S", 0)
    for rank, printed in [("0", ["prog: error: data.root: bad"]), ("1", [])]:
        monkeypatch.setenv("RANK", rank)
        error_file.unlink(missing_ok=True)
        assert exits(capsys, raises(ConfigError("data.root: bad"))) == (2, printed)
        # what torchrun's report shows for this rank, in place of a link to its docs
        assert json.loads(error_file.read_text())["message"]["message"] == "prog: error: data.root: bad"
    for rank, printed in [("0", ["prog: stopped after epoch 3"]), ("1", [])]:
        monkeypatch.setenv("RANK", rank)
        assert exits(capsys, raises(Preempted("stopped after epoch 3"))) == (75, printed)


def test_another_rank_waits_for_the_launcher_to_stop_it_and_keeps_its_status(capsys, monkeypatch, tmp_path):
    """So that rank 0, slower to the same error, is not stopped before it prints."""
    import signal
    import threading

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "RANK_ZERO_GRACE_S", 60)
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()  # the launcher, once rank 0 failed
    try:
        assert exits(capsys, raises(ConfigError("x"))) == (2, [])
        # after a preemption no rank waits: the scheduler's time is short
        sleeps = []
        monkeypatch.setattr(cli.time, "sleep", sleeps.append)
        assert exits(capsys, raises(Preempted("stopped after epoch 3"))) == (75, []) and sleeps == []
    finally:
        signal.signal(signal.SIGTERM, before)


def test_another_rank_prints_where_no_launcher_report_would_show_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert exits(capsys, raises(ConfigError("x"))) == (2, ["prog: error: x"])
    # an error file that cannot be written: the rank prints its line itself
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "missing" / "error.json"))
    assert exits(capsys, raises(ConfigError("x"))) == (2, ["prog: error: x"])


def test_the_rank_comes_from_the_launcher_until_a_process_group_is_up(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert cli.launch_rank() == 3
    monkeypatch.setenv("RANK", "not a number")
    assert cli.launch_rank() == 0
    monkeypatch.delenv("RANK")
    assert cli.launch_rank() == 0


def test_raise_together_in_one_process():
    dist.raise_together(None, "elsewhere")  # nothing held: returns
    with pytest.raises(ConfigError, match="^mine$"):
        dist.raise_together(ConfigError("mine"), "elsewhere")
    assert issubclass(dist.ReportedElsewhere, ScbchError)  # one line and status 2, never a traceback


# --- the file-system net ------------------------------------------------------------------------

def test_file_system_refusals_are_one_line_naming_the_file(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # real errors, as the system raises them
    assert exits(capsys, lambda: open(blocker / "run" / "log.txt", "w")) == \
        (2, [f"prog: error: {blocker / 'run' / 'log.txt'}: Not a directory"])
    assert exits(capsys, lambda: blocker.mkdir(parents=True, exist_ok=True)) == \
        (2, [f"prog: error: {blocker}: File exists and is not a folder"])
    assert exits(capsys, lambda: os.rename(tmp_path / "gone", tmp_path / "new")) == \
        (2, [f"prog: error: {tmp_path / 'gone'} -> {tmp_path / 'new'}: No such file or directory"])
    # a full disk: a write to an open file names none
    assert exits(capsys, raises(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))) == \
        (2, [f"prog: error: {os.strerror(errno.ENOSPC)} (ENOSPC; the system named no file)"])
    assert exits(capsys, raises(OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run"))) == \
        (2, [f"prog: error: /mnt/ro/run: {os.strerror(errno.EROFS)}"])


def test_other_errors_keep_their_traceback(capsys):
    for error in (OSError(errno.EIO, "Input/output error", "/x"), OSError("no errno"), ConnectionRefusedError(
            errno.ECONNREFUSED, "refused"), RuntimeError("a bug")):
        with pytest.raises(type(error)):
            cli.run(raises(error), "prog")
    assert capsys.readouterr().err == ""


# --- a GPU launcher config on a machine without GPUs --------------------------------------------

GPU_CONFIG = "accelerate_config.yaml"
CPU_CONFIG = "configs/accelerate/cpu_2proc.yaml"


def test_a_gpu_launch_config_is_refused_without_gpus():
    refusal = setup.gpu_launch_without_gpus(["--config_file", GPU_CONFIG, "-m", "scbch_dist.train", "--set", "a=1"],
                                            str(REPO), cuda=False)
    assert refusal.startswith(f"{GPU_CONFIG}: distributed_type: MULTI_GPU with use_cpu: false asks for GPUs and this "
                              "machine has none; on CPUs launch with `torchrun --standalone --nproc_per_node 2")
    assert f"--config_file {CPU_CONFIG}" in refusal and "\n" not in refusal
    # either spelling of the option, as accelerate parses it
    assert setup.gpu_launch_without_gpus([f"--config-file={GPU_CONFIG}", "x.py"], str(REPO), cuda=False) == refusal
    assert setup.gpu_launch_without_gpus(["--multi_gpu", "--num_processes", "2", "x.py"], str(REPO), cuda=False) \
        .startswith("accelerate launch --multi_gpu asks for GPUs")
    for args, cuda in [([GPU_CONFIG], True),  # the machine has them
                       ([CPU_CONFIG], False),  # use_cpu: true
                       (["--cpu", "--config_file", GPU_CONFIG], False),  # --cpu overrides the file
                       (["--config_file", "nowhere.yaml"], False)]:  # accelerate's own error, not ours
        args = args if args[0].startswith("--") else ["--config_file", *args]
        assert setup.gpu_launch_without_gpus([*args, "-m", "scbch_dist.train"], str(REPO), cuda=cuda) is None, args


def test_accelerates_cpu_switch_in_the_environment_passes(monkeypatch):
    """ACCELERATE_USE_CPU=true (Accelerate's switch for CPU, which its workers honour) with
    --multi_gpu or a GPU config trains on the CPU; it was refused as asking for GPUs."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    for args in (["--multi_gpu", "--num_processes", "2"], ["--config_file", GPU_CONFIG]):
        assert setup.gpu_launch_without_gpus([*args, "-m", "scbch_dist.train"], str(REPO), cuda=False) is None, args
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert setup.gpu_launch_without_gpus(["--multi_gpu", "x.py"], str(REPO), cuda=False) is not None


def test_the_trainer_refuses_it_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(setup, "accelerate_launch_args", lambda: (["--config_file", GPU_CONFIG, "-m", "x"], str(REPO)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = exits(capsys, lambda: main(["--set", f"run.dir={tmp_path / 'run'}"]), PROG)
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"{PROG}: error: {GPU_CONFIG}: distributed_type: MULTI_GPU with use_cpu: false")
    assert not (tmp_path / "run").exists()


FAKE_ACCELERATE = """
import subprocess, sys
# stands in for `accelerate launch`: its command line is what the worker reads
sys.exit(subprocess.call([sys.executable, "-m", "scbch_dist.train", *sys.argv[sys.argv.index("scbch_dist.train") + 1:]]))
"""


@pytest.mark.slow
def test_a_worker_finds_the_config_of_the_accelerate_launch_that_started_it(tmp_path):
    """One worker at a time under a stand-in launcher, with the environment accelerate's
    multi-process launcher gives (it passes neither distributed_type nor use_cpu)."""
    launcher = tmp_path / "accelerate"
    launcher.write_text(FAKE_ACCELERATE)
    sets = ["--set", f"run.dir={tmp_path / 'run'}", "--set", f"data.root={tmp_path / 'nodata'}", "--set", "data.generate="]
    env = {**CPU_ENV, "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "8",
           "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}

    def worker(rank: int, config: str, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(launcher), "launch", "--config_file", config, "-m", "scbch_dist.train",
                               *sets], cwd=REPO, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), **extra},
                              capture_output=True, text=True, timeout=300)

    rank0 = worker(0, GPU_CONFIG)
    assert rank0.returncode == 2
    assert rank0.stderr.startswith(f"{PROG}: error: {GPU_CONFIG}: distributed_type: MULTI_GPU with use_cpu: false")
    assert rank0.stderr.count("\n") == 1
    error_file = tmp_path / "error.json"
    rank1 = worker(1, GPU_CONFIG, TORCHELASTIC_ERROR_FILE=str(error_file))
    assert (rank1.returncode, rank1.stderr) == (2, "")
    assert json.loads(error_file.read_text())["message"]["message"] == rank0.stderr.strip()
    # the CPU config passes the check: one process (no RANK) then stops at the missing dataset
    cpu = subprocess.run([sys.executable, str(launcher), "launch", "--config_file", CPU_CONFIG, "-m", "scbch_dist.train",
                          *sets], cwd=REPO, env={**CPU_ENV, "ACCELERATE_DYNAMO_BACKEND": "NO"}, capture_output=True,
                         text=True, timeout=300)
    assert cpu.returncode == 2 and "distributed_type" not in cpu.stderr and "nodata" in cpu.stderr, cpu.stderr


# --- under the real launchers -------------------------------------------------------------------

def launcher(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(args[0], path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{args[0]} not installed")
    return launch([exe, *args[1:]], env=CPU_ENV)


def assert_reported_once(proc: subprocess.CompletedProcess, prog: str = PROG) -> str:
    """Exactly one line of ours, from rank 0; no worker traceback; the launcher's report shows the
    failed ranks with our lines (their status 2, or -15 where the launcher stopped them first)."""
    lines = proc.stderr.splitlines()
    ours = [line for line in lines if line.startswith(f"{prog}:")]
    assert len(ours) == 1, proc.stderr
    assert not any(line.startswith("[rank") for line in lines), proc.stderr
    assert f'File "{REPO / "scbch_dist"}' not in proc.stderr and "File \"<frozen runpy>\"" not in proc.stderr
    assert proc.returncode == 1  # torchrun's own status when a worker fails (its ChildFailedError)
    statuses = {line.split(":", 1)[1].split()[0] for line in lines if line.strip().startswith("exitcode  :")}
    assert statuses and statuses <= {"2", "-15"} and "2" in statuses, proc.stderr
    assert f"  traceback : {ours[0]}" in proc.stderr  # rank 0's line, in the launcher's report
    return ours[0]


@pytest.mark.slow
def test_torchrun_a_config_error_is_one_line(tmp_path):
    proc = launcher("torchrun", "--standalone", "--nproc_per_node", "2", "-m", "scbch_dist.train",
                    "--set", "eval.batch_size=0", "--set", f"run.dir={tmp_path / 'run'}")
    assert assert_reported_once(proc) == f"{PROG}: error: eval.batch_size must be at least 1, got 0"


@pytest.mark.slow
def test_torchrun_a_refused_run_folder_is_one_line(tiny_dataset, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.yaml").write_text("model:\n  bits: 16\n")
    (held / "metrics.jsonl").write_text('{"epoch": 1}\n')
    proc = launcher("torchrun", "--standalone", "--nproc_per_node", "2", "-m", "scbch_dist.train",
                    "--set", f"run.dir={held}", "--set", f"data.root={tiny_dataset}", "--set", "data.generate=")
    line = assert_reported_once(proc)
    assert line.startswith(f"{PROG}: error: {held}")
    # rank 1 learnt of the refusal through raise_together and said so only in the report
    assert f"  traceback : {PROG}: error: the main process refused {held}" in proc.stderr


RANK_ONE_ONLY = """
import torch.distributed as d
from scbch_dist import cli, dist
from scbch_dist.data.format import ShardError

d.init_process_group("gloo")
error = ShardError("train-000003.tar: sample 17 has no label") if d.get_rank() == 1 else None
cli.run(lambda: dist.raise_together(error, "another process found a problem"), "prog")
"""


@pytest.mark.slow
def test_an_error_on_another_rank_is_printed_by_rank_zero(tmp_path):
    script = tmp_path / "rank_one_only.py"
    script.write_text(textwrap.dedent(RANK_ONE_ONLY))
    proc = launcher("torchrun", "--standalone", "--nproc_per_node", "2", str(script))
    assert assert_reported_once(proc, "prog") == "prog: error: train-000003.tar: sample 17 has no label"


@pytest.mark.slow
def test_accelerate_launch_of_the_gpu_config_without_gpus_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU: the config is right for it")
    proc = launcher("accelerate", "launch", "--config_file", GPU_CONFIG, "--main_process_port", "0",
                    "-m", "scbch_dist.train", "--set", f"run.dir={tmp_path / 'run'}",
                    "--set", f"data.root={tmp_path / 'data'}")
    line = assert_reported_once(proc)
    assert line.startswith(f"{PROG}: error: {GPU_CONFIG}: distributed_type: MULTI_GPU with use_cpu: false asks for "
                           "GPUs and this machine has none; on CPUs launch with `torchrun")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


# --- the file-system net, end to end --------------------------------------------------------------

def train(*sets: str, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # a file-size limit: writes fail with EFBIG, as on a full disk, even for root
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", "scbch_dist.train", *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, env=CPU_ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if limit_file_size else None)


@pytest.mark.slow
def test_a_path_the_run_cannot_write_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = train(f"run.dir={tmp_path / 'run'}", f"data.root={blocker / 'data'}", "data.generate=synthetic")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"{PROG}: error: {blocker}"), proc.stderr
    assert "Traceback" not in proc.stderr

    proc = train(f"run.dir={tmp_path / 'run2'}", f"data.root={tmp_path / 'data'}", "data.generate=synthetic",
                 limit_file_size=200_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"{PROG}: error: {os.strerror(errno.EFBIG)} (EFBIG; the system named no file)"


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line(tmp_path):
    """Skipped where the mode does not stop writes (root); as root, run it without the capability:
    setpriv --bounding-set=-dac_override,-dac_read_search .venv/bin/python -m pytest -k read_only ..."""
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        try:
            (parent / "probe").touch()
            pytest.skip("this user writes into a folder of mode 0555 (root with CAP_DAC_OVERRIDE)")
        except PermissionError:
            pass
        proc = train(f"run.dir={parent / 'run'}")
        data = train(f"run.dir={tmp_path / 'run'}", f"data.root={parent / 'data'}", "data.generate=synthetic")
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"{PROG}: error: {parent / 'run'}"), proc.stderr
    # the dataset writer has no message of its own for it: the net names the file it was making
    assert data.returncode == 2 and "Traceback" not in data.stderr, data.stderr
    line = data.stderr.splitlines()[-1]
    assert line.startswith(f"{PROG}: error: {parent}/") and line.endswith(": Permission denied"), data.stderr


def test_a_worker_of_a_multi_process_launch_skips_the_interpreter_teardown(monkeypatch):
    """Gloo's worker threads may free a collective's tensor during the teardown, which aborted a
    finished run's process (SIGABRT) in 8 of 270 two-process runs; a worker leaves by os._exit
    after flushing, with its status, and a single process exits as usual."""
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)  # pytest's own log handlers stay open
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cli.run(lambda: None, "prog")
    assert exits == [0]
    monkeypatch.setattr(cli, "RANK_ZERO_GRACE_S", 0)
    cli.run(raises(ConfigError("x")), "prog")
    assert exits == [0, 2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli.run(lambda: None, "prog")
    with pytest.raises(SystemExit):
        cli.run(raises(ConfigError("x")), "prog")
    assert exits == [0, 2]


def test_a_hung_launch_fails_with_the_stacks_of_its_processes():
    """conftest.launch on a launcher whose worker never ends: the worker (under cli.run) prints its
    threads' stacks on SIGUSR2, and the test fails with them instead of a bare timeout."""
    worker = "import time; from scbch_dist import cli; cli.run(lambda: time.sleep(120))"
    parent = f"import subprocess, sys; subprocess.call([sys.executable, '-c', {worker!r}])"
    with pytest.raises(pytest.fail.Exception) as failed:
        launch([sys.executable, "-c", parent], timeout=5)
    message = str(failed.value)
    assert "still running after 5 s" in message
    assert "Current thread" in message and "<lambda>" in message, message[-2000:]

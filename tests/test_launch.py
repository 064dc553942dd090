"""Launchers: the SLURM command resolution (dry runs) and the 2-CPU-process accelerate config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    assert "trap 'kill -USR1 \"$SRUN\"" in text  # the batch shell hands the signal to srun


CHILD = """
import pathlib, sys, time
stop = pathlib.Path(sys.argv[1]) / "STOP"
while not stop.exists():
    time.sleep(0.01)
sys.exit(75)  # what the trainer does: a checkpoint, then 75
"""


def test_the_launcher_turns_a_signal_into_a_stop_and_requeues(tmp_path, monkeypatch):
    """SIGUSR1 to the launcher writes RUN_DIR/STOP (the run's own process tree is left alone: a
    signal would kill the accelerate launcher before the checkpoint); status 75 requeues the task."""
    import signal
    import threading

    calls = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, check: calls.append(cmd))
    env = {"SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "503", "SLURM_NODEID": "0"}
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
    before = signal.getsignal(signal.SIGUSR1)
    status = slurm.supervise([sys.executable, "-c", CHILD, str(tmp_path)], str(tmp_path), env)
    assert status == 75 and (tmp_path / "STOP").exists()
    assert calls == [["scontrol", "requeue", "500_3"]]
    assert signal.getsignal(signal.SIGUSR1) == before  # the handlers are put back
    assert slurm.requeue_command({"SLURM_JOB_ID": "77"}) == ["scontrol", "requeue", "77"]
    # a STOP written by hand ends the run without a requeue
    calls.clear()
    (tmp_path / "STOP").touch()
    assert slurm.supervise([sys.executable, "-c", CHILD, str(tmp_path)], str(tmp_path), env) == 75 and calls == []
    assert slurm.requeue_command({}) is None


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

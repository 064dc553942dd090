"""Preemption (docs/engine.md, "Preemption"): SIGTERM, SIGUSR1 or a STOP file ends a run after
its current step with a checkpoint inside the epoch, and the resumed run ends exactly where an
uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_checkpoint, stop_after_step, tiny_args, torchrun
from scbch_dist.engine import loop, stop
from scbch_dist.errors import Preempted, RunDirError
from scbch_dist.train import main

pytestmark = pytest.mark.slow

SETTINGS = ("train.epochs=4", "eval.every=2", "run.tensorboard=false")
SCBCH = ("scbch.warmup_epochs=1",)
CASES = {"scbch-memory": (*SCBCH, "bank.refresh=memory"),  # the memory bank: rows written by every step
         "nacd": ("method.name=nacd", "data.noise=redundant:1.0", "nacd.warmup_epochs=1"),  # per-batch EMA table
         # loader workers that persist over epochs: the resumed run's start at epoch 2, mid-epoch
         "scbch-workers": (*SCBCH, "data.workers=2")}


def assert_same_run(a: Path, b: Path) -> None:
    model_a, tables_a, state_a = read_checkpoint(a)
    model_b, tables_b, state_b = read_checkpoint(b)
    for k in model_a:
        torch.testing.assert_close(model_b[k], model_a[k], rtol=0, atol=1e-6, msg=k)
    for k in tables_a:
        torch.testing.assert_close(tables_b[k], tables_a[k], rtol=0, atol=1e-6, msg=k)
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]  # no epoch recorded twice
    full = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    for r, f in zip(records, full):  # the interrupted epoch's mean loss included
        assert r["loss"] == pytest.approx(f["loss"], abs=1e-9)


@pytest.mark.parametrize("case, how", [("scbch-memory", "SIGTERM"), ("nacd", "STOP"), ("scbch-workers", "STOP")])
def test_a_run_stopped_inside_an_epoch_resumes_exactly(tiny_dataset, tmp_path, monkeypatch, case, how):
    full, part = tmp_path / "full", tmp_path / "part"
    summary = main(tiny_args(tiny_dataset, full, *SETTINGS, *CASES[case]))
    stop_after_step(monkeypatch, 20, how, part)  # 13 steps per epoch: step 7 of epoch 2
    with pytest.raises(Preempted, match=rf"^stopped by {'SIGTERM' if how == 'SIGTERM' else part / 'STOP'} after step 7 "
                                        rf"of epoch 2; checkpoint written; continue with --resume {part}$"):
        main(tiny_args(tiny_dataset, part, *SETTINGS, *CASES[case]))
    assert (part / "checkpoints" / "latest").read_text().strip() == "epoch-0001-step-000007"
    assert not (part / "run.lock").exists()
    monkeypatch.undo()
    resumed = main(["--resume", str(part)])
    assert_same_run(full, part)
    assert resumed["final"]["avg_map"] == summary["final"]["avg_map"]
    assert "continuing epoch 2 after step 7 of 13" in (part / "log.txt").read_text()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT])
def test_sigusr1_stops_the_command_with_status_75_and_a_second_run_is_refused_meanwhile(tiny_dataset, tmp_path, signum):
    """SLURM's warning signal, or Ctrl-C (SIGINT), ends the command with a checkpoint and status 75
    (Ctrl-C, before: a KeyboardInterrupt traceback from inside backward, status 130, the epoch
    lost); while it runs, the folder is locked (two runs on one run.dir interleaved their metrics before)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scbch_dist.train", *tiny_args(tiny_dataset, run_dir, "train.epochs=200",
                                                                 "eval.every=100", "run.tensorboard=false")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunDirError, match=rf"^{run_dir} is in use by pid {proc.pid} on "):
        main(tiny_args(tiny_dataset, run_dir, "train.epochs=2"))
    with pytest.raises(RunDirError, match=rf"^{run_dir} is in use by pid {proc.pid} on "):
        main(["--resume", str(run_dir)])
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"python -m scbch_dist.train: stopped by {signum.name} after ") and last.endswith(
        f"checkpoint written; continue with --resume {run_dir}")
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = main(["--resume", str(run_dir), "--set", f"train.epochs={epochs[-1] + 1}"])
    assert summary["final"]["epoch"] == epochs[-1] + 1
    records = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, epochs[-1] + 2))


def test_a_crash_between_the_records_and_the_checkpoint_repeats_no_epoch(tiny_dataset, tmp_path, monkeypatch):
    """Killed after epoch 3 was recorded (metrics.jsonl, log.txt) but before its checkpoint counted,
    and in the middle of writing a checkpoint file: the resume cuts the records back and removes
    the unfinished files."""
    full, part = tmp_path / "full", tmp_path / "part"
    main(tiny_args(tiny_dataset, full, *SETTINGS, *SCBCH))
    save_checkpoint = loop.save_checkpoint

    def killed_while_writing_epoch_3(accelerator, run_dir, state, *args):
        if state.epoch == 3:
            folder = run_dir / "checkpoints" / "epoch-0003"
            folder.mkdir()
            (folder / ".model.safetensors.x.tmp").write_bytes(b"\0" * 1000)
            raise KeyboardInterrupt
        return save_checkpoint(accelerator, run_dir, state, *args)

    monkeypatch.setattr(loop, "save_checkpoint", killed_while_writing_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tiny_dataset, part, *SETTINGS, *SCBCH))
    monkeypatch.undo()
    assert [json.loads(x)["epoch"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    main(["--resume", str(part)])
    assert_same_run(full, part)
    log = (part / "log.txt").read_text()
    assert log.count("| epoch 3/4 |") == 1 and log.count("| epoch 2/4 |") == 1
    # the unfinished epoch-0003 was replaced by the resumed run's own; the newest two are kept (run.keep_checkpoints)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["epoch-0003", "epoch-0004", "latest"]


def test_two_processes_stopped_on_one_rank_resume_exactly(tiny_dataset, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step, each writes its part of
    the epoch, and the resumed pair ends where an uninterrupted pair ends."""
    script = str(REPO / "tests" / "dist_scripts" / "preempted_train.py")
    settings = (*SETTINGS, *CASES["nacd"])
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(script, "0", "0", *tiny_args(tiny_dataset, full, *settings))
    torchrun(script, "20", "1", *tiny_args(tiny_dataset, part, *settings))  # 13 steps per epoch per rank
    assert (part / "checkpoints" / "latest").read_text().strip() == "epoch-0001-step-000007"
    assert {p.name for p in (part / "checkpoints" / "epoch-0001-step-000007").glob("rank-*")} == {
        "rank-0.safetensors", "rank-1.safetensors"}
    torchrun(script, "0", "0", "--resume", str(part))
    assert_same_run(full, part)


def test_a_stop_between_checkpoints_every_n_epochs_still_writes_one(tiny_dataset, tmp_path, monkeypatch):
    """run.checkpoint_every=3: a stop request in epoch 2 (no checkpoint due until epoch 3) writes
    its checkpoint all the same, and the resumed run ends as the uninterrupted one."""
    every = (*SETTINGS, *SCBCH, "run.checkpoint_every=3")
    main(tiny_args(tiny_dataset, tmp_path / "full", *every))
    stop_after_step(monkeypatch, 20, "STOP", tmp_path / "part")  # 13 steps an epoch: inside epoch 2
    with pytest.raises(Preempted, match="after step 7 of epoch 2"):
        main(tiny_args(tiny_dataset, tmp_path / "part", *every))
    monkeypatch.undo()
    main(["--resume", str(tmp_path / "part")])
    assert_same_run(tmp_path / "full", tmp_path / "part")


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, capfd):
    """The first Ctrl-C asks for a stop after the step (said once, on stderr); the second raises
    KeyboardInterrupt, which every entry point ends with one line and status 130, no traceback."""
    from scbch_dist import cli

    with stop.StopRequest(tmp_path, is_main=True) as request:
        request._handle(signal.SIGINT, None)
        assert request.reason == "SIGINT" and request.local() and not request.requeue
        with pytest.raises(KeyboardInterrupt):
            request._handle(signal.SIGINT, None)
    assert "press it again to stop at once" in capfd.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        cli.run(interrupted, "prog")
    assert exit_info.value.code == 130
    assert capfd.readouterr().err.strip().splitlines() == ["prog: interrupted (Ctrl-C)"]

"""A run folder belongs to one run (docs/engine.md, "The run folder"): the lock, the refusals of
a fresh run into a used folder and of a resume with other settings, the cut-back of the outputs
to the checkpoint, the removal of crash leftovers, and output modes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scbch_dist.config import load_config, save_config, to_dict
from scbch_dist.engine import rundir
from scbch_dist.digests import write_manifest
from scbch_dist.engine.checkpoint import FORMAT
from scbch_dist.errors import RunDirError
from scbch_dist.atomic import atomic_directory, atomic_save_npy, atomic_write_text

LOG = logging.getLogger("test_rundir")


def fake_run(run_dir: Path, *sets: str, epoch: int = 2, log_bytes: int | None = None) -> dict:
    """A run folder as a finished run leaves it: config.yaml, outputs and a checkpoint's run state."""
    cfg = load_config(None, [f"run.dir={run_dir}", *sets])
    save_config(cfg, run_dir / "config.yaml")
    folder = run_dir / "checkpoints" / f"epoch-{epoch:04d}"
    folder.mkdir(parents=True)
    state = {"epoch": epoch, "log_bytes": log_bytes}
    (folder / "run_state.json").write_text(json.dumps({"format": FORMAT, "state": state, "config": to_dict(cfg)}))
    write_manifest(folder)  # a sealed config.yaml: this version's folder, whose checkpoints carry a manifest
    (run_dir / "checkpoints" / "latest").write_text(folder.name + "\n")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, epoch + 1)))
    return to_dict(cfg)


def lock_of(pid: int, host: str | None = None, **extra) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier", **extra})


def test_a_live_lock_is_refused_naming_its_holder(tmp_path):
    (tmp_path / "run.lock").write_text(lock_of(os.getppid(), slurm_job=None))  # a process that runs
    with pytest.raises(RunDirError, match=rf"^{tmp_path} is in use by pid {os.getppid()} on {socket.gethostname()}, "
                                          rf"started earlier; wait for that run, or remove {tmp_path}/run.lock if it is gone$"):
        rundir.RunLock(tmp_path).acquire()
    other_host = lock_of(1, "gpu-node-17")
    (tmp_path / "run.lock").write_text(other_host)  # pid 1 elsewhere: this machine cannot tell, so it waits
    with pytest.raises(RunDirError, match="in use by pid 1 on gpu-node-17"):
        rundir.RunLock(tmp_path).acquire()


def test_a_stale_lock_is_replaced_and_named(tmp_path, caplog):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    (tmp_path / "run.lock").write_text(lock_of(dead))
    with caplog.at_level(logging.WARNING, logger="test_rundir"):
        with rundir.RunLock(tmp_path, LOG) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"removing the stale lock of pid {dead} on {socket.gethostname()}" in caplog.text
    assert not (tmp_path / "run.lock").exists()  # released


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    (tmp_path / "run.lock").write_text(lock_of(1, "gpu-node-17", slurm_job="4242#0"))  # before the requeue
    with rundir.RunLock(tmp_path, LOG):
        pass
    for other in ("4243#0", "4242#1"):  # another job; a live run of this same incarnation elsewhere
        (tmp_path / "run.lock").write_text(lock_of(1, "gpu-node-17", slurm_job=other))
        with pytest.raises(RunDirError, match=f"SLURM job {other}"):
            rundir.RunLock(tmp_path).acquire()
    # on this host a live process keeps its lock, whatever its job says (two runs in one allocation)
    (tmp_path / "run.lock").write_text(lock_of(os.getppid(), slurm_job="4242#0"))
    with pytest.raises(RunDirError, match=f"in use by pid {os.getppid()}"):
        rundir.RunLock(tmp_path).acquire()


@pytest.mark.parametrize("pid", ['"abc"', "-1", "true", str(10**30), "0"])
def test_an_unreadable_lock_counts_as_held_for_a_minute(tmp_path, caplog, pid):
    """A pid no run writes (-1: every process to os.kill; 10**30: an OverflowError, which crashed all 8
    racing processes; true: pid 1, alive for ever) is an unreadable lock like any other."""
    lock = tmp_path / "run.lock"
    lock.write_text(f'{{"pid": {pid}, "host": "{socket.gethostname()}"}}')
    with pytest.raises(RunDirError, match="in use by pid \\? on \\?, started less than a minute ago"):
        rundir.RunLock(tmp_path).acquire()
    os.utime(lock, (0, 0))
    with caplog.at_level(logging.WARNING, logger="test_rundir"):
        rundir.RunLock(tmp_path, LOG).acquire()
    assert "removing an unreadable lock older than a minute" in caplog.text


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    cfg = load_config(None, [f"run.dir={run_dir}", "model.bits=32"])
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(RunDirError, match=rf"^{run_dir} holds another run \(summary.json, checkpoints, metrics.jsonl, "
                                          rf"config.yaml\); continue it with --resume {run_dir}, give this run another "
                                          r"run.dir, or delete that run with --overwrite$"):
        rundir.lock_and_prepare(run_dir, cfg, resume=False, overwrite=False, safe=rundir.SAFE_ON_RESUME, log=LOG)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # untouched, and the lock released
    assert load_config(run_dir / "config.yaml").model.bits == 64
    lock = rundir.lock_and_prepare(run_dir, cfg, resume=False, overwrite=True, safe=rundir.SAFE_ON_RESUME, log=LOG)
    lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
    assert load_config(run_dir / "config.yaml").model.bits == 32
    # a user's own file in the folder is never touched, and a folder holding one is refused
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "config.yaml").unlink()
    rundir.lock_and_prepare(run_dir, cfg, resume=False, overwrite=False, safe=rundir.SAFE_ON_RESUME, log=LOG).release()
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "figure1.png").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds another run \(plots, config.yaml\)"):
        rundir.lock_and_prepare(run_dir, cfg, resume=False, overwrite=False, safe=rundir.SAFE_ON_RESUME, log=LOG)
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "plots" / "figure1.png").is_file()


def test_a_fresh_run_that_fails_before_its_first_epoch_leaves_the_folder_free(tiny_dataset, tmp_path):
    from conftest import tiny_args
    from scbch_dist.config import ConfigError
    from scbch_dist.train import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="scbch.k=400 must be below the training count"):
        main(tiny_args(tiny_dataset, run_dir, "scbch.k=400"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # its config.yaml and log.txt went


@pytest.mark.parametrize("sets, changed", [
    (["data.noise=mixed:0.2"], "data.noise: 'none' -> 'mixed:0.2'"),
    (["train.seed=3", "scbch.margin=0.2"], "scbch.margin: 0.15 -> 0.2; train.seed: 0 -> 3"),
    (["model.bits=32"], "model.bits: 64 -> 32"),
])
def test_a_resume_with_other_settings_is_refused_naming_each_key(tmp_path, sets, changed):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    cfg = load_config(run_dir / "config.yaml", sets)
    with pytest.raises(RunDirError, match=rf"^--resume {run_dir}: the run was trained with other settings "
                                          rf"\({changed}\); a resume may change only train.epochs, "):
        rundir.lock_and_prepare(run_dir, cfg, resume=True, overwrite=False, safe=rundir.SAFE_ON_RESUME, log=LOG)
    assert not (run_dir / "run.lock").exists()
    assert load_config(run_dir / "config.yaml") == load_config(None, [f"run.dir={run_dir}"])  # not rewritten


def test_a_resume_may_change_the_safe_keys_but_nacd_keeps_its_schedule(tmp_path):
    from scbch_dist.methods import get_method

    run_dir = tmp_path / "run"
    fake_run(run_dir)
    cfg = load_config(run_dir / "config.yaml", ["train.epochs=80", "eval.every=2", "eval.topk=[10]",
                                                "run.progress=false", "run.method=SCBCH-long"])
    rundir.lock_and_prepare(run_dir, cfg, resume=True, overwrite=False, safe=rundir.safe_keys(get_method("scbch")), log=LOG).release()
    assert load_config(run_dir / "config.yaml").train.epochs == 80
    with pytest.raises(RunDirError, match=r"\(train.epochs: 50 -> 80\)"):
        rundir.lock_and_prepare(run_dir, cfg, resume=True, overwrite=False, safe=rundir.safe_keys(get_method("nacd")), log=LOG)


def test_a_resume_keeps_the_earlier_summary_aside_and_refuses_fewer_epochs(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, epoch=4)
    (run_dir / "summary.json").write_text('{"final": {"epoch": 4}}')
    with pytest.raises(RunDirError, match=rf"^--resume {run_dir}: train.epochs=3 is below the 4 epoch\(s\) this run "
                                          r"has begun; give train.epochs=4 or more$"):
        rundir.lock_and_prepare(run_dir, load_config(run_dir / "config.yaml", ["train.epochs=3"]), resume=True, overwrite=False,
                     safe=rundir.SAFE_ON_RESUME, log=LOG)
    assert rundir.launch_state(run_dir) == "done"
    cfg = load_config(run_dir / "config.yaml", ["train.epochs=6"])
    rundir.lock_and_prepare(run_dir, cfg, resume=True, overwrite=False, safe=rundir.SAFE_ON_RESUME, log=LOG).release()
    # the summary moves aside only once the resume has passed every check (train does it after
    # the checkpoint is loaded): a resume refused later leaves the run finished
    assert rundir.launch_state(run_dir) == "done"
    rundir.set_summary_aside(run_dir, 4, LOG)
    # an extension killed before its end is resumed by launchers, not taken for finished
    assert rundir.launch_state(run_dir) == "resume"
    assert json.loads((run_dir / "summary-epoch-0004.json").read_text()) == {"final": {"epoch": 4}}


def test_a_resume_cuts_metrics_and_log_back_to_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "log.txt").write_text("epoch 1\nepoch 2\n")
    fake_run(run_dir, epoch=2, log_bytes=len("epoch 1\nepoch 2\n"))
    with open(run_dir / "metrics.jsonl", "a") as f:  # epoch 3 recorded, killed before its checkpoint
        f.write(json.dumps({"epoch": 3}) + "\n" + '{"epoch": 4, "lo')
    with open(run_dir / "log.txt", "a") as f:
        f.write("epoch 3\n")
    cfg = load_config(run_dir / "config.yaml")
    rundir.lock_and_prepare(run_dir, cfg, resume=True, overwrite=False, safe=rundir.SAFE_ON_RESUME, log=LOG).release()
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run_dir / "log.txt").read_text() == "epoch 1\nepoch 2\n"


def test_crash_leftovers_are_removed(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    leftovers = [run_dir / "checkpoints" / ".model.safetensors.x1.tmp", run_dir / ".summary.json.y2.tmp",
                 run_dir / "checkpoints" / "epoch-0003", run_dir / "checkpoints" / "epoch-0002-step-000010",
                 run_dir / "STOP"]
    for path in leftovers:
        path.mkdir() if "epoch" in path.name else path.write_bytes(b"\0" * 100)
    assert sorted(rundir.remove_interrupted_writes(run_dir)) == sorted(leftovers[:-1])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0002", "latest"]
    assert (run_dir / "STOP").exists()  # a stop request may be meant for the run that starts: it serves it


def test_launchers_know_what_a_folder_needs(tmp_path):
    assert rundir.launch_state(tmp_path / "none") == "new"
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    assert rundir.launch_state(run_dir) == "done"
    (run_dir / "summary.json").unlink()
    assert rundir.launch_state(run_dir) == "resume"
    shutil.rmtree(run_dir / "checkpoints")
    assert rundir.launch_state(run_dir) == "restart"  # killed before its first checkpoint
    shutil.rmtree(run_dir)
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert rundir.launch_state(run_dir) == "new"  # no output of a run


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_npy(tmp_path / "b.npy", np.zeros(3))
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("y")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "b.npy").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_dataset_folder_is_on_disk_before_its_name_appears(tmp_path, monkeypatch):
    """Every file of a folder written with atomic_directory (a dataset: shards, meta.json) is
    fsynced before the rename that makes the folder visible."""
    import scbch_dist.atomic as io_module

    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(io_module.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(io_module.os, "rename", lambda a, b: renamed.append((len(synced), str(a))) or real_rename(a, b))
    with atomic_directory(tmp_path / "data") as tmp:
        (tmp / "train-000000.tar").write_bytes(b"x" * 10)
        (tmp / "meta.json").write_text("{}")
    (count, tmp_name), = renamed
    before = synced[:count]
    assert {f"{tmp_name}/train-000000.tar", f"{tmp_name}/meta.json", tmp_name} <= set(before)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_data_loader_leaves_the_training_rng_alone(tiny_dataset, workers):
    """A resume inside an epoch restores the RNG after the last step; the loader must not draw from
    it, neither when its workers start nor when they begin another epoch."""
    from scbch_dist.data.format import read_meta
    from scbch_dist.data.pipeline import TrainStream

    with TrainStream(root=tiny_dataset, meta=read_meta(tiny_dataset), batch_size=64, seed=0, workers=workers) as stream:
        torch.manual_seed(7)
        before = torch.get_rng_state()
        for epoch in range(2):
            assert sum(1 for _ in stream.epoch(epoch)) == stream.steps_per_epoch
            assert torch.equal(torch.get_rng_state(), before)


def test_a_table_checkpointed_inside_an_epoch_gives_back_each_ranks_view():
    """The agreed table plus this rank's own writes, replayed, is exactly the rank's table."""
    from scbch_dist.id_table import IdTable

    table = IdTable(6, (2,), fill=1.0)
    table.assign(torch.arange(12.0).view(6, 2))
    agreed = table.values.clone()
    table.update(torch.tensor([4, 1, 4]), torch.full((3, 2), -1.0))
    table.update(torch.tensor([1, 5]), torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    assert torch.equal(table.state_dict()["values"], agreed)  # this rank's writes undone
    restored = IdTable(6, (2,))
    restored.load_state_dict(table.state_dict())
    restored.load_pending(table.pending_state())
    assert torch.equal(restored.values, table.values)
    assert torch.equal(restored.pending_state()["ids"], torch.tensor([4, 1, 4, 1, 5]))


def test_a_run_of_an_earlier_version_resumes_although_it_lacks_newer_keys(tmp_path):
    run_dir = tmp_path / "run"
    stored = fake_run(run_dir)
    del stored["data"]["verify"]  # a key this version added
    assert rundir.changed_keys(stored, to_dict(load_config(None, [f"run.dir={run_dir}"])), rundir.SAFE_ON_RESUME) == []


@pytest.mark.slow
def test_a_resume_refused_by_the_preflight_leaves_config_yaml_as_it_was(tiny_dataset, tmp_path):
    """A finished run resumed with train.epochs raised while a training shard is damaged: the
    preflight refuses it, and config.yaml is the one the run finished with, byte for byte, so its
    codes still load once the shard is restored (before: "config.yaml differs: train.epochs: 4 -> 5")."""
    from conftest import tiny_args
    from scbch_dist.errors import ScbchError
    from scbch_dist.retrieval.index import RunCodes
    from scbch_dist.train import main

    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_dataset, data)
    main(tiny_args(data, run_dir, "train.epochs=4", "eval.every=4", "run.tensorboard=false"))
    before = (run_dir / "config.yaml").read_bytes()
    shard = sorted(data.glob("train-*.tar"))[0]
    original = shard.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    with pytest.raises(ScbchError, match=shard.name):
        main(["--resume", str(run_dir), "--set", "train.epochs=5"])
    assert (run_dir / "config.yaml").read_bytes() == before
    shard.write_bytes(original)
    assert RunCodes.load(run_dir).config["train"]["epochs"] == 4


@pytest.mark.slow
def test_resuming_a_finished_run_with_nothing_to_do_changes_nothing(tiny_dataset, tmp_path, capsys):
    """--resume of a finished run, no setting given: one line says so and every file is left as it
    was (before: exit 0, summary.json rewritten with the resume's 4 s, TensorBoard files added)."""
    from conftest import tiny_args
    from scbch_dist.train import main

    run_dir = tmp_path / "run"
    summary = main(tiny_args(tiny_dataset, run_dir, "train.epochs=2", "eval.every=2"))
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert main(["--resume", str(run_dir)])["final"] == json.loads(json.dumps(summary["final"]))
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    assert f"{run_dir} finished its 2 epochs already" in capsys.readouterr().err

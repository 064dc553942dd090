"""Faults a hostile or clumsy user causes, each reproduced (docs/engine.md, "Faults and what the
user sees"): a run bound to its data, damaged checkpoints and indexes refused by name (and an
earlier checkpoint taken only when asked), an atomic takeover of a stale lock, codes written for a
finished run that had none, file-system errors as one line, missing shards, data without
relevance, negative loss settings, a mistyped data.root, folders left by failed commands, and
progress bars only on a terminal."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, as_an_earlier_version_wrote_it, one_line_exit, read_checkpoint, tiny_args, tiny_synthetic_config
from scbch_dist.config import ConfigError, load_config
from scbch_dist.data.fingerprint import DataChangedError
from scbch_dist.data.format import ShardError
from scbch_dist.data.synthetic import write_synthetic
from scbch_dist.digests import IntegrityError, check_text, read_sealed_json, verify_manifest, write_sealed_json
from scbch_dist.engine import rundir
from scbch_dist.engine.checkpoint import CheckpointError, latest_checkpoint
from scbch_dist.errors import RunDirError
from scbch_dist.train import main

SHORT = ("train.epochs=2", "eval.every=1", "run.tensorboard=false")


def xor_middle(path: Path, n: int = 64) -> None:
    """XOR ``n`` bytes in the middle of a file with 0xFF (the audit's bit-rot)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# digests


def test_digest_forms_refuse_a_changed_file_and_pass_an_old_one(tmp_path):
    record = write_sealed_json(tmp_path / "s.json", {"final": {"map": 0.5}, "n": [1, 2]})
    assert read_sealed_json(tmp_path / "s.json") == {"final": {"map": 0.5}, "n": [1, 2]} and "sha256" in record
    text = (tmp_path / "s.json").read_text().replace("0.5", "0.6")
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(IntegrityError, match=r"s\.json: its content differs from the sha256"):
        read_sealed_json(tmp_path / "s.json")
    (tmp_path / "old.json").write_text('{"final": 1}')  # written before digests: read as it is
    assert read_sealed_json(tmp_path / "old.json") == {"final": 1}

    from scbch_dist.config import Config, save_config

    save_config(Config(), tmp_path / "config.yaml")
    assert check_text(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").train.epochs == Config().train.epochs  # YAML ignores the digest line
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("epochs: 50", "epochs: 70"))
    with pytest.raises(IntegrityError, match="config.yaml: changed since it was written"):
        check_text(tmp_path / "config.yaml")

    folder = tmp_path / "ck"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 100)
    (folder / "sub" / "b.bin").write_bytes(b"b" * 10)
    assert not verify_manifest(folder)  # no manifest: an earlier version's folder
    from scbch_dist.digests import write_manifest

    write_manifest(folder)
    assert verify_manifest(folder)
    (folder / "extra").write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"extra: not listed in"):
        verify_manifest(folder)
    (folder / "extra").unlink()
    (folder / "sub" / "b.bin").write_bytes(b"c" * 10)
    with pytest.raises(IntegrityError, match=r"sub/b\.bin: its sha256 differs"):
        verify_manifest(folder)
    (folder / "a.bin").write_bytes(b"a" * 99)
    with pytest.raises(IntegrityError, match=r"a\.bin: 99 bytes, 100 when it was written"):
        verify_manifest(folder)


# ----------------------------------------------------------------------------------------------
# a run bound to its data; damaged checkpoints


@pytest.mark.slow
def test_a_resume_on_other_data_is_refused_and_the_run_stays_finished(tmp_path):
    """Train 2 epochs on D, replace D's contents with another dataset of the same layout (another
    seed), resume for 4: refused before the first step, naming what changed; summary.json stays."""
    root = tmp_path / "D"
    write_synthetic(root, tiny_synthetic_config())
    run_dir = tmp_path / "run"
    first = main(tiny_args(root, run_dir, *SHORT))
    shutil.rmtree(root)
    write_synthetic(root, tiny_synthetic_config(seed=4))
    with pytest.raises(DataChangedError, match=rf"^--resume {run_dir}: the dataset at {root} is not the one this run "
                                               r"began with \(5 of 5 train shard\(s\), 1 of 1 query shard\(s\), 6 of 6 "
                                               r"database shard\(s\), meta\.json, labels/clean\.npy changed\); restore it"):
        main(["--resume", str(run_dir), "--set", "train.epochs=4"])
    assert rundir.launch_state(run_dir) == "done"
    assert read_sealed_json(run_dir / "summary.json")["final"] == json.loads(json.dumps(first["final"]))
    assert (run_dir / "log.txt").read_text().rstrip().endswith(f"Wrote {run_dir}/summary.json")  # nothing cut
    assert not (run_dir / "run.lock").exists()


def test_fingerprints_name_what_changed():
    from scbch_dist.data.fingerprint import changes

    recorded = {"meta.json": "a", "shards": {"train": ["1", "2", "3"], "query": ["q"], "database": ["d"]},
                "labels/clean.npy": "c", "training_labels": "t"}
    assert changes(recorded, dict(recorded)) == []
    files_only = {k: v for k, v in recorded.items() if k != "training_labels"}  # what the claim compares
    assert changes(recorded, files_only) == []
    swapped = {**recorded, "meta.json": "b", "shards": {**recorded["shards"], "train": ["1", "x", "3", "4"]}}
    assert changes(recorded, swapped) == ["2 of 3 train shard(s)", "meta.json"]
    assert changes(recorded, {**recorded, "training_labels": "u"}) == [
        "the training labels (the noise table or noise file gives other labels)"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dataset) -> Path:
    """A 3-epoch run (2 checkpoints kept) and the weights of the same run extended to 4 epochs."""
    base = tmp_path_factory.mktemp("finished")
    run_dir = base / "run"
    main(tiny_args(tiny_dataset, run_dir, "train.epochs=3", "eval.every=1", "run.tensorboard=false"))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "tables.safetensors", "random_states_0.pkl",
                                  "run_state.json"])
def test_a_damaged_checkpoint_is_refused_and_an_earlier_one_taken_when_asked(finished, tmp_path, name):
    full = tmp_path / "full"
    shutil.copytree(finished, full)
    main(["--resume", str(full), "--set", "train.epochs=4"])
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0003", "latest"]
    damaged = run_dir / "checkpoints" / "epoch-0003" / name
    xor_middle(damaged)
    with pytest.raises(CheckpointError, match=rf"^{damaged}: its sha256 differs from the one recorded in .*; resume from "
                                              rf"an earlier one with --resume {run_dir} --from-checkpoint epoch-0002$"):
        main(["--resume", str(run_dir), "--set", "train.epochs=4"])
    assert rundir.launch_state(run_dir) == "done" and not (run_dir / "run.lock").exists()
    # asked: epoch 3 is trained again from the checkpoint of epoch 2, exactly as it was
    main(["--resume", str(run_dir), "--from-checkpoint", "epoch-0002", "--set", "train.epochs=4"])
    want, got = read_checkpoint(full), read_checkpoint(run_dir)
    for k in want[0]:
        assert torch.equal(want[0][k], got[0][k]), k
    assert read_sealed_json(run_dir / "summary.json")["final"] == read_sealed_json(full / "summary.json")["final"]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_from_checkpoint_names_what_is_kept(capsys, tmp_path):
    from test_rundir import fake_run

    run_dir = tmp_path / "run"
    fake_run(run_dir, epoch=2)
    assert one_line_exit(capsys, main, ["--resume", str(run_dir), "--from-checkpoint", "epoch-0001"]) == (
        f"--from-checkpoint epoch-0001: not a complete checkpoint of {run_dir}; it holds epoch-0002")
    with pytest.raises(SystemExit):
        main(["--from-checkpoint", "epoch-0001"])
    assert "--from-checkpoint goes with --resume RUN_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_without_a_manifest_that_is_truncated_is_refused_by_name(finished, tmp_path):
    """A checkpoint of an earlier version has no digests; a damaged file is still one line."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    as_an_earlier_version_wrote_it(run_dir)
    folder = latest_checkpoint(run_dir)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"^{path}: cannot be read back \("):
        main(["--resume", str(run_dir), "--set", "train.epochs=4"])


@pytest.mark.slow
def test_a_digest_removed_in_a_folder_this_version_wrote_is_refused(finished, tmp_path, capsys):
    """config.yaml carries its digest, so the folder was written with digests: a summary.json
    without its sha256 (and its mAP edited) is refused by report (before: it printed the edited
    mAP and exited 0), and a checkpoint without its manifest (and a NaN model) by a resume and by
    the search's model loading (before: a warning, and the NaN model loaded). The same folder as an
    earlier version wrote it, every digest absent, is read as it is."""
    from safetensors.torch import load_file, save_file

    from scbch_dist.engine.checkpoint import verify_model_file
    from scbch_dist.experiments import report

    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(finished, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("sha256")
    summary["final"]["avg_map"] = 0.9
    (run_dir / "summary.json").write_text(json.dumps(summary))
    line = one_line_exit(capsys, report.main, [str(tmp_path / "runs")])
    assert line.startswith(f"{run_dir / 'summary.json'}: has no \"sha256\" field, yet its run folder was written "
                           "with digests")

    folder = latest_checkpoint(run_dir)
    (folder / "manifest.json").unlink()
    model = load_file(str(folder / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in model.items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"^{folder / 'manifest.json'}: has no manifest.json file, yet its run "
                                              "folder was written with digests"):
        main(["--resume", str(run_dir), "--set", "train.epochs=4"])
    with pytest.raises(CheckpointError, match="has no manifest.json file"):
        verify_model_file(folder)  # what the search's query encoder checks before it loads the model

    # codes.npz without its sha256 member, database_txt reversed: refused by every reader of codes
    from scbch_dist.engine.scoring import RunCodes
    from scbch_dist.errors import CodesError

    shutil.copytree(finished / "checkpoints", run_dir / "checkpoints", dirs_exist_ok=True)  # the manifest back
    with np.load(run_dir / "codes.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "sha256"}
    arrays["database_txt"] = arrays["database_txt"][::-1].copy()
    np.savez(run_dir / "codes.npz", **arrays)
    with pytest.raises(CodesError, match=rf"^{run_dir / 'codes.npz'}: has no 'sha256' member, yet its run folder "
                                                "was written with digests"):
        RunCodes.load(run_dir)

    old = tmp_path / "old" / "run"
    shutil.copytree(finished, old)
    as_an_earlier_version_wrote_it(old)
    report.main([str(tmp_path / "old")])
    # the run's own final mAP (x 100), not the edited 90.0 ("0.9" alone was also an epoch's seconds under load)
    final = json.loads((finished / "summary.json").read_text())["final"]["avg_map"]
    table = (tmp_path / "old" / "report.md").read_text()
    assert f"/ {100 * final:.1f} |" in table and "90.0" not in table


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tiny_dataset, tmp_path, monkeypatch):
    """Disk full inside save_state (safetensors reports it as "os error 28"): one line naming the
    folder and the checkpoint still in force."""
    from accelerate import Accelerator

    calls = []
    save_state = Accelerator.save_state

    def full_disk(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "model.safetensors"))
        return save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    run_dir = tmp_path / "run"
    target = run_dir / "checkpoints" / "epoch-0002"
    with pytest.raises(CheckpointError, match=rf"^{target}: writing the checkpoint failed \({target}/model.safetensors: "
                                              rf"No space left on device\); {run_dir}/checkpoints/latest still names "
                                              rf"epoch-0001; free the space"):
        main(tiny_args(tiny_dataset, run_dir, *SHORT))
    assert latest_checkpoint(run_dir).name == "epoch-0001" and verify_manifest(latest_checkpoint(run_dir))


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a file system that really fills up (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                          capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and mount")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_disk_that_fills_inside_torch_save_is_one_line_and_keeps_the_previous(tiny_dataset, small_disk, monkeypatch):
    """A real full disk while epoch 2's checkpoint is written: the model file fits, torch.save's
    optimizer.bin does not (its writer says only "[enforce fail at inline_container.cc:...]"; it
    was a traceback). One line naming the checkpoint, the space left and the one still in force."""
    from accelerate import Accelerator

    run_dir = small_disk / "run"
    save_state = Accelerator.save_state

    def fill_then_save(self, output_dir=None, **kw):
        if Path(output_dir).name == "epoch-0002":
            model = (run_dir / "checkpoints" / "epoch-0001" / "model.safetensors").stat().st_size
            leave = model + model // 2 + 8192  # the model file fits; optimizer.bin (Adam: twice the model) cannot
            with open(small_disk / "filler", "wb") as f:
                f.write(b"\0" * max(0, shutil.disk_usage(small_disk).free - leave))
        return save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", fill_then_save)
    target = run_dir / "checkpoints" / "epoch-0002"
    with pytest.raises(CheckpointError, match=rf"^{target}: writing the checkpoint failed \(torch.save could not write its "
                                              rf"archive: \[enforce fail at inline_container.cc:\d+\].*; [\d,]+ bytes "
                                              rf"free there\); {run_dir}/checkpoints/latest still names epoch-0001"):
        main(tiny_args(tiny_dataset, run_dir, "model.hidden=512", *SHORT))
    assert latest_checkpoint(run_dir).name == "epoch-0001" and verify_manifest(latest_checkpoint(run_dir))


# ----------------------------------------------------------------------------------------------
# the run lock


def _race(path: str, start: float, out, tried) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        rundir.RunLock(Path(path)).acquire()
    except RunDirError:
        out.put(0)
        tried.wait(60)
        return
    out.put(os.getpid())
    tried.wait(60)  # hold it until every process has tried (a fixed time let a late starter find it free under load)


def test_many_processes_taking_over_a_stale_lock_leave_one_holder(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(), "started": "earlier"})
    ctx = multiprocessing.get_context("fork")
    for trial in range(20):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        (folder / "run.lock").write_text(stale)
        out, tried = ctx.Queue(), ctx.Barrier(8)
        procs = [ctx.Process(target=_race, args=(str(folder), time.time() + 0.15, out, tried)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        holders = [pid for pid in (out.get(timeout=5) for _ in procs) if pid]
        assert len(holders) == 1, f"trial {trial}: {len(holders)} holders"
        assert json.loads((folder / "run.lock").read_text())["pid"] == holders[0]


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("run.lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RunDirError, match=rf"^{tmp_path / 'run'}: cannot write there \(Read-only file system\)"):
        rundir.RunLock(tmp_path / "run").acquire()
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match=rf"^{tmp_path / 'file' / 'run'}: cannot create the run folder"):
        rundir.RunLock(tmp_path / "file" / "run").acquire()


# ----------------------------------------------------------------------------------------------
# codes, indexes


@pytest.mark.slow
def test_codes_for_a_finished_run_without_codes_and_a_damaged_codes_file(capsys, tiny_dataset, tmp_path):
    pytest.importorskip("faiss")
    from scbch_dist.retrieval import index

    run_dir = tmp_path / "run"
    main(tiny_args(tiny_dataset, run_dir, *SHORT, "run.save_codes=false"))
    assert not (run_dir / "codes.npz").exists()
    advice = one_line_exit(capsys, index.main, ["build", str(run_dir)])
    assert advice.endswith(f"--resume {run_dir} --set run.save_codes=true")
    main(["--resume", str(run_dir), "--set", "run.save_codes=true"])  # the advice works: it writes them
    codes = index.RunCodes.load(run_dir)
    assert codes.model_sha256 and rundir.launch_state(run_dir) == "done"
    index.build(run_dir, log=lambda *a: None)
    assert index.failures(index.check(run_dir)) == []

    xor_middle(run_dir / "codes.npz")
    line = one_line_exit(capsys, index.main, ["build", str(run_dir)])
    assert line.startswith(f"{run_dir / 'codes.npz'}: ")


@pytest.mark.slow
def test_a_damaged_index_is_refused_and_a_wrong_one_fails_its_check(capsys, tiny_dataset, tmp_path):
    pytest.importorskip("faiss")
    from scbch_dist.retrieval import index, search

    run_dir = tmp_path / "run"
    main(tiny_args(tiny_dataset, run_dir, *SHORT))
    folder = index.build(run_dir, log=lambda *a: None)
    index.main(["check", str(run_dir)])  # an intact index passes its check: no exit status
    for name in ("txt.faissindex", "ids.npy", "index.json"):
        shutil.copytree(folder, tmp_path / "kept", dirs_exist_ok=True)
        xor_middle(folder / name)
        line = one_line_exit(capsys, search.main, [str(run_dir), "--id", "0"])
        assert line.startswith(f"{folder / name}: "), line
        assert one_line_exit(capsys, index.main, ["check", str(run_dir)]) == line
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "kept", folder)
    # a consistent index of the wrong codes (the image codes under the text name): the check finds it
    shutil.copyfile(folder / "img.faissindex", folder / "txt.faissindex")
    from scbch_dist.digests import write_manifest

    write_manifest(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        index.main(["check", str(run_dir)])
    assert exit_info.value.code == 1
    assert "FAILED: i2t" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# data


def test_a_mistyped_data_root_is_not_filled_with_synthetic_data(capsys, tmp_path):
    empty = tmp_path / "my_data"
    empty.mkdir()
    line = one_line_exit(capsys, main, ["--set", f"data.root={empty}", "--set", f"run.dir={tmp_path / 'run'}"])
    assert line == (f"data.root={empty}: no dataset there (no meta.json); the config generates the embedded synthetic "
                    f"dataset only at the data.root it names; to write it at {empty}, add --set data.generate=synthetic")
    assert list(empty.iterdir()) == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_asked_explicitly_the_embedded_data_is_written_anywhere(tmp_path):
    root = tmp_path / "elsewhere"
    main(["--set", f"data.root={root}", "--set", "data.generate=synthetic", "--set", f"run.dir={tmp_path / 'run'}",
          *[a for s in ("synthetic.n_train=300", "synthetic.n_query=40", "synthetic.n_extra_database=60",
                        "model.hidden=64", "train.epochs=1", "scbch.warmup_epochs=1", "scbch.k=5", "run.progress=false")
            for a in ("--set", s)]])
    assert (root / "meta.json").is_file()


def test_a_swapped_embedded_dataset_is_one_line(capsys, tmp_path, tiny_dataset):
    root = tmp_path / "shards"
    shutil.copytree(tiny_dataset, root)  # a synthetic dataset of other settings where the config generates its own
    line = one_line_exit(capsys, main, ["--set", f"run.dir={tmp_path / 'run'}", "--config", str(_config_at(tmp_path, root))])
    assert line.startswith(f"{root} holds a synthetic dataset made with other settings")


def _config_at(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data:\n  root: {root}\n  generate: synthetic\n  noise: mixed:0.5\n")
    return path


def test_a_query_split_without_labels_fails_before_the_first_step(tmp_path):
    from conftest import random_dataset

    root = tmp_path / "d"
    arrays = random_dataset(root, n_train=40)
    from scbch_dist.data.format import write_dataset

    shutil.rmtree(root)
    arrays["query"] = (arrays["query"][0], arrays["query"][1], np.zeros_like(arrays["query"][2]))
    write_dataset(root, name="random", classes=[f"c{i}" for i in range(4)], splits=arrays, img_dtype="float32",
                  txt_dtype="float32")
    with pytest.raises(ShardError, match=rf"^{root / 'meta.json'}: no query row has a label \(7 unlabelled\)"):
        main(tiny_args(root, tmp_path / "run", "scbch.k=3", "train.batch_size=8"))
    assert not (tmp_path / "run").exists()


def test_a_shard_deleted_while_reading_is_named_missing(tiny_dataset, tmp_path):
    from scbch_dist.data.format import read_meta
    from scbch_dist.data.pipeline import read_blocks

    root = tmp_path / "d"
    shutil.copytree(tiny_dataset, root)
    meta = read_meta(root)
    urls = [str(root / s) for s in meta.splits["train"].shards]
    blocks = read_blocks(urls, meta, "train")
    next(blocks)
    for url in urls[1:]:
        os.unlink(url)
    with pytest.raises(ShardError, match=r"train-00000[1-9]\.tar: missing \(deleted or moved while the run was reading"):
        list(blocks)


@pytest.mark.parametrize("setting", ["scbch.margin=-5", "scbch.bsch_weight=-1", "scbch.shift=-0.1", "nacd.alpha=-0.3",
                                     "rshnl.chl_weight=-1", "scbch.cscc_weight=-2"])
def test_negative_loss_settings_are_refused(setting):
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} must be >= 0, got -"):
        load_config(None, [f"method.name={key.split('.')[0]}", setting])


# ----------------------------------------------------------------------------------------------
# what failed commands leave


def test_failed_commands_leave_no_folders(capsys, tiny_dataset, tmp_path):
    from scbch_dist.retrieval import index

    run_dir = tmp_path / "runs" / "x"
    with pytest.raises(ConfigError):
        main(tiny_args(tiny_dataset, run_dir, "scbch.k=400"))  # refused in the preflight
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the runs/ it made
    line = one_line_exit(capsys, index.main, ["build", str(tmp_path / "runs" / "nope")])
    assert line == f"{tmp_path / 'runs' / 'nope'}: no such run folder" and not (tmp_path / "runs" / "nope").exists()


def test_the_holds_another_run_advice_fits_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a run whose first checkpoint failed
    cfg = load_config(None, [f"run.dir={run_dir}"])
    with pytest.raises(RunDirError, match=r"holds another run \(metrics.jsonl\); it has no checkpoint to continue from; "
                                          r"give this run another run.dir, or delete that run with --overwrite$"):
        rundir.lock_and_prepare(run_dir, cfg, resume=False, overwrite=False, safe=rundir.SAFE_ON_RESUME,
                     log=__import__("logging").getLogger("t"))


@pytest.mark.slow
def test_a_redirected_log_has_no_progress_bars(tiny_dataset, tmp_path):
    settings = tiny_args(tiny_dataset, tmp_path / "run", *SHORT)  # run.progress=true below wins
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "scbch_dist.train", *settings, "--set", "run.progress=true"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    assert proc.returncode == 0
    text = (tmp_path / "err.txt").read_text()
    assert "\r" not in text and "it/s" not in text
    assert sum("| epoch " in line for line in text.splitlines()) == 2  # one line per epoch

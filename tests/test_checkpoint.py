"""Checkpoints through Accelerate: the optimizer state round-trips exactly, pickles that carry code
are refused before they run, an unfinished write leaves the previous checkpoint in force, and the
earlier single-file format is refused without being opened."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import crash_in_epoch, read_checkpoint, tiny_args
from scbch_dist.config import load_config, save_config
from scbch_dist.digests import write_manifest
from scbch_dist.engine.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, portable_model_files,
                                          read_run_state, save_checkpoint)
from scbch_dist.engine.setup import make_accelerator, make_optimizer
from scbch_dist.engine.state import RunState
from scbch_dist.models import SCBCHModel
from scbch_dist.train import main

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def prepared(tmp_path: Path, seed: int):
    cfg = load_config(None, ["run.tensorboard=false"])
    accelerator = make_accelerator(cfg, tmp_path)
    torch.manual_seed(seed)
    model = SCBCHModel(6, 5, 8, 16, 3)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg, accelerator.device))
    portable_model_files(accelerator)
    return accelerator, model, optimizer


def take_steps(model, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        out = model(torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g))
        loss = (out["h_img"] * out["h_txt"]).sum() + (out["p_img"] ** 2).mean() + out["p_txt"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def saved_run(tmp_path: Path) -> tuple[Path, object, object]:
    accelerator, model, optimizer = prepared(tmp_path, seed=0)
    take_steps(model, optimizer, 3, seed=1)
    save_checkpoint(accelerator, tmp_path, RunState(epoch=1, history=[{"epoch": 1, "avg_map": 0.5}]),
                    {"method.weights.values": torch.linspace(0, 1, 7)}, {"model": {"bits": 8}})
    return tmp_path, model, optimizer


def test_model_optimizer_tables_and_state_round_trip_exactly(tmp_path):
    run_dir, model_a, opt_a = saved_run(tmp_path)
    accelerator, model_b, opt_b = prepared(tmp_path, seed=5)  # other initial weights, fresh Adam
    state, tables, rank_state = load_checkpoint(accelerator, run_dir)
    assert state == RunState(epoch=1, history=[{"epoch": 1, "avg_map": 0.5}]) and rank_state is None
    assert read_run_state(run_dir)[2] == {"model": {"bits": 8}}
    assert torch.equal(tables["method.weights.values"], torch.linspace(0, 1, 7))
    a, b = opt_a.state_dict(), opt_b.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(model_a.parameters()))
    for i in a["state"]:  # Adam's moments and step counts, as saved
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    take_steps(model_a, opt_a, 2, seed=2)
    take_steps(model_b, opt_b, 2, seed=2)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name  # training continues exactly


def test_the_model_file_holds_unwrapped_keys(tmp_path):
    from safetensors.torch import load_file

    run_dir, model, _ = saved_run(tmp_path)
    saved = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    assert set(saved) == set(model.state_dict()) and not any(k.startswith("module.") for k in saved)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_pickle_that_carries_code_is_refused_before_it_runs(tmp_path, name):
    run_dir, _, _ = saved_run(tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, latest_checkpoint(run_dir) / name)
    accelerator, _, _ = prepared(tmp_path, seed=0)
    with pytest.raises(CheckpointError, match=f"{name}: not a plain tensor file, refused"):
        load_checkpoint(accelerator, run_dir)
    assert not marker.exists()


def test_an_unfinished_write_leaves_the_previous_checkpoint_in_force(tmp_path):
    run_dir, _, _ = saved_run(tmp_path)
    partial = run_dir / "checkpoints" / "epoch-0002"  # killed while writing epoch 2
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(run_dir).name == "epoch-0001"
    accelerator, model, optimizer = prepared(tmp_path, seed=0)
    save_checkpoint(accelerator, run_dir, RunState(epoch=2), {}, {})
    assert latest_checkpoint(run_dir).name == "epoch-0002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0002", "latest"]
    state, _, _ = load_checkpoint(accelerator, run_dir)
    assert state.epoch == 2


def test_the_earlier_single_file_format_is_refused_unopened(tmp_path):
    run_dir = tmp_path / "old"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(load_config(None, [f"run.dir={run_dir}"]), run_dir / "config.yaml")
    marker = tmp_path / "payload-ran"
    torch.save({"model": Payload(marker)}, run_dir / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="earlier format"):
        main(["--resume", str(run_dir)])
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        (run_dir / "checkpoints" / "last.pt").unlink()
        main(["--resume", str(run_dir)])


@pytest.mark.slow
def test_resuming_a_crafted_run_fails_without_running_the_payload(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    main(tiny_args(tiny_dataset, run_dir, "train.epochs=1", "eval.every=1", "run.tensorboard=false"))
    marker = tmp_path / "payload-ran"
    folder = latest_checkpoint(run_dir)
    torch.save({"state": Payload(marker)}, folder / "optimizer.bin")
    # the manifest's digest catches the changed file first ...
    with pytest.raises(CheckpointError, match=rf"^{folder / 'optimizer.bin'}: \d+ bytes, \d+ when it was written"):
        main(["--resume", str(run_dir), "--set", "train.epochs=2"])
    # ... and a manifest written anew over the crafted file does not make it load
    write_manifest(folder)
    with pytest.raises(CheckpointError, match=r"optimizer\.bin: not a plain tensor file"):
        main(["--resume", str(run_dir), "--set", "train.epochs=2"])
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available(),
                    reason="needs DeepSpeed and a CUDA GPU (DeepSpeed through Accelerate does not run on the CPU)")
def test_a_deepspeed_run_resumes_with_its_optimizer_state(tiny_dataset, tmp_path):
    """ZeRO-2 through accelerate launch: the checkpoint holds DeepSpeed's optimizer partition, and a
    resumed run continues from it (close to the uninterrupted run; GPU kernels are not bitwise
    deterministic)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"

    def launch(*args: str) -> None:
        cmd = [accelerate, "launch", "--config_file", str(REPO / "configs/accelerate/deepspeed_zero2.yaml"),
               "--num_processes", "1", "-m", "scbch_dist.train", *args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]

    full, part = tmp_path / "full", tmp_path / "part"
    launch(*tiny_args(tiny_dataset, full, "train.epochs=3", "eval.every=3", "run.tensorboard=false"))
    launch(*tiny_args(tiny_dataset, part, "train.epochs=2", "eval.every=3", "run.tensorboard=false"))
    folder = latest_checkpoint(part)
    assert any("optim_states" in p.name for p in folder.rglob("*.pt")), sorted(p.name for p in folder.rglob("*"))
    launch("--resume", str(part), "--set", "train.epochs=3")
    loss = [json.loads(line)["loss"]["total"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["loss"]["total"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1] == pytest.approx(loss[-1], rel=1e-2)


def test_checkpoint_files_honour_the_umask(tmp_path):
    """safetensors creates its files 0600: teammates could not read a shared run's checkpoints."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        run_dir, _, _ = saved_run(tmp_path)
    finally:
        os.umask(old)
    folder = latest_checkpoint(run_dir)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}
    assert modes == {**{name: 0o644 for name in modes}, folder.name: 0o755}, modes


@pytest.mark.slow
def test_checkpoints_every_n_epochs_resume_where_the_last_one_left(tiny_dataset, tmp_path, monkeypatch):
    """run.checkpoint_every=2 over 5 epochs writes checkpoints after epochs 2, 4 and 5 (the last);
    a crash inside epoch 4 resumes from epoch 2, repeats epoch 3 and ends as the uninterrupted run,
    with one record per epoch in metrics.jsonl."""
    from scbch_dist.train import main

    every = ("run.checkpoint_every=2", "run.keep_checkpoints=5", "train.epochs=5", "eval.every=5")
    full = main(tiny_args(tiny_dataset, tmp_path / "full", *every))
    written = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    assert written == ["epoch-0002", "epoch-0004", "epoch-0005"]

    crash_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tiny_dataset, tmp_path / "part", *every))
    monkeypatch.undo()
    resumed = main(["--resume", str(tmp_path / "part")])
    assert resumed["final"]["avg_map"] == full["final"]["avg_map"]
    model_a, _, _ = read_checkpoint(tmp_path / "full")
    model_b, _, _ = read_checkpoint(tmp_path / "part")
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5]

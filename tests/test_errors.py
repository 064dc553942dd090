"""Failing early and in one line (docs/engine.md, "Preflight" and "Errors and exit codes"): every
entry point prints a known error as one line naming the key, file or sample and exits 2; the
preflight finds what would otherwise fail hours into a run before the first step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, one_line_exit, tiny_args
from scbch_dist.config import ConfigError
from scbch_dist.data.format import ShardError
from scbch_dist.train import main


def test_train_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [2\n")
    cases = {
        ("--config", str(bad)): f"{bad}: not valid YAML",
        ("--set", "model.bits=[1"): "--set 'model.bits=[1': the value is not valid YAML",
        ("--set", "modle.bits=8"): "unknown config key 'modle'",
        ("--set", "data.noise=mixed:2"): "data.noise",
        ("--resume", str(tmp_path / "nowhere")): f"--resume {tmp_path / 'nowhere'}: no config.yaml there",
        ("--set", f"data.root={tmp_path / 'nodata'}", "--set", "data.generate=",
         "--set", f"run.dir={tmp_path / 'r'}"): f"{tmp_path / 'nodata' / 'meta.json'}: not found",
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model:\n  bits: 16\n")
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  bits: 64\n")
    cases[("--resume", str(run_dir), "--config", str(other))] = (  # the other config was ignored silently
        f"--resume {run_dir} takes the run's own config.yaml; drop --config {other}")
    for argv, start in cases.items():
        assert one_line_exit(capsys, main, list(argv)).startswith(start), argv


def test_the_other_entry_points_print_one_line(capsys, tmp_path):
    from scbch_dist import extract
    from scbch_dist.experiments import report, sweep
    from scbch_dist.data import convert, noise

    assert one_line_exit(capsys, sweep.main, [str(tmp_path / "grid.yaml"), "--dry-run"]) == \
        f"grid file not found: {tmp_path / 'grid.yaml'}"
    assert one_line_exit(capsys, report.main, [str(tmp_path)]) == f"{tmp_path}: no summary.json with results under it"
    assert one_line_exit(capsys, extract.main, ["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "o")]) \
        .startswith(f"{tmp_path / 'raw' / 'meta.json'}: not found")
    assert one_line_exit(capsys, convert.main, ["folder", "--images", str(tmp_path), "--annotations",
                                                str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"),
                                                "--samples-per-shard", "0"]).startswith("--samples-per-shard")
    assert one_line_exit(capsys, noise.main, ["--root", str(tmp_path), "--noise", "bogus:1", "--out",
                                              str(tmp_path / "n.h5")]).startswith("data.noise='bogus:1': expected")


@pytest.mark.slow
def test_the_command_line_prints_exactly_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scbch_dist.train", "--set", "eval.batch_size=0"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == "python -m scbch_dist.train: error: eval.batch_size must be at least 1, got 0\n"


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_neighbour_count_above_the_training_set_fails_before_training(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^scbch.k=400 must be below the training count \(400 samples"):
        main(tiny_args(tiny_dataset, run_dir, "scbch.k=400"))
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "run.lock").exists()
    with pytest.raises(ConfigError, match=r"^nacd.k=500 must be below"):
        main(tiny_args(tiny_dataset, tmp_path / "nacd", "method.name=nacd", "nacd.k=500"))


def test_a_missing_search_backend_fails_before_training(tiny_dataset, tmp_path, monkeypatch):
    from scbch_dist.knn import backends as knn

    monkeypatch.setattr(knn, "faiss_available", lambda gpu=False: False)
    with pytest.raises(ConfigError, match=r"^bank.knn=faiss-cpu: bank.knn=faiss-cpu but faiss is not available"):
        main(tiny_args(tiny_dataset, tmp_path / "run", "bank.knn=faiss-cpu"))


def flip_byte(path: Path, offset_from_end: int = 3000) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_evaluation_shard_fails_before_the_first_step(tiny_dataset, tmp_path):
    """The query and database shards are read at the first evaluation otherwise: hours in."""
    root = copy_dataset(tiny_dataset, tmp_path / "data")
    flip_byte(root / "query-000000.tar")
    run_dir = tmp_path / "run"
    with pytest.raises(ShardError, match=rf"^{root / 'query-000000.tar'}: sha256 \w+\.\.\. differs from meta.json"):
        main(tiny_args(root, run_dir))
    assert not (run_dir / "metrics.jsonl").exists()


def test_duplicate_ids_fail_before_the_first_step(tiny_dataset, tmp_path):
    """They passed during the warm-up and failed at the first refresh with an unclear error."""
    root = copy_dataset(tiny_dataset, tmp_path / "data")
    meta = json.loads((root / "meta.json").read_text())
    meta["splits"]["train"]["sha256"] = []  # a rewritten shard: its checksum would catch it first
    (root / "meta.json").write_text(json.dumps(meta))

    shutil.copyfile(root / "train-000000.tar", root / "train-000001.tar")  # ids 0..95 twice, 96..191 missing
    with pytest.raises(ShardError, match=r"split 'train': sample 000000000 occurs 2 times"):
        main(tiny_args(root, tmp_path / "run"))


def test_more_user_mistakes_are_one_line(capsys, tmp_path):
    from scbch_dist.experiments import sweep

    grid = tmp_path / "grid.yaml"
    for text, start in [("name: g\ndatasets: [flickr\n", f"{grid}: not valid YAML"),
                        ("name: g\ndatasets: [flickr]\nbits: [abc]\nnoise: [0.2]\n", f"{grid}: 'bits' holds 'abc'")]:
        grid.write_text(text)
        assert one_line_exit(capsys, sweep.main, [str(grid), "--dry-run"]).startswith(start)
    for argv, message in [(["--set", "train.seed=-1"], "train.seed must be 0 to 4294967295 (a 32-bit seed), got -1"),
                          (["--set", "run.dir="], "run.dir must name a folder, got ''"),
                          (["--set", "eval.every=0"], "eval.every must be at least 1, got 0")]:
        assert one_line_exit(capsys, main, argv) == message


@pytest.mark.parametrize("setting, message", [
    ("model.bits=1000000000000", "model.bits must be at most 65,536, got 1,000,000,000,000"),
    (f"model.hidden={2**70}", f"model.hidden must be at most 1,048,576, got {2**70:,}"),
    (f"train.seed={2**64}", f"train.seed must be 0 to 4294967295 (a 32-bit seed), got {2**64}"),
    ("synthetic.n_train=100000000", "synthetic.n_query + n_train + n_extra_database rows x (img_dim + txt_dim): needs "),
])
def test_sizes_beyond_any_machine_are_one_line(capsys, tmp_path, setting, message):
    """Settings that overflowed or exhausted memory with a traceback (issue 35, item 8) are refused
    before anything is written, in one line naming the key."""
    line = one_line_exit(capsys, main, ["--set", setting, "--set", f"run.dir={tmp_path / 'run'}"])
    assert line.startswith(message) and not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_or_expands_without_end_is_one_line(capsys, tmp_path):
    """A Latin-1 config file, and a config whose YAML aliases repeat aliases (10^8 values in 12 lines:
    no answer in 120 s before), are refused at once, naming the file."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  dir: caf\xe9\n".encode("latin-1"))
    assert one_line_exit(capsys, main, ["--config", str(latin)]) == (
        f"{latin}: not UTF-8 text (byte 0xe9 at offset 15); save it as UTF-8")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    bomb.write_text("\n".join([*lines, "run: {dir: r}"]) + "\n")
    assert one_line_exit(capsys, main, ["--config", str(bomb)]).startswith(
        f"{bomb}: expands to more than 100,000 values (YAML aliases that repeat aliases?)")


def test_a_diverging_run_is_one_line(capsys, tiny_dataset, tmp_path):
    """train.lr=1e30: NaN after the first step, which SCBCH's BCE term reported as "all elements of
    input should be between 0 and 1" in a traceback; now one line naming the cause."""
    from conftest import tiny_args

    line = one_line_exit(capsys, main, tiny_args(tiny_dataset, tmp_path / "run", "train.lr=1e30"))
    assert line.startswith("the training diverged in epoch 1: the model's outputs (") and "smaller train.lr" in line


def test_backbone_mistakes_name_the_key(tmp_path):
    pytest.importorskip("timm")
    from scbch_dist.models.backbones import TimmImage, WeightsError

    with pytest.raises(WeightsError, match=r"^model.image.name='not_a_model' is not a timm architecture"):
        TimmImage("not_a_model", "random", {})
    with pytest.raises(WeightsError, match=r"^model.image.kwargs=\{'bogus': 1\}: timm model 'vit_tiny_patch16_224' "
                                           r"refuses them"):
        TimmImage("vit_tiny_patch16_224", "random", {"bogus": 1})
    garbage = tmp_path / "w.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=rf"^model.image.weights: {garbage} is not a readable checkpoint"):
        TimmImage("vit_tiny_patch16_224", str(garbage), {"img_size": 32, "depth": 1, "embed_dim": 16, "num_heads": 2})


def test_a_closed_pipe_ends_a_command_quietly():
    """`search --json | head`: the reader leaves; the command ends with 141 (128 + SIGPIPE), as a
    C tool does, without the BrokenPipeError traceback it printed (exit 1)."""
    code = ("from scbch_dist import cli\n"
            "def main():\n"
            "    for _ in range(200000):\n"
            "        print('x' * 100)\n"
            "cli.run(main, 'prog')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "x" * 100 + "\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err

"""End to end: a short run learns and writes every output; resumption; the accelerate CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scbch_dist.errors import RunDirError
from scbch_dist.train import main

from conftest import launch, read_checkpoint, tiny_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "short"
    summary = main(tiny_args(tiny_dataset, run_dir))
    return run_dir, summary


@pytest.mark.slow
def test_short_run_learns_and_writes_every_output(short_run):
    run_dir, summary = short_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["final"]["avg_map"] == pytest.approx(summary["final"]["avg_map"])
    for key in ("final", "best"):
        for direction in ("i2t", "t2i"):
            assert set(on_disk[key][direction]) >= {"map", "map_tie_aware"}
        assert "avg_map" in on_disk[key]
    assert on_disk["best"]["avg_map"] >= on_disk["final"]["avg_map"]
    assert "best" in on_disk["best"]["selected_by"] or "best-over-epochs" in on_disk["best"]["selected_by"]
    # it learned: well above a random ranking of the same labels
    assert on_disk["final"]["avg_map"] > on_disk["chance_map"] + 0.1
    assert set(on_disk["timings_s"]) >= {"total", "train", "refresh", "eval"}
    assert on_disk["throughput"]["train_samples_per_s"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(set(r["loss"]) == {"total", "bsch", "quant", "cscc"} for r in records)
    assert "cscc_weights" not in records[1] and "auc" in records[2]["cscc_weights"]  # refresh after warm-up
    assert [r["epoch"] for r in records if "eval" in r] == [3, 6]
    for name in ("config.yaml", "log.txt", "codes.npz", "checkpoints/latest", "checkpoints/epoch-0006/model.safetensors",
                 "checkpoints/epoch-0006/optimizer.bin", "checkpoints/epoch-0006/tables.safetensors",
                 "checkpoints/epoch-0006/run_state.json", "plots/pr.png", "plots/map.png", "plots/cscc_weights.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    codes = np.load(run_dir / "codes.npz")
    assert codes["query_img"].shape == (80, 2) and int(codes["bits"]) == 16  # 16 bits packed in 2 bytes
    # the codes name the model that wrote them (the last checkpoint's) and the run's config
    from safetensors.torch import load_file

    from scbch_dist.engine.checkpoint import model_fingerprint

    weights = load_file(str(run_dir / "checkpoints/epoch-0006/model.safetensors"))
    assert str(codes["model_sha256"]) == model_fingerprint(weights)
    assert json.loads(str(codes["config"]))["model"]["bits"] == 16


@pytest.mark.slow
def test_cscc_weights_separate_corrupted_rows(short_run):
    run_dir, _ = short_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = [r["cscc_weights"] for r in records if "cscc_weights" in r]
    assert all(w["clean_mean"] > w["corrupted_mean"] for w in weights)
    assert weights[-1]["auc"] > 0.6


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    main(tiny_args(tiny_dataset, full, "train.epochs=4", "eval.every=2", "scbch.warmup_epochs=1"))
    part = tmp_path / "part"
    main(tiny_args(tiny_dataset, part, "train.epochs=2", "eval.every=2", "scbch.warmup_epochs=1"))
    summary = main(["--resume", str(part), "--set", "train.epochs=4"])  # extends the finished run
    model_a, tables_a, state_a = read_checkpoint(full)
    model_b, tables_b, state_b = read_checkpoint(part)
    assert state_b["state"]["epoch"] == 4
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    for k in tables_a:  # CSCC weights (and the first refresh's) included
        assert torch.equal(tables_a[k], tables_b[k]), k
    full_summary = json.loads((full / "summary.json").read_text())
    assert summary["final"]["avg_map"] == full_summary["final"]["avg_map"]
    assert [h["epoch"] for h in state_b["state"]["history"]] == [2, 4]
    untimed = [{k: v for k, v in d["cscc_weights"].items() if k != "seconds"} for d in state_a["state"]["diagnostics"]]
    assert untimed == [{k: v for k, v in d["cscc_weights"].items() if k != "seconds"}
                       for d in state_b["state"]["diagnostics"]]


def as_version_0_1(tree: dict) -> dict:
    """A config tree of this version in the layout scbch_dist 0.1 saved: SCBCH's settings as loss.*
    and cscc.*, and the section of every method of that version with its defaults."""
    from dataclasses import asdict

    from scbch_dist.methods import NACDSettings, RSHNLSettings

    tree = dict(tree)
    scbch = tree.pop("scbch")
    old = {}
    for key, value in tree.items():
        old[key] = value
        if key == "method":
            old["loss"] = {k: scbch[k] for k in ("margin", "shift", "bsch_weight", "quant_weight", "cscc_weight")}
            old["cscc"] = {k: scbch[k] for k in ("k", "gamma", "warmup_epochs")}
        if key == "bank":
            old["nacd"], old["rshnl"] = asdict(NACDSettings()), asdict(RSHNLSettings())
    return old


def rewrite_as_version_0_1(run_dir: Path) -> None:
    """Every saved config of a run folder (config.yaml, each checkpoint's run_state.json, codes.npz)
    in the layout of version 0.1, with its digests made anew, as that version wrote them."""
    import yaml

    from scbch_dist.digests import arrays_sha256, seal_text, write_manifest
    from scbch_dist.run import CODES_DIGEST

    tree = as_version_0_1(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert list(tree) == list(yaml.safe_load((Path(__file__).parent / "data" / "config-v0.1.yaml").read_text()))
    (run_dir / "config.yaml").write_text(seal_text(yaml.safe_dump(tree, sort_keys=False)))
    for folder in (run_dir / "checkpoints").glob("epoch-*"):
        record = json.loads((folder / "run_state.json").read_text())
        record["config"] = as_version_0_1(record["config"])
        (folder / "run_state.json").write_text(json.dumps(record))
        write_manifest(folder)
    with np.load(run_dir / "codes.npz") as z:
        arrays = {k: z[k] for k in z.files if k != CODES_DIGEST}
    arrays["config"] = np.array(json.dumps(as_version_0_1(json.loads(str(arrays["config"]))), sort_keys=True))
    arrays[CODES_DIGEST] = np.array(arrays_sha256(arrays))
    np.savez_compressed(run_dir / "codes.npz", **arrays)


@pytest.mark.slow
def test_a_run_folder_of_version_0_1_is_reported_indexed_and_resumed(tiny_dataset, tmp_path):
    """A run whose saved configs are in the layout before each method's section became its own
    (loss.*, cscc.*, nacd.*, rshnl.* all at once): the report and the index read it in this layout,
    and a resume that extends it ends where an uninterrupted run ends."""
    from scbch_dist.experiments.report import collect

    settings = ("eval.every=2", "scbch.warmup_epochs=1", "run.tensorboard=false")
    full = tmp_path / "full"
    main(tiny_args(tiny_dataset, full, "train.epochs=4", *settings))
    part = tmp_path / "part"
    main(tiny_args(tiny_dataset, part, "train.epochs=2", *settings))
    rewrite_as_version_0_1(part)
    (record,) = collect(tmp_path / "part")
    assert record["config"]["scbch.k"] == 5
    assert not any(k.startswith(("loss.", "cscc.", "nacd.")) for k in record["config"])
    if importlib.util.find_spec("faiss") is not None:
        from scbch_dist.retrieval.index import build

        build(part, log=lambda *_: None)  # codes.npz and config.yaml, both of 0.1, compared in this layout
    summary = main(["--resume", str(part), "--set", "train.epochs=4"])
    model_a, tables_a, state_a = read_checkpoint(full)
    model_b, tables_b, state_b = read_checkpoint(part)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(tables_a[k], tables_b[k]) for k in tables_a)
    assert state_b["config"] == {**state_a["config"], "run": {**state_a["config"]["run"], "dir": str(part)}}
    assert summary["final"]["avg_map"] == json.loads((full / "summary.json").read_text())["final"]["avg_map"]
    assert "scbch:" in (part / "config.yaml").read_text() and "loss:" not in (part / "config.yaml").read_text()


@pytest.mark.slow
def test_accelerate_launch_runs_the_module(tiny_dataset, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate command line not installed")
    run_dir = tmp_path / "launched"
    cmd = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "scbch_dist.train",
           *tiny_args(tiny_dataset, run_dir, "train.epochs=2", "eval.every=2", "scbch.warmup_epochs=1")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    proc = launch(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["world_size"] == 1 and summary["final"]["epoch"] == 2


def test_bad_resume_and_batch_errors(tmp_path):
    with pytest.raises(RunDirError, match="not a run folder"):
        main(["--resume", str(tmp_path)])


@pytest.mark.parametrize("bits", [12, 256, 1024])
def test_pack_bits_matches_numpy(bits):
    from scbch_dist.engine.scoring import pack_bits

    b = torch.rand(7, bits, generator=torch.Generator().manual_seed(bits)) > 0.5
    assert np.array_equal(pack_bits(b).numpy(), np.packbits(b.numpy(), axis=1))
    assert pack_bits(b[:0]).shape == (0, -(-bits // 8))  # an empty part (a rank with no rows)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [512, 1024])
def test_long_codes_train_evaluate_and_pack(tiny_dataset, tmp_path, bits):
    run_dir = tmp_path / f"b{bits}"
    summary = main(tiny_args(tiny_dataset, run_dir, f"model.bits={bits}", "train.epochs=2", "eval.every=2",
                             "scbch.warmup_epochs=1", "run.tensorboard=false"))
    assert summary["final"]["avg_map"] > summary["chance_map"]
    codes = np.load(run_dir / "codes.npz")
    assert int(codes["bits"]) == bits and codes["database_txt"].shape == (520, bits // 8)
    # the packed codes rank exactly as the metrics saw them
    from scbch_dist import metrics

    q = np.unpackbits(codes["query_img"], axis=1)
    d = np.unpackbits(codes["database_txt"], axis=1)
    assert metrics.mean_average_precision(q, d, codes["query_lab"], codes["database_lab"]) == \
        pytest.approx(summary["final"]["i2t"]["map"], abs=1e-12)
    if bits == 1024:  # the exact Hamming index of these codes ranks as the metrics, to the same mAP
        pytest.importorskip("faiss")
        from scbch_dist.retrieval.index import build, check

        build(run_dir, log=lambda *_: None)
        for row in check(run_dir):
            assert row["same_ranking"]
            assert row["map_from_index"] == pytest.approx(summary["final"][row["direction"]]["map"], abs=1e-12)


def test_refresh_path_equals_the_cscc_weights_reference(tiny_dataset, tmp_path):
    """The engine's pass refresh and SCBCH's epoch_start (kNN backend, gathered bank, weights by id)
    give losses.cscc_weights, the whole-set reference."""
    from scbch_dist.config import load_config
    from scbch_dist.data.format import read_meta
    from scbch_dist.engine.bank import BankSource
    from scbch_dist.engine.encode import encode_part, encode_split
    from scbch_dist.losses import cscc_weights
    from scbch_dist.methods import SCBCH, EpochContext, TrainingSet
    from scbch_dist.models import SCBCHModel
    from scbch_dist.engine.runlog import setup_logging

    meta = read_meta(tiny_dataset)
    cfg = load_config(None, ["scbch.k=7", "scbch.gamma=0.3", "model.bits=16", "scbch.warmup_epochs=1"])
    torch.manual_seed(0)
    model = SCBCHModel(meta.dim("img"), meta.dim("txt"), 16, 32, meta.num_classes)
    labels = torch.from_numpy(np.load(tiny_dataset / "labels" / "clean.npy"))
    cpu = torch.device("cpu")
    train = TrainingSet(400, meta.num_classes, labels, None, cpu)
    source = BankSource("pass", 400, 16, cpu, log=setup_logging(None, True),
                        encode_train=lambda: encode_part(model, tiny_dataset, meta, "train", batch_size=64, device=cpu))
    method = SCBCH(cfg, train)
    assert method.epoch_start(EpochContext(0, 3, train, source.build, tmp_path, False)) == {}  # warm-up
    diag = method.epoch_start(EpochContext(1, 3, train, source.build, tmp_path, False))
    assert diag["cscc_weights"]["source"] == "pass"
    enc = encode_split(model, tiny_dataset, meta, "train", batch_size=100, device=cpu)
    ref = cscc_weights(enc["h_img"], enc["h_txt"], labels, k=7, gamma=0.3)
    got = method.weights.values
    assert got.shape == (400,) and torch.allclose(got, ref, atol=1e-5)

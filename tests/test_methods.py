"""The method interface: a method written outside the package (tests/toy_method.py: SCBCH's
contrastive and quantisation terms, a per-id table updated after every batch, an epoch-end hook
reading the bank) trains through the engine unchanged, on one process, resumed, and on two."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_method  # noqa: F401  (registers contrast-only)
from conftest import read_checkpoint, tiny_args, tiny_synthetic_config
from scbch_dist.data.synthetic import write_synthetic
from scbch_dist.config import ConfigError
from scbch_dist.methods import METHODS, SCBCH, get_method
from scbch_dist.train import main

SCRIPTS = Path(__file__).parent / "dist_scripts"
TOY = ("method.name=contrast-only", "run.method=ContrastOnly", "run.tensorboard=false")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_registry():
    assert get_method("scbch") is SCBCH and METHODS["contrast-only"].terms == ("total", "bsch", "quant")
    with pytest.raises(KeyError, match="method.name must be one of"):
        get_method("nope")


def test_an_unknown_method_is_refused_naming_the_key(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="method.name must be one of .*'scbch'.*got 'nope'"):
        main(tiny_args(tiny_dataset, tmp_path / "r", "method.name=nope", "train.epochs=1"))


@pytest.mark.slow
def test_a_method_from_outside_the_package_trains_and_resumes(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    summary = main(tiny_args(tiny_dataset, full, *TOY, "train.epochs=4", "eval.every=4"))
    recs = records(full)
    assert [set(r["loss"]) for r in recs] == [{"total", "bsch", "quant"}] * 4
    # one process: every id once per epoch, and the table (exchanged after every epoch) says so
    assert [(r["toy"]["visits_min"], r["toy"]["visits_max"]) for r in recs] == [(e, e) for e in (1.0, 2.0, 3.0, 4.0)]
    assert all(r["toy"]["bank_rows"] == 400 and r["toy"]["bank_source"] == "pass" for r in recs)
    assert summary["diagnostics"]["toy"]["visits_total"] == 1600 and summary["run"]["method"] == "ContrastOnly"
    assert summary["final"]["avg_map"] > summary["chance_map"] + 0.1  # it learned
    model, tables, _ = read_checkpoint(full)
    assert not any(k.startswith("head.") for k in model)  # no classifiers were built
    assert torch.equal(tables["method.visits.values"], torch.full((400,), 4.0))

    part = tmp_path / "part"
    main(tiny_args(tiny_dataset, part, *TOY, "train.epochs=2", "eval.every=4"))
    resumed = main(["--resume", str(part), "--set", "train.epochs=4"])
    model_b, tables_b, _ = read_checkpoint(part)
    assert all(torch.equal(model[k], model_b[k]) for k in model)
    assert torch.equal(tables_b["method.visits.values"], tables["method.visits.values"])  # the table was restored
    assert resumed["final"]["avg_map"] == summary["final"]["avg_map"]


@pytest.mark.slow
def test_a_method_from_outside_the_package_on_two_processes(tmp_path):
    """4 training shards of 100 over 2 ranks: each rank trains its 200 ids once per epoch, so after
    every exchange both ranks hold the table one process would: every id visited once per epoch."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not installed")
    root = tmp_path / "even"
    write_synthetic(root, tiny_synthetic_config(samples_per_shard=100))
    run_dir = tmp_path / "two"
    cmd = [exe, "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "toy_train.py"),
           *tiny_args(root, run_dir, *TOY, "train.epochs=3", "eval.every=3", "cscc.refresh=memory")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = records(run_dir)
    assert [(r["toy"]["visits_min"], r["toy"]["visits_max"], r["toy"]["visits_total"]) for r in recs] == \
        [(1.0, 1.0, 400.0), (2.0, 2.0, 800.0), (3.0, 3.0, 1200.0)]
    assert all(r["toy"]["ranks_agree"] for r in recs)
    # the memory held every id after epoch 1: the epoch-end banks came from it, no encoding pass
    assert [r["toy"]["bank_source"] for r in recs] == ["memory"] * 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2 and summary["final"]["avg_map"] > summary["chance_map"]

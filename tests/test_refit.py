"""Refit after selection (docs/evaluation.md, "Refit after selection"): a run that held rows out
trains again on every row for the epochs they selected, in RUN_DIR/refit, and reports that run's
final evaluation as ``refit``; stopped, the refit resumes; the report shows it as a fourth figure."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest

from conftest import launch, one_line_exit, stop_after_step, tiny_args, torchrun
from scbch_dist import refit as refit_module
from scbch_dist.config import read_run_config
from scbch_dist.digests import read_sealed_json
from scbch_dist.engine.rundir import launch_state
from scbch_dist.errors import Preempted
from scbch_dist.experiments import report
from scbch_dist.train import main

pytestmark = pytest.mark.slow

HELD_OUT = 40  # of the tiny dataset's 400 training rows
SETTINGS = (f"eval.validation={HELD_OUT}", "eval.every=1", "train.epochs=6", "run.tensorboard=false")


CODES = ("query_img", "query_txt", "database_img", "database_txt")


def codes(run_dir) -> dict:
    with np.load(run_dir / "codes.npz") as z:
        return {k: z[k] for k in CODES}


@pytest.fixture(scope="module")
def refitted(tiny_dataset, tmp_path_factory):
    """A run with eval.refit: its folder and summary."""
    run_dir = tmp_path_factory.mktemp("refit") / "run"
    return run_dir, main(tiny_args(tiny_dataset, run_dir, *SETTINGS, "eval.refit=true"))


def test_the_refit_is_the_run_on_every_row_for_the_selected_epochs(tiny_dataset, refitted, tmp_path):
    """Its figure equals the final evaluation of the same config trained by hand with no rows held
    out for the selected number of epochs, to the bit; the run's summary keeps it, sealed."""
    run_dir, summary = refitted
    epochs = summary["selected"]["epoch"]
    saved = read_run_config(run_dir / "refit" / "config.yaml")
    assert (saved["eval"]["validation"], saved["eval"]["refit"], saved["train"]["epochs"]) == (0, False, epochs)

    by_hand = main(tiny_args(tiny_dataset, tmp_path / "hand", *SETTINGS, "eval.validation=0", f"train.epochs={epochs}",
                             f"eval.every={epochs}"))
    assert summary["refit"]["epoch"] == epochs
    for key in ("avg_map", "avg_map_tie_aware"):
        assert summary["refit"][key] == by_hand["final"][key]
    mine, theirs = codes(run_dir / "refit"), codes(tmp_path / "hand")
    for k in CODES:
        assert np.array_equal(mine[k], theirs[k]), k
    on_disk = read_sealed_json(run_dir / "summary.json", required=True)
    assert on_disk["refit"]["avg_map"] == by_hand["final"]["avg_map"]
    assert on_disk["selected"] == json.loads(json.dumps(summary["selected"]))  # the run's own figures kept
    assert launch_state(run_dir) == "done"


def test_the_report_shows_the_refit_beside_selected_and_not_as_a_run(refitted, tmp_path):
    run_dir, summary = refitted
    records = report.collect(run_dir.parent)
    assert len(records) == 1 and records[0]["refit"]["avg_map"] == summary["refit"]["avg_map"]
    report.main([str(run_dir.parent), "--out", str(tmp_path)])
    assert "best / final / selected / refit mAP" in (tmp_path / "report.md").read_text()
    with open(tmp_path / "report.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["refit_avg"]) == pytest.approx(summary["refit"]["avg_map"], abs=1e-12)
    assert float(row["selected_avg"]) == pytest.approx(summary["selected"]["avg_map"], abs=1e-12)


def test_a_stopped_refit_resumes_with_the_run_and_ends_as_the_uninterrupted_one(tiny_dataset, refitted, tmp_path,
                                                                                monkeypatch):
    """Stopped inside its first epoch, the refit leaves the run finished but its refit pending:
    launchers resume it (launch_state), ``--resume RUN_DIR`` trains only the refit, from its
    checkpoint, and the figure equals the uninterrupted refit's."""
    reference, summary = refitted
    run_dir = tmp_path / "run"
    # the run's steps: 6 epochs of ceil(360 / 32); then 5 steps into the refit's first epoch
    stop_after_step(monkeypatch, 6 * math.ceil((400 - HELD_OUT) / 32) + 5, "STOP", run_dir / "refit")
    with pytest.raises(Preempted):
        main(tiny_args(tiny_dataset, run_dir, *SETTINGS, "eval.refit=true"))
    monkeypatch.undo()
    assert "refit" not in read_sealed_json(run_dir / "summary.json", required=True)
    assert launch_state(run_dir) == "resume" and launch_state(run_dir / "refit") == "resume"

    resumed = main(["--resume", str(run_dir)])
    assert "resumed " in (run_dir / "refit" / "log.txt").read_text()
    assert resumed["refit"]["avg_map"] == summary["refit"]["avg_map"]
    mine, theirs = codes(run_dir / "refit"), codes(reference / "refit")
    for k in CODES:
        assert np.array_equal(mine[k], theirs[k]), k
    assert launch_state(run_dir) == "done"


def test_a_refit_without_held_out_rows_or_a_finished_run_is_one_line(tiny_dataset, tmp_path, capsys):
    """eval.refit (the default) does nothing where no rows were held out; the command says why."""
    summary = main(tiny_args(tiny_dataset, tmp_path / "plain", "train.epochs=1", "eval.every=1", "eval.refit=true"))
    assert "refit" not in summary and not (tmp_path / "plain" / "refit").exists()
    assert launch_state(tmp_path / "plain") == "done"
    line = one_line_exit(capsys, refit_module.main, [str(tmp_path / "missing")])
    assert "no summary.json; the run has not finished" in line
    line = one_line_exit(capsys, refit_module.main, [str(tmp_path / "plain")])
    assert "no 'selected' evaluation (the run held no rows out" in line


def test_the_documented_command_refits_a_finished_run(tiny_dataset, tmp_path):
    """``python -m scbch_dist.refit RUN_DIR`` on a run that held rows out without eval.refit."""
    run_dir = tmp_path / "run"
    main(tiny_args(tiny_dataset, run_dir, *SETTINGS, "eval.refit=false"))
    proc = launch([sys.executable, "-m", "scbch_dist.refit", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refit (" in proc.stdout
    assert "refit" in read_sealed_json(run_dir / "summary.json", required=True)


def test_two_processes_refit_like_two_processes_train_by_hand(tiny_dataset, tmp_path):
    """``torchrun -m scbch_dist.train`` with eval.refit on 2 processes: the refit is collective and
    equals, bit for bit, the by-hand 2-process run on every row for the selected epochs."""
    run_dir = tmp_path / "run"
    torchrun("-m", "scbch_dist.train", *tiny_args(tiny_dataset, run_dir, *SETTINGS, "eval.refit=true"))
    summary = read_sealed_json(run_dir / "summary.json", required=True)
    epochs = summary["selected"]["epoch"]
    assert read_sealed_json(run_dir / "refit" / "summary.json", required=True)["run"]["world_size"] == 2
    torchrun("-m", "scbch_dist.train", *tiny_args(tiny_dataset, tmp_path / "hand", *SETTINGS, "eval.validation=0",
                                                  f"train.epochs={epochs}", f"eval.every={epochs}"))
    by_hand = read_sealed_json(tmp_path / "hand" / "summary.json", required=True)
    assert summary["refit"]["avg_map"] == by_hand["final"]["avg_map"]
    mine, theirs = codes(run_dir / "refit"), codes(tmp_path / "hand")
    for k in CODES:
        assert np.array_equal(mine[k], theirs[k]), k

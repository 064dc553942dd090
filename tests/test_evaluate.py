"""python -m scbch_dist.evaluate (docs/evaluation.md): a finished run's codes re-scored under any
protocol, on one process or two, with the protocol card beside the numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scbch_dist import metrics
from scbch_dist.evaluate import main as evaluate_main
from scbch_dist.retrieval.index import RunCodes

from conftest import one_line_exit, run_with_codes, torchrun


def test_the_record_holds_every_metric_of_the_codes_and_the_protocol(tmp_path):
    codes = run_with_codes(tmp_path / "run", eval__topk=[10])
    record = evaluate_main([str(tmp_path / "run"), "--out", str(tmp_path / "eval.json"), "--topk", "5", "50", "5"])
    assert json.loads((tmp_path / "eval.json").read_text()) == record
    want = metrics.retrieval_metrics(codes["query_txt"], codes["database_img"], codes["query_lab"],
                                     codes["database_lab"], topk=[5, 50])
    assert record["t2i"] == json.loads(json.dumps(want))  # every number, the curves too
    assert record["avg_map"] == pytest.approx((record["i2t"]["map"] + want["map"]) / 2, abs=0)
    assert record["chance_map"] == metrics.chance_map(codes["query_lab"], codes["database_lab"])
    assert record["protocol"]["at_k"]["k"] == [5, 50] and "400 rows of the database split" in record["protocol"]["database"]
    assert record["codes_sha256"] == RunCodes.load(tmp_path / "run").sha256 and record["world_size"] == 1
    # without --topk: the run's eval.topk
    assert set(evaluate_main([str(tmp_path / "run"), "--out", str(tmp_path / "b.json")])["i2t"]["ndcg_at_k"]) == {"10"}


def test_a_run_without_codes_or_with_damaged_codes_is_one_line(tmp_path, capsys):
    run_with_codes(tmp_path / "run")
    path = tmp_path / "run" / "codes.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    line = one_line_exit(capsys, evaluate_main, [str(tmp_path / "run")])
    assert "codes.npz" in line
    path.unlink()
    assert "codes.npz: missing" in one_line_exit(capsys, evaluate_main, [str(tmp_path / "run")])


@pytest.mark.slow
def test_two_processes_write_the_record_of_one(tmp_path):
    run_with_codes(tmp_path / "run", n_query=51, n_db=900, bits=32)
    one = evaluate_main([str(tmp_path / "run"), "--out", str(tmp_path / "one.json"), "--topk", "20", "100"])
    torchrun("-m", "scbch_dist.evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "two.json"),
             "--topk", "20", "100")
    two = json.loads((tmp_path / "two.json").read_text())
    assert two.pop("world_size") == 2 and one.pop("world_size") == 1
    one.pop("seconds"), two.pop("seconds")
    assert two == one
    assert np.isfinite(two["i2t"]["ndcg_at_k"]["100"])


@pytest.mark.parametrize("precision", ["", "bf16"])
def test_the_checkpoint_encoded_again_gives_the_stored_codes_and_their_numbers(tiny_dataset, tmp_path, precision):
    from scbch_dist.retrieval.index import RunCodes
    from scbch_dist.train import main as train_main

    from conftest import tiny_args

    # bf16: the codes were encoded under autocast, and are encoded again under the autocast codes.npz records
    train_main(tiny_args(tiny_dataset, tmp_path / "run", "train.epochs=2", "eval.every=2",
                         f"train.mixed_precision={precision}"))
    assert RunCodes.load(tmp_path / "run").precision == (precision or "no")
    stored = evaluate_main([str(tmp_path / "run"), "--out", str(tmp_path / "stored.json"), "--topk", "10"])
    again = evaluate_main([str(tmp_path / "run"), "--out", str(tmp_path / "again.json"), "--topk", "10", "--encode"])
    assert again.pop("encoded") == {"equal": True, "bits_differing": 0}
    for record in (stored, again):
        record.pop("seconds"), record["protocol"].pop("selection")
    assert again == stored
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["avg_map"] == summary["final"]["avg_map"]

"""Model selection without the test set (docs/evaluation.md, "Selecting a model without the test
set"): the held-out rows, a training stream and a refresh that never see them, their score, and
``selected`` in summary.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scbch_dist.config import load_config
from scbch_dist.data.format import read_meta
from scbch_dist.data.labels import held_out_ids
from scbch_dist.data.pipeline import TrainStream
from scbch_dist.knn import exact_topk
from scbch_dist.methods import Bank
from scbch_dist.methods.base import neighbours
from scbch_dist.train import main

from conftest import one_line_exit, tiny_args


def test_the_held_out_rows_depend_only_on_the_training_set_size():
    ids = held_out_ids(1000, 100)
    assert len(np.unique(ids)) == 100 and np.array_equal(ids, np.sort(ids)) and ids.max() < 1000
    assert np.array_equal(ids, held_out_ids(1000, 100))  # no seed, no method: every run of a sweep shares them
    assert not np.array_equal(ids, held_out_ids(1001, 100)[:100])
    with pytest.raises(ValueError):
        held_out_ids(10, 10)


@pytest.mark.parametrize("world", [1, 3])
def test_the_training_stream_never_yields_a_held_out_row(tiny_dataset, world):
    meta = read_meta(tiny_dataset)
    held = np.zeros(400, dtype=bool)
    held[held_out_ids(400, 60)] = True
    seen, steps = [], set()
    for rank in range(world):
        stream = TrainStream(root=tiny_dataset, meta=meta, batch_size=32, seed=1, rank=rank, world=world,
                             held_out=held)
        batches = [b["id"] for b in stream.epoch(0)]
        assert sum(len(b) for b in batches) == -(-340 // world)  # the quota of the 340 trained rows
        steps.add(len(batches))
        seen.append(np.concatenate(batches))
    ids = np.concatenate(seen)
    assert not held[ids].any()
    assert len(steps) == 1  # every rank takes the same number of steps
    if world == 1:  # one pass: every trained row once (over uneven shards, ranks fill their quota unevenly)
        assert sorted(ids) == list(np.flatnonzero(~held))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_held_out_row_is_never_a_neighbour_and_the_others_keep_their_similarities(sharded):
    """The search with held-out rows equals the exact search over the training rows alone (ids
    mapped back), whatever the backend sees; on one process a sharded bank is the whole bank."""
    g = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1) * 2 ** 0.5
    held = torch.zeros(60, dtype=torch.bool)
    held[torch.from_numpy(held_out_ids(60, 12))] = True
    cfg = load_config(None, ["bank.knn=torch"])
    bank = Bank(rows, torch.arange(60), "pass", 0.0, sharded=sharded, held_out=held)
    sims, index = neighbours(cfg, bank, 5)
    trained = torch.nonzero(~held).flatten()
    ref_sims, ref_pos = exact_topk(rows[trained], rows[trained], 5, self_index=torch.arange(len(trained)))
    assert torch.equal(index[trained], trained[ref_pos])
    torch.testing.assert_close(sims[trained], ref_sims, rtol=0, atol=1e-6)
    assert not held[index[trained]].any()


@pytest.mark.parametrize("select", ["pairs", "labels"])
def test_a_run_selects_an_epoch_by_its_held_out_rows(tiny_dataset, tmp_path, select):
    summary = main(tiny_args(tiny_dataset, tmp_path / "run", "eval.validation=100", "train.epochs=4", "eval.every=1",
                             f"eval.select={select}"))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r["eval"]["validation"] for r in history if "eval" in r]
    scores = [v["pairs"]["avg"] if select == "pairs" else v["avg_map"] for v in validation]
    assert len(scores) == 4 and all(0 < s <= 1 for s in scores) and [v["score"] for v in validation] == scores
    selected = summary["selected"]
    assert selected["validation"]["score"] == max(scores) and selected["epoch"] == 1 + int(np.argmax(scores))
    assert selected["validation"]["rows"] == 100 and f"({select})" in selected["selected_by"]
    assert "no test data" in selected["selected_by"]
    assert "selected" in summary["protocol"]["selection"]
    assert summary["final"]["epoch"] == 4 and summary["best"]["avg_map"] >= selected["avg_map"]
    # the held-out rows cost the training set 100 rows: ceil(300 / 32) steps an epoch
    assert summary["throughput"]["train_steps_per_s"] > 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "100 training rows held out for validation" in log and "10 steps per epoch" in log


@pytest.mark.parametrize("setting,message", [
    (("eval.validation=1",), "eval.validation is a number of held-out training rows"),
    (("eval.validation=100", "bank.refresh=memory"), "use bank.refresh=pass with a validation split"),
    (("eval.validation=201",), "eval.validation=201: more than half of the 400 training rows"),
    (("eval.select=test",), "eval.select must be one of pairs, labels"),
])
def test_a_validation_split_that_cannot_work_is_one_line(tiny_dataset, tmp_path, capsys, setting, message):
    assert message in one_line_exit(capsys, main, tiny_args(tiny_dataset, tmp_path / "run", *setting))

"""Two CPU processes (gloo) against one: the global-batch semantics of docs/distributed.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scbch_dist.losses import bsch_loss, cscc_loss, quantization_loss

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
from common import code_batch  # noqa: E402
from conftest import torchrun  # noqa: E402


@pytest.mark.slow
def test_loss_shares_sum_to_the_global_loss_and_gradients_match(tmp_path):
    torchrun(str(SCRIPTS / "loss_shares.py"), str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    batch = code_batch()
    leaves = {k: batch[k].clone().requires_grad_() for k in ("h_img", "h_txt", "p_img", "p_txt")}
    whole = {
        "bsch": bsch_loss(leaves["h_img"], leaves["h_txt"], batch["lab"], margin=0.2, shift=1.0),
        "quant": quantization_loss(leaves["h_img"], leaves["h_txt"]),
        "cscc": cscc_loss(leaves["p_img"], leaves["p_txt"], batch["lab"], batch["w"]),
    }
    (0.7 * whole["bsch"] + 0.3 * whole["quant"] + whole["cscc"]).backward()
    for term, value in whole.items():
        assert float(parts[0]["shares"][term] + parts[1]["shares"][term]) == pytest.approx(value.item(), abs=1e-12)
    for k, leaf in leaves.items():
        got = torch.cat([parts[0]["grads"][k], parts[1]["grads"][k]])
        assert torch.allclose(got, leaf.grad, atol=1e-12, rtol=0), k


@pytest.fixture(scope="module")
def method_steps(tmp_path_factory):
    """Every method's steps on 1 process x 16 rows and on 2 processes x 8 rows (one run each)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "method_steps.py"), str(one)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torchrun(str(SCRIPTS / "method_steps.py"), str(two))
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scbch", "nacd", "rshnl"])
def test_two_processes_train_like_one_process_with_twice_the_batch(method_steps, name):
    """The loss of every step (the shares summed), the parameters after five DDP steps, the tables
    after their exchange and the epoch hooks (SCBCH's refresh, NACD's reconstruction) all equal the
    one-process run."""
    one, two = method_steps
    a, b = torch.load(one / f"{name}.pt", weights_only=False), torch.load(two / f"{name}.pt", weights_only=False)
    assert torch.allclose(a["losses"], b["losses"], atol=1e-10, rtol=0), (a["losses"], b["losses"])
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-10, rtol=0), k
    for k in a["tables"]:
        assert torch.allclose(a["tables"][k], b["tables"][k], atol=1e-6, rtol=0), k
    assert a["records"].keys() == b["records"].keys()
    # the comparison is not between two initialisations: the steps moved the parameters
    assert max(float((a["params"][k] - a["initial"][k]).abs().max()) for k in a["params"]) > 1e-3
    if name == "nacd":
        assert not torch.equal(a["tables"]["thresholds"], torch.full((5,), 0.5))  # the reconstruction ran
    if name == "scbch":
        assert a["records"]["cscc_weights"]["source"] == "pass"


@pytest.mark.slow
def test_trainer_runs_with_two_processes_and_two_workers_each(tiny_dataset, tmp_path):
    """5 training shards over 2 ranks x 2 workers: uneven, yet every rank takes the same number
    of steps, and the refresh and evaluation passes see every id exactly once (gather_by_id
    raises otherwise)."""
    run_dir = tmp_path / "two"
    sets = [f"data.root={tiny_dataset}", "data.generate=", "data.workers=2", f"run.dir={run_dir}", "model.bits=16",
            "model.hidden=32", "train.batch_size=64", "train.epochs=3", "eval.every=3", "scbch.warmup_epochs=1",
            "scbch.k=5", "run.progress=false", "run.tensorboard=false"]
    torchrun("-m", "scbch_dist.train", *[a for s in sets for a in ("--set", s)])
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and "auc" in records[-1]["cscc_weights"]
    assert summary["final"]["avg_map"] > summary["chance_map"]

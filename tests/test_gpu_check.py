"""tests/gpu/check.py, the prepared GPU check: a dry run where there is no GPU, and every check's
code at toy size on the CPU (docs/distributed.md, "The GPU check")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_without_cuda_every_check_is_skipped_by_name_and_the_run_passes(tmp_path, capsys):
    assert check.main(["--out", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert list(results) == [name for name, *_ in check.CHECKS]
    assert all(r["status"] == "skip: no CUDA device" for r in results.values())
    out = capsys.readouterr().out
    assert out.startswith("| check | status | seconds | figures |") and "| nccl | skip: no CUDA device |" in out


def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    def broken(tmp, cpu):
        return [[sys.executable, "-c", "raise SystemExit('boom')"]], None
    monkeypatch.setattr(check, "CHECKS", [("metrics", broken, 30, None)])
    assert check.main(["--cpu", "--out", str(tmp_path / "r.json")]) == 1
    result = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert result["status"] == "FAIL" and "boom" in result["reason"]


@pytest.mark.slow
def test_every_check_runs_its_code_at_toy_size_on_the_cpu(tmp_path):
    assert check.main(["--cpu", "--only", "train-bf16", "metrics", "refresh", "nccl", "paper-epoch", "deepspeed",
                       "--out", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["deepspeed"]["status"].startswith("skip")
    for name in ("train-bf16", "metrics", "refresh", "nccl", "paper-epoch"):
        assert results[name]["status"] == "pass", (name, results[name])
    assert results["metrics"]["figures"]["max |AP diff|"] < 1e-9
    assert results["refresh"]["figures"]["torch-ivf recall@20"] > 0.5
    assert results["nccl"]["figures"]["processes"] == 2

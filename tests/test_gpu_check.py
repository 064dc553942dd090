"""tests/gpu/check.py, the prepared GPU check: a dry run where there is no GPU, and every check's
code at toy size on the CPU (docs/distributed.md, "The GPU check")."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import check  # noqa: E402

from scbch_dist.engine.setup import has_native_bf16  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_without_cuda_every_check_is_skipped_by_name_and_the_run_passes(tmp_path, capsys):
    assert check.main(["--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    results = report["checks"]
    assert list(results) == [name for name, *_ in check.CHECKS]
    assert all(r["status"] == "skip: no CUDA device" for r in results.values())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["missing"] == {}
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"environment: no GPU; Python ") and f"torch {torch.__version__}" in out[0]
    assert out[1] == "| check | status | seconds | figures |" and "| nccl | skip: no CUDA device |  |  |" in out


def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    def broken(tmp, cpu):
        return [[sys.executable, "-c", "raise SystemExit('boom')"]], None
    monkeypatch.setattr(check, "CHECKS", [("metrics", broken, 30, None)])
    assert check.main(["--cpu", "--out", str(tmp_path / "r.json")]) == 1
    result = json.loads((tmp_path / "r.json").read_text())["checks"]["metrics"]
    assert result["status"] == "FAIL" and "boom" in result["reason"]


def test_a_dependency_that_does_not_import_stops_the_check_before_any_runs(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(check, "CHECKS", [("metrics", lambda tmp, cpu: ran.append(1) or ([], None), 30, None)])
    monkeypatch.setattr(check, "REQUIRED", (*check.REQUIRED, "scbch_no_such_module"))
    assert check.main(["--cpu", "--out", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert ran == [] and report["checks"] == {}
    assert "No module named 'scbch_no_such_module'" in report["environment"]["missing"]["scbch_no_such_module"]
    assert "cannot run: scbch_no_such_module (ModuleNotFoundError" in capsys.readouterr().err


def test_the_budget_cuts_limits_skips_what_no_longer_fits_and_out_holds_each_result_as_it_comes(tmp_path,
                                                                                                   monkeypatch):
    out, now, started = tmp_path / "r.json", [0.0], []

    def run_check(name, build, limit, tmp, cpu, cut):  # each check takes 30 s of the clock
        started.append((name, limit, cut, json.loads(out.read_text())["checks"]))
        now[0] += 30
        return {"status": "pass", "seconds": 30.0}
    monkeypatch.setattr(check, "clock", lambda: now[0])
    monkeypatch.setattr(check, "run_check", run_check)
    monkeypatch.setattr(check, "CHECKS", [("metrics", None, 60, None), ("refresh", None, 60, None),
                                          ("finetune", None, 60, None)])
    assert check.main(["--cpu", "--budget", "70", "--out", str(out)]) == 0
    # --out holds the environment before the first check, and each result before the next check
    assert started == [("metrics", 60, False, {}), ("refresh", 40, True, {"metrics": {"status": "pass", "seconds": 30.0}})]
    results = json.loads(out.read_text())["checks"]
    assert results["finetune"] == {"status": f"skip: 10 s left of the --budget of 70 s (a check starts with {check.MIN_CHECK_S} s)"}


def test_a_check_out_of_time_is_killed_with_its_children_and_fails_unless_the_budget_cut_it(tmp_path):
    pid_file = tmp_path / "pid"

    def spawner(tmp, cpu):  # a launcher's child that would outlive its parent's kill
        return [["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]], None
    own = check.run_check("refresh", spawner, 1.5, tmp_path, True, cut=False)
    assert own["status"] == "FAIL" and own["reason"] == "over its 2 s limit"
    child = int(pid_file.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    cut = check.run_check("refresh", spawner, 1.5, tmp_path, True, cut=True)
    assert cut["status"] == "skip: ran out of the 2 s the --budget had left" and "reason" not in cut


def _wheel(folder: Path, module: str, source: str) -> Path:
    """A minimal pure-Python wheel holding one module (what pip needs: the module, METADATA, WHEEL)."""
    path = folder / f"{module}-1.0-py3-none-any.whl"
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}.py", source)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_check_sh_installs_the_given_wheels_offline_onto_the_path_of_the_check(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "scbch_probe_module", "ANSWER = 42\n")
    # PYTHON stands in for the interpreter: pip runs for real, and "the check" reports the probe's value
    shim = tmp_path / "python"
    shim.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == "-m" ]]; then exec {sys.executable} "$@"; fi\n'
                    f'exec {sys.executable} -c "import scbch_probe_module as m; print(\'probe\', m.ANSWER)"\n')
    shim.chmod(0o755)
    script = Path(check.__file__).with_name("check.sh")
    done = subprocess.run(["bash", str(script), "--wheels", str(wheels), "--only", "metrics"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(shim)})
    assert done.returncode == 0 and done.stdout == "probe 42\n", done.stderr
    empty = subprocess.run(["bash", str(script), "--wheels", str(tmp_path / "none")], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHON": str(shim)})
    assert empty.returncode == 2 and f"no wheels in '{tmp_path / 'none'}'" in empty.stderr


@pytest.mark.slow
def test_every_check_runs_its_code_at_toy_size_on_the_cpu(tmp_path):
    assert check.main(["--cpu", "--only", "train-bf16", "metrics", "refresh", "nccl", "paper-epoch", "deepspeed",
                       "--out", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert results["deepspeed"]["status"].startswith("skip")
    for name in ("train-bf16", "metrics", "refresh", "nccl", "paper-epoch"):
        assert results[name]["status"] == "pass", (name, results[name])
    assert results["train-bf16"]["figures"]["auto chose"] == ("bf16" if has_native_bf16() else "no")
    assert results["metrics"]["figures"]["max |AP diff|"] < 1e-9
    assert results["refresh"]["figures"]["torch-ivf recall@20"] > 0.5
    assert results["nccl"]["figures"]["processes"] == 2

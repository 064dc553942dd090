"""An installed package, not the checkout: the wheel carries the configs, and the README's headline
command runs from an empty folder (docs/testing.md). The wheel is installed into a folder of its
own and put first on the path, ahead of this checkout's editable install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built as a wheel and installed (without dependencies: the test's own
    environment has them) into a fresh site folder."""
    base = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(base / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (base / "dist").glob("scbch_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "scbch_dist/configs/default.yaml" in names and "scbch_dist/configs/accelerate/cpu_2proc.yaml" in names
    assert "scbch_dist/retrieval/static/search.html" in names
    site = base / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_installed_package_runs_the_headline_command_from_an_empty_folder(installed, tmp_path):
    where = run_installed(installed, tmp_path, "-c", "import scbch_dist; print(scbch_dist.__file__)")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    small = ["synthetic.n_train=400", "synthetic.n_query=60", "synthetic.n_extra_database=100", "model.hidden=64",
             "train.epochs=2", "eval.every=2", "scbch.warmup_epochs=1", "scbch.k=5", "run.progress=false"]
    proc = run_installed(installed, tmp_path, "-m", "scbch_dist.train", *[a for s in small for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())
    assert summary["run"]["dataset"] == "synthetic" and summary["run"]["epochs"] == 2
    assert (tmp_path / "shards" / "synthetic" / "meta.json").is_file()
    # a packaged config by the README's spelling, from a folder without configs/
    proc = run_installed(installed, tmp_path, "-m", "scbch_dist.train", "--config", "configs/finetune-tiny.yaml",
                         "--set", "train.epochs=0")
    assert proc.returncode == 2 and "train.epochs must be at least 1" in proc.stderr, proc.stderr[-2000:]

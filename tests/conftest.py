"""Shared fixtures: tiny datasets written on the fly, and the real MIRFlickr files when present."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scbch_dist import metrics
from scbch_dist.config import Config, SyntheticConfig, save_config, to_dict
from scbch_dist.data.format import write_dataset
from scbch_dist.data.synthetic import write_synthetic
from scbch_dist.digests import write_sealed_json
from scbch_dist.run import RunFolder

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCBCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MIRFLICKR = SHARED / "data" / "mirflickr25k"


def tiny_synthetic_config(**overrides) -> SyntheticConfig:
    cfg = SyntheticConfig(seed=3, n_query=80, n_train=400, n_extra_database=120, img_dim=48, txt_dim=96,
                          samples_per_shard=96)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset (5 training shards, the last one partial), shared read-only."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    write_synthetic(root, tiny_synthetic_config())
    return root


def random_dataset(root: Path, n_train: int = 50, img_dim: int = 8, txt_dim: int = 5, classes: int = 4,
                   seed: int = 0, **kw) -> dict:
    """Write a dataset of random arrays; returns the arrays per split."""
    rng = np.random.default_rng(seed)

    def split(n):
        lab = (rng.random((n, classes)) < 0.4).astype(np.uint8)
        lab[np.arange(n), rng.integers(classes, size=n)] = 1
        return (rng.normal(size=(n, img_dim)).astype(np.float32),
                rng.normal(size=(n, txt_dim)).astype(np.float32), lab)

    arrays = {"train": split(n_train), "query": split(7), "database": split(11)}
    write_dataset(root, name="random", classes=[f"c{i}" for i in range(classes)], splits=arrays,
                  img_dtype="float32", txt_dtype="float32", **kw)
    return arrays


def needs_mirflickr():
    return pytest.mark.skipif(not (MIRFLICKR / "mirflickr25k-lall.mat").is_file(),
                              reason=f"real MIRFlickr files not found under {MIRFLICKR}")


def rewrite_shard(path: Path, edit):
    """Rewrite a shard through ``edit(name, bytes) -> bytes | None`` (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_checkpoint(run_dir: Path) -> tuple[dict, dict, dict]:
    """(model state, per-id tables, run_state.json) of a run's latest checkpoint, read as files:
    safetensors and JSON, nothing unpickled."""
    import json

    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return (load_file(str(folder / "model.safetensors")), load_file(str(folder / "tables.safetensors")),
            json.loads((folder / "run_state.json").read_text()))


def tiny_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """Command-line arguments of a short run on ``tiny_dataset`` (16 bits, width 64, 6 epochs; SCBCH
    warmed up 2 epochs with 5 neighbours, settings another ``method.name`` in ``extra`` does not take)."""
    settings = [f"data.root={root}", "data.generate=", "data.noise=mixed:0.5", f"run.dir={run_dir}",
                "model.bits=16", "model.hidden=64", "train.batch_size=32", "train.epochs=6", "train.lr=3e-3",
                "eval.every=3", "run.progress=false", "eval.topk=[50]"]
    if not any(s.startswith("method.name=") and s != "method.name=scbch" for s in extra):
        settings += ["scbch.warmup_epochs=2", "scbch.k=5"]
    return [a for s in [*settings, *extra] for a in ("--set", s)]


def one_line_exit(capsys, entry, argv: list[str], code: int = 2) -> str:
    """Run ``entry(argv)`` as its command line does (scbch_dist.cli.run); returns the error line
    (exit status ``code``, the last stderr line ``prog: error: ...``)."""
    from scbch_dist import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: entry(argv), "prog")
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("prog: error: "), err
    return err[-1][len("prog: error: "):]


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float64 unit-length codes (tanh, then L2), as the towers make them."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.tanh(torch.randn(n, d, generator=g, dtype=torch.float64)), dim=1)


def labels(n: int, c: int, seed: int, p: float = 0.35) -> torch.Tensor:
    """(n, c) float64 multi-hot labels, at least one per row."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, c, generator=g) < p).double()
    y[torch.arange(n), torch.randint(c, (n,), generator=g)] = 1
    return y


def torchrun(*args: str, nproc: int = 2) -> None:
    """``torchrun --standalone --nproc_per_node N ARGS`` (a script and its arguments, or ``-m`` and a
    module) from the repository root, one thread per process; skipped where torchrun is missing,
    failed with the tail of its stderr."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not installed")
    proc = launch([exe, "--standalone", "--nproc_per_node", str(nproc), *args], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), read from /proc; empty where there is none."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return found


def launch(cmd: list[str], *, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a launcher command (torchrun, accelerate launch) from the repository root, its output
    captured. If it outlives ``timeout`` (a hang), every process it started is asked for its
    threads' stacks (``kill -USR2``: scbch_dist.cli registers faulthandler on it), then the whole
    session is killed and the test fails with the end of stderr, stacks included."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):  # not the launcher itself: USR2 would only end it
            try:
                os.kill(pid, signal.SIGUSR2)
            except OSError:
                pass
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... still running after {timeout:.0f} s; the stacks of its processes and "
                    f"the end of its stderr:\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_with_codes(path, *, bits: int = 24, n_query: int = 50, n_db: int = 400, seed: int = 0, **config) -> dict:
    """A finished run's files as train writes them, with codes near shared centres."""
    rng = np.random.default_rng(seed)
    cfg = Config()
    cfg.model.bits = bits
    cfg.run.dir = str(path)
    for key, value in config.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "config.yaml")
    labels = {s: (rng.random((n, 6)) < 0.3).astype(np.uint8) for s, n in (("query", n_query), ("database", n_db))}
    centres = rng.random((6, bits)) < 0.5
    codes = {}
    for s in ("query", "database"):
        base = centres[labels[s].argmax(1)]
        for m in ("img", "txt"):
            codes[f"{s}_{m}"] = base ^ (rng.random(base.shape) < 0.15)
        codes[f"{s}_lab"] = labels[s]
    RunFolder(path).write_codes(codes, model_sha256="ab" * 32, config=to_dict(cfg))
    summary = {d: metrics.retrieval_metrics(codes[f"query_{q}"], codes[f"database_{t}"], labels["query"],
                                            labels["database"]) for d, q, t in (("i2t", "img", "txt"),
                                                                                  ("t2i", "txt", "img"))}
    # sealed, as train writes it: config.yaml carries its digest, so a summary without one is refused
    write_sealed_json(path / "summary.json", {"final": {d: {"map": summary[d]["map"]} for d in summary}})
    return codes


def crash_in_epoch(monkeypatch, epoch: int) -> None:
    """The next run raises KeyboardInterrupt as epoch ``epoch`` (0-based) begins its steps, as a
    killed process would stop (no checkpoint of that epoch); ``monkeypatch.undo()`` lifts it."""
    from scbch_dist.engine import loop

    train_one_epoch = loop.train_one_epoch

    def killed(run, progress):
        if progress.epoch == epoch:
            raise KeyboardInterrupt
        return train_one_epoch(run, progress)

    monkeypatch.setattr(loop, "train_one_epoch", killed)


class RunsCode:
    """What a crafted model or weights file holds: an object whose unpickling runs a command
    (``touch marker``), so a test can tell whether any reader ran it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def as_an_earlier_version_wrote_it(run_dir: Path) -> None:
    """Strip the digests an earlier version did not write: config.yaml's line, summary.json's field,
    every checkpoint's manifest."""
    config = run_dir / "config.yaml"
    config.write_text("".join(config.read_text().splitlines(keepends=True)[:-1]))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("sha256")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for manifest in run_dir.glob("checkpoints/*/manifest.json"):
        manifest.unlink()


def stop_after_step(monkeypatch, n: int, how: str, run_dir: Path) -> None:
    """Ask the run to stop right after its n-th step (counted over the whole run)."""
    from scbch_dist.engine import loop, stop

    train_step, count = loop.train_step, [0]

    def step(*args, **kwargs):
        out = train_step(*args, **kwargs)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGTERM) if how == "SIGTERM" else (run_dir / "STOP").touch()
        return out

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(stop, "POLL_SECONDS", 0.0)  # look for the STOP file after every step

"""Sweeps (grid expansion, SLURM array script, local runs with skip/resume) and the paper report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scbch_dist import report, sweep

REPO = Path(__file__).resolve().parents[1]


def write_grid(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def test_grid_expands_in_order_with_one_folder_per_run(tmp_path):
    grid = sweep.load_grid(write_grid(tmp_path / "g.yaml", name="g", runs_dir=str(tmp_path / "runs"),
                                      datasets=["flickr", "coco"], bits=[16, 64], noise=[0.2, "file:/x/n.h5"],
                                      seeds=[0, 1], set=["train.epochs=3"]))
    runs = sweep.expand(grid)
    assert len(runs) == 16 and [r.task for r in runs] == list(range(16))
    assert (runs[0].dataset, runs[0].bits, runs[0].noise, runs[0].seed) == ("flickr", 16, "mixed:0.2", 0)
    assert (runs[3].noise, runs[3].seed) == ("file:/x/n.h5", 1)
    assert runs[15].dataset == "coco" and runs[15].bits == 64
    assert len({r.run_dir for r in runs}) == 16
    argv = runs[5].argv(grid)
    assert argv[:2] == ["--config", "configs/flickr.yaml"]
    assert ["--set", "model.bits=64"] == argv[argv.index("model.bits=64") - 1: argv.index("model.bits=64") + 1]
    assert "train.epochs=3" in argv and f"run.dir={runs[5].run_dir}" in argv
    # a run killed before its first checkpoint starts afresh, deleting what it left (never a finished run)
    runs[5].run_dir.mkdir(parents=True)
    (runs[5].run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert runs[5].argv(grid)[-1] == "--overwrite" and not runs[5].done
    # a run with a checkpoint resumes instead of starting over
    (runs[5].run_dir / "checkpoints").mkdir(parents=True)
    (runs[5].run_dir / "checkpoints" / "latest").write_text("epoch-0001\n")
    assert runs[5].argv(grid) == ["--resume", str(runs[5].run_dir)]


def test_slurm_array_script_and_dry_run(tmp_path):
    out = tmp_path / "paper.sbatch"
    grid_path = REPO / "launch" / "grids" / "paper.yaml"
    proc = subprocess.run([sys.executable, "-m", "scbch_dist.sweep", str(grid_path), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[task")]
    assert len(lines) == 48 and "--config configs/iapr.yaml --set model.bits=128 --set data.noise=mixed:0.8" in lines[-1]
    assert "#SBATCH --array=0-47" in proc.stdout
    grid = sweep.load_grid(grid_path)
    grid.runs_dir = str(tmp_path / "runs")
    text = sweep.slurm_script(grid, grid_path, sweep.expand(grid))
    out.write_text(text)
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0  # valid shell
    assert "#SBATCH --gres=gpu:1" in text and "--task \"$SLURM_ARRAY_TASK_ID\"" in text
    # preemption: the warning signal goes to the task itself (exec), which checkpoints and requeues
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@180" in text and "\nexec python" in text


@pytest.mark.slow
def test_local_sweep_runs_skips_done_and_reports(tiny_dataset, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data:\n  root: {tiny_dataset}\nmodel:\n  hidden: 32\ntrain:\n  epochs: 2\n  batch_size: 64\n"
                      "eval:\n  every: 1\ncscc:\n  warmup_epochs: 1\n  k: 5\nrun:\n  tensorboard: false\n")
    grid_path = write_grid(tmp_path / "g.yaml", name="tiny", runs_dir=str(tmp_path / "runs"), datasets=[str(config)],
                           bits=[8, 16], noise=[0.5], seeds=[0])
    cmd = [sys.executable, "-m", "scbch_dist.sweep", str(grid_path), "--local"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    summaries = sorted((tmp_path / "runs").rglob("summary.json"))
    assert len(summaries) == 2
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "2 of 2 runs already done; 0 to go" in again.stderr
    report.main([str(tmp_path / "runs")])
    text = (tmp_path / "runs" / "report.md").read_text()
    assert "| SCBCH |" in text and "0.5 / 8 bit" in text and "0.5 / 16 bit" in text and "mixed noise" in text
    assert (tmp_path / "runs" / "pr_synthetic.png").is_file()


def fake_summary(root: Path, method, dataset, noise, bits, seed, best, final, spec=None, per_epoch=2.0):
    def result(avg):
        d = {"map": avg, "map_tie_aware": avg - 0.01}
        curve = {"pr_radius": {"radius": [0, 1], "precision": [1.0, 0.5], "recall": [0.1, 1.0]},
                 "pr_topk": {"k": [1, 10], "precision": [1.0, 0.5], "recall": [0.1, 1.0]}}
        return {"i2t": d, "t2i": d, "avg_map": avg, "avg_map_tie_aware": avg - 0.01, "curves": {"i2t": curve, "t2i": curve}}
    folder = root / f"{method}-{dataset}-{spec or noise}-{bits}-{seed}"
    folder.mkdir(parents=True)
    noise_info = {"rate": noise, **({"spec": spec} if spec else {})}  # summaries before noise models had no spec
    (folder / "summary.json").write_text(json.dumps({
        "run": {"method": method, "dataset": dataset, "noise": noise_info, "bits": bits, "seed": seed},
        "best": result(best), "final": result(final), "timings_s": {"per_epoch": per_epoch}}))


def test_report_tables_per_noise_model_with_best_final_and_cost(tmp_path):
    for seed, delta in ((0, 0.0), (1, 0.02)):
        fake_summary(tmp_path, "SCBCH", "mirflickr25k", 0.5, 64, seed, 0.786 + delta, 0.78 + delta)
        fake_summary(tmp_path, "SCBCH", "mirflickr25k", 0.8, 64, seed, 0.774 + delta, 0.77)
    fake_summary(tmp_path, "RSHNL", "mirflickr25k", 0.5, 64, 0, 0.742, 0.74, spec="mixed:0.5", per_epoch=5.0)
    fake_summary(tmp_path, "NACD", "mirflickr25k", 1.0, 64, 0, 0.70, 0.69, spec="redundant:2.0", per_epoch=3.0)
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "### mirflickr25k, mixed noise: best / final mAP" in text and "### mirflickr25k, redundant noise" in text
    assert "| method | 0.5 / 64 bit | 0.8 / 64 bit | s / epoch |" in text
    # mean and sample sd over two seeds, x 100, best then final; the cost column
    sd = 100 * np.std([0.786, 0.806], ddof=1)
    assert f"| SCBCH | 79.6 ± {sd:.1f} / 79.0 ± {sd:.1f} | 78.4 ± {sd:.1f} / 77.0 ± 0.0 | 2.0 |" in text
    assert "| RSHNL | 74.2 / 74.0 |  | 5.0 |" in text
    # the redundant table holds NACD alone, at the spec's rate (2.0), not the corrupted fraction (1.0)
    assert "| method | 2 / 64 bit | s / epoch |" in text and "| NACD | 70.0 / 69.0 | 3.0 |" in text
    assert "tie-aware" in text and f"| SCBCH | 78.6 ± {sd:.1f} / 78.0 ± {sd:.1f} |" in text  # tie-aware = avg - 0.01
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    scbch = next(r for r in rows if r["method"] == "SCBCH" and r["noise"] == "0.5")
    assert float(scbch["best_avg"]) == pytest.approx(0.796) and float(scbch["final_avg"]) == pytest.approx(0.79)
    assert scbch["seeds"] == "2" and scbch["noise_model"] == "mixed" and float(scbch["seconds_per_epoch"]) == 2.0
    assert (tmp_path / "pr_mirflickr25k.png").is_file()


def test_grid_with_a_method_axis(tmp_path):
    grid = sweep.load_grid(REPO / "launch" / "grids" / "methods.yaml")
    grid.runs_dir = str(tmp_path / "runs")
    runs = sweep.expand(grid)
    assert len(runs) == 3 * 6 * 3 and len({r.run_dir for r in runs}) == 54
    nacd = next(r for r in runs if r.method == "nacd" and r.noise == "redundant:2.0" and r.bits == 64)
    argv = nacd.argv(grid)
    assert argv[:2] == ["--config", "configs/nacd-flickr.yaml"] and "method.name=nacd" in argv
    assert nacd.run_dir == tmp_path / "runs" / "flickr" / "nacd" / "64bit_redundant-2.0_seed0"
    scbch = next(r for r in runs if r.method == "scbch")
    assert scbch.argv(grid)[:2] == ["--config", "configs/flickr.yaml"]

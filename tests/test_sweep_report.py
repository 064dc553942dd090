"""Sweeps (grid expansion, SLURM array script, local runs with skip/resume) and the paper report."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_ind

from scbch_dist.experiments import report, sweep

REPO = Path(__file__).resolve().parents[1]
# a report computes nothing of nothing: a mean of no runs would be a NaN that only a later branch hides
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


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
    proc = subprocess.run([sys.executable, "-m", "scbch_dist.experiments.sweep", str(grid_path), "--dry-run"], cwd=REPO,
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
    # preemption: the warning signal is relayed to the task (also one that came before it could catch
    # it), which checkpoints and requeues
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@180" in text
    assert """\nbash -c 'trap "" USR1; exec "$@"' scbch "$PYTHON" -m""" in text and "SCBCH_WARNING_FILE" in text
    # the interpreter that wrote the script runs the tasks (a bare python failed where PATH had none)
    assert f"\nPYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}\n" in text


@pytest.mark.slow
def test_local_sweep_runs_skips_done_and_reports(tiny_dataset, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data:\n  root: {tiny_dataset}\nmodel:\n  hidden: 32\ntrain:\n  epochs: 2\n  batch_size: 64\n"
                      "eval:\n  every: 1\nscbch:\n  warmup_epochs: 1\n  k: 5\nrun:\n  tensorboard: false\n")
    grid_path = write_grid(tmp_path / "g.yaml", name="tiny", runs_dir=str(tmp_path / "runs"), datasets=[str(config)],
                           bits=[8, 16], noise=[0.5], seeds=[0])
    cmd = [sys.executable, "-m", "scbch_dist.experiments.sweep", str(grid_path), "--local"]
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


def fake_summary(root: Path, method, dataset, noise, bits, seed, best, final, spec=None, per_epoch=2.0, config=None,
                 folder=None):
    """A run folder with summary.json and, given ``config`` ({"model.image.name": ..., ...} set on the
    defaults), a config.yaml beside it as the trainer writes it."""
    def result(avg):
        d = {"map": avg, "map_tie_aware": avg - 0.01}
        curve = {"pr_radius": {"radius": [0, 1], "precision": [1.0, 0.5], "recall": [0.1, 1.0]},
                 "pr_topk": {"k": [1, 10], "precision": [1.0, 0.5], "recall": [0.1, 1.0]}}
        return {"i2t": d, "t2i": d, "avg_map": avg, "avg_map_tie_aware": avg - 0.01, "curves": {"i2t": curve, "t2i": curve}}
    folder = root / (folder or f"{method}-{dataset}-{spec or noise}-{bits}-{seed}")
    folder.mkdir(parents=True)
    if config is not None:
        from scbch_dist.config import load_config, to_dict
        import yaml

        sets = {"model.bits": bits, "data.noise": spec or f"mixed:{noise}", "train.seed": seed,
                "run.dir": str(folder), **config}
        cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
        (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False) + "# written by a test\n")
    noise_info = {"rate": noise, **({"spec": spec} if spec else {})}  # summaries before noise models had no spec
    (folder / "summary.json").write_text(json.dumps({
        "run": {"method": method, "dataset": dataset, "noise": noise_info, "bits": bits, "seed": seed},
        "best": result(best), "final": result(final), "timings_s": {"per_epoch": per_epoch}}))


def test_a_summary_without_a_method_label_is_reported_by_the_method_name(tmp_path):
    """A method without a label wrote method "" before it took the method's name: such a summary is
    reported by its method.name, never as SCBCH; only one from before methods had names is SCBCH."""
    fake_summary(tmp_path, "", "mirflickr25k", 0.5, 16, 0, 0.7, 0.7, folder="unlabelled")
    summary = tmp_path / "unlabelled" / "summary.json"
    written = json.loads(summary.read_text())
    written["run"]["method_name"] = "plain_bsch"
    summary.write_text(json.dumps(written))
    fake_summary(tmp_path, None, "mirflickr25k", 0.5, 16, 0, 0.7, 0.7, folder="old")
    assert [r["method"] for r in report.collect(tmp_path)] == ["SCBCH", "plain_bsch"]  # old/, unlabelled/


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
    assert f"| SCBCH | 79.6 ± {sd:.1f} / 79.0 ± {sd:.1f} (2 seeds) | 78.4 ± {sd:.1f} / 77.0 ± 0.0 (2 seeds) | 2.0 |" in text
    assert "| RSHNL | 74.2 / 74.0 |  | 5.0 |" in text
    # the redundant table holds NACD alone, at the spec's rate (2.0), not the corrupted fraction (1.0)
    assert "| method | 2 / 64 bit | s / epoch |" in text and "| NACD | 70.0 / 69.0 | 3.0 |" in text
    assert "tie-aware" in text and f"| SCBCH | 78.6 ± {sd:.1f} / 78.0 ± {sd:.1f} (2 seeds) |" in text  # avg - 0.01
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
    # a setting of a method's own section goes to that method's runs only
    grid.set = ["train.epochs=3", "scbch.k=10", "nacd.k=7"]
    assert [s for s in scbch.argv(grid) if s.endswith(("epochs=3", ".k=10", ".k=7"))] == ["train.epochs=3", "scbch.k=10"]
    assert [s for s in nacd.argv(grid) if s.endswith(("epochs=3", ".k=10", ".k=7"))] == ["train.epochs=3", "nacd.k=7"]


# --- hostile grids: nothing a grid holds may reach the batch script as shell code -----------------

@pytest.mark.parametrize("field, value, key", [
    ("name", "x\nrm -rf ~", "name"),
    ("runs_dir", "runs/a\rb", "runs_dir"),
    ("datasets", ["flickr", "coco\x00"], "datasets[1]"),
    ("methods", ["scbch\tnacd"], "methods[0]"),
    ("set", ["train.epochs=3\x7f"], "set[0]"),
    ("noise", [0.5, "file:/x\n.h5"], "noise[1]"),
])
def test_grid_refuses_control_characters_by_key(tmp_path, field, value, key):
    fields = {**dict(name="g", datasets=["flickr"], bits=[16], noise=[0.5]), field: value}
    path = write_grid(tmp_path / "grid.yaml", **fields)
    with pytest.raises(sweep.ConfigError, match=rf"grid\.yaml: {re.escape(key)} holds a control character") as e:
        sweep.load_grid(path)
    assert "\n" not in str(e.value)  # one line, whatever the value held



def test_sweep_command_refuses_an_injected_line_and_writes_nothing(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", name="x\nrm -rf ~", datasets=["flickr"], bits=[16], noise=[0.5])
    cmd = [sys.executable, "-m", "scbch_dist.experiments.sweep", str(grid), "--slurm", str(tmp_path / "out.sbatch")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "grid.yaml: name holds a control character (newline)" in proc.stderr
    assert not (tmp_path / "out.sbatch").exists()

def test_grid_refuses_control_characters_and_odd_keys_in_slurm_settings(tmp_path):
    base = dict(name="g", datasets=["flickr"], bits=[16], noise=[0.5])
    path = write_grid(tmp_path / "grid.yaml", **base, slurm={"partition": "gpu\n#SBATCH --wrap=id", "time": "1:00"})
    with pytest.raises(sweep.ConfigError, match=r"grid\.yaml: slurm\.partition holds a control character \(newline\)"):
        sweep.load_grid(path)
    for bad_key in ("part ition", "x\ny", "a=b", ""):
        path = write_grid(tmp_path / "grid.yaml", **base, slurm={bad_key: "1"})
        with pytest.raises(sweep.ConfigError, match=r"grid\.yaml: slurm key .* is not an sbatch option name") as e:
            sweep.load_grid(path)
        assert "\n" not in str(e.value)
    path = write_grid(tmp_path / "grid.yaml", **base, slurm={"exclude": ["n1", "n2"]})
    with pytest.raises(sweep.ConfigError, match=r"grid\.yaml: slurm\.exclude"):
        sweep.load_grid(path)
    # sbatch reads a backslash as an escape even inside quotes: what it would read is not what was written
    path = write_grid(tmp_path / "grid.yaml", **base, slurm={"comment": "a\\b"})
    with pytest.raises(sweep.ConfigError, match=r"grid\.yaml: slurm\.comment holds a backslash"):
        sweep.load_grid(path)


def test_array_script_quotes_every_value(tmp_path):
    """Spaces, quotes, $(...), backticks, ; and # in a grid reach sbatch as the values given (sbatch
    parses #SBATCH lines with shell-like quoting) and never run; the header keeps --requeue/--signal."""
    tricky = "a b 'c' \"d\" $(touch PWNED) `touch PWNED2`; touch PWNED3 # e"
    slurm = {"comment": tricky, "partition": "gpu", "job_name": "mine $(id)", "mail_type": "END,FAIL"}
    grid_path = write_grid(tmp_path / "my grid $(touch PWNED4).yaml", name="n 'q' $(touch PWNED5)",
                           runs_dir=str(tmp_path / "runs dir"), datasets=["flickr"], bits=[16, 32], noise=[0.5],
                           slurm=slurm)
    grid = sweep.load_grid(grid_path)
    text = sweep.slurm_script(grid, grid_path, sweep.expand(grid))
    directives = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            words = shlex.split(line)
            assert len(words) == 2 and words[0] == "#SBATCH", line  # one option per line, nothing after it
            key, _, value = words[1].partition("=")
            directives[key] = value
    assert directives["--comment"] == tricky and directives["--job-name"] == "mine $(id)"
    assert directives["--partition"] == "gpu" and directives["--mail-type"] == "END,FAIL"
    assert directives["--output"] == f"{tmp_path / 'runs dir'}/slurm/%A_%a.out"
    assert directives["--requeue"] == "" and directives["--signal"] == "B:USR1@180" and directives["--array"] == "0-1"
    assert "#SBATCH --partition=gpu\n" in text  # plain tokens stay as they are
    script = tmp_path / "sweep.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # run it with a stand-in python: the grid path arrives as one argument and nothing else runs
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "1", "ARGS_OUT": str(tmp_path / "args"),
           "PYTHON": str(bin_dir / "python")}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().splitlines() == ["-m", "scbch_dist.experiments.sweep", str(grid_path), "--task", "1"]
    assert not list(tmp_path.glob("PWNED*"))


def test_report_keeps_different_configs_apart(tmp_path, capsys):
    """Two configs at seed 0 are two rows, never one mean +- sd; the rows say which key differs."""
    vit = {"model.image.kind": "timm", "model.image.name": "vit_tiny_patch16_224"}
    cnn = {"model.image.kind": "timm", "model.image.name": "test_resnet"}
    fake_summary(tmp_path, "SCBCH", "shapes", 0.5, 32, 0, 0.856, 0.85, config=vit, folder="finetune-tiny")
    fake_summary(tmp_path, "SCBCH", "shapes", 0.5, 32, 0, 0.870, 0.86, config=cnn, folder="shapes-search")
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "±" not in text
    assert "| SCBCH [model.image.name=test_resnet] | 87.0 / 86.0 | 2.0 |" in text
    assert "| SCBCH [model.image.name=vit_tiny_patch16_224] | 85.6 / 85.0 | 2.0 |" in text
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert sorted((r["variant"], r["seeds"], r["best_avg"]) for r in rows) == [
        ("model.image.name=test_resnet", "1", "0.87"), ("model.image.name=vit_tiny_patch16_224", "1", "0.856")]
    err = [line for line in capsys.readouterr().err.splitlines() if "model.image.name" in line]
    assert len(err) == 1 and "finetune-tiny" in err[0] and "shapes-search" in err[0]


def test_report_averages_seeds_of_one_config_only(tmp_path):
    """Runs that differ in the seed, the bits/noise columns and settings that cannot change results
    (run.*, data.workers, data.verify, eval.batch_size) are one row; seeds counts its own runs."""
    for seed, delta in ((0, 0.0), (1, 0.02)):
        for bits in (16, 64):
            same = {"data.workers": seed, "data.verify": bool(seed), "eval.batch_size": 256 * (seed + 1),
                    "run.tensorboard": bool(seed), "run.method": ""}
            fake_summary(tmp_path, "SCBCH", "flickr", 0.5, bits, seed, 0.786 + delta, 0.78 + delta, config=same)
    fake_summary(tmp_path, "SCBCH", "flickr", 0.5, 64, 0, 0.60, 0.60, config={"scbch.margin": 0.3}, folder="other")
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    sd = 100 * np.std([0.786, 0.806], ddof=1)
    cell = f"79.6 ± {sd:.1f} / 79.0 ± {sd:.1f} (2 seeds)"
    assert f"| SCBCH [scbch.margin=0.15] | {cell} | {cell} |" in text
    assert "| SCBCH [scbch.margin=0.3] |  | 60.0 / 60.0 |" in text
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert sorted((r["variant"], r["bits"], r["seeds"]) for r in rows) == [
        ("scbch.margin=0.15", "16", "2"), ("scbch.margin=0.15", "64", "2"), ("scbch.margin=0.3", "64", "1")]


def test_report_numbers_configs_that_differ_in_many_keys(tmp_path, capsys):
    a = {"scbch.margin": 0.2, "scbch.shift": 1.0, "train.lr": 0.001}
    fake_summary(tmp_path, "SCBCH", "flickr", 0.5, 64, 0, 0.70, 0.70, config={}, folder="a")
    fake_summary(tmp_path, "SCBCH", "flickr", 0.5, 64, 0, 0.75, 0.74, config=a, folder="b")
    fake_summary(tmp_path, "NACD", "flickr", 0.5, 64, 0, 0.72, 0.71, config={"method.name": "nacd"}, folder="c")
    fake_summary(tmp_path, "SCBCH", "flickr", 0.5, 64, 0, 0.65, 0.64, folder="d")  # an older run: no config.yaml
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "±" not in text and "| NACD | 72.0 / 71.0 | 2.0 |" in text  # alone in its row: no label
    assert "| SCBCH #1 | 70.0 / 70.0 | 2.0 |" in text and "| SCBCH #2 | 75.0 / 74.0 | 2.0 |" in text
    assert "SCBCH #1: scbch.margin=0.15, scbch.shift=0.8, train.lr=0.0001" in text
    assert "SCBCH #2: scbch.margin=0.2, scbch.shift=1.0, train.lr=0.001" in text
    assert "| SCBCH [no config.yaml] | 65.0 / 64.0 | 2.0 |" in text
    variants = sorted(r["variant"] for r in csv.DictReader(open(tmp_path / "report.csv")))
    assert variants == ["", "#1", "#2", "no config.yaml"]
    err = [line for line in capsys.readouterr().err.splitlines() if "scbch.margin" in line]
    assert len(err) == 1 and "scbch.shift" in err[0] and "train.lr" in err[0] and "config.yaml" in err[0]


# --- figures: what can be checked without looking at pixels ----------------------------------------

def _curves(scale: float = 1.0) -> dict:
    curve = {"pr_radius": {"radius": [0, 1, 2], "precision": [1.0, 0.7 * scale, None], "recall": [0.1, 0.6, 1.0]},
             "pr_topk": {"k": [1, 10], "precision": [1.0, 0.5 * scale], "recall": [0.1, 1.0]}}
    return {"i2t": curve, "t2i": curve}


def test_pr_figure_has_a_legend_with_one_curve_and_no_overlapping_text(tmp_path):
    from scbch_dist import plots

    fig = plots.pr_figure({"SCBCH": _curves()}, title="flickr: 64 bits, mixed noise 0.8")
    axes = fig.get_axes()
    assert len(axes) == 4
    for ax in axes:
        legend = ax.get_legend()
        assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["SCBCH"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top, bottom = axes[0], axes[2]  # row by row: top = over Hamming radius, bottom = over top-k
    assert "radius" in top.get_title() and "top-k" in bottom.get_title()
    # the top row's x labels once sat on the bottom row's titles: no two labels or titles may touch
    texts = [a.xaxis.label for a in axes] + [a.title for a in axes] + fig.texts  # fig.texts: the suptitle
    assert len(texts) == 9
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlaps = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                if boxes[i].overlaps(boxes[j])]
    assert overlaps == []
    plots.plot_pr({"SCBCH": _curves(), "NACD": _curves(0.8)}, tmp_path / "pr.png", title="t")
    assert (tmp_path / "pr.png").stat().st_size > 0


def test_report_pr_figure_with_one_method_has_a_legend(tmp_path, monkeypatch):
    from scbch_dist import plots

    made = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: made.append(fig))
    fake_summary(tmp_path, "SCBCH", "flickr", 0.8, 64, 0, 0.70, 0.70)
    report.pr_figures(report.collect(tmp_path), tmp_path, "best", 64, 0.8)
    assert len(made) == 1 and all(ax.get_legend() is not None for ax in made[0].get_axes())


def test_map_history_figure_marks_the_best_epoch(tmp_path):
    from scbch_dist import plots

    def entry(epoch, i2t, t2i):
        return {"epoch": epoch, "i2t": {"map": i2t, "map_tie_aware": i2t - 0.01},
                "t2i": {"map": t2i, "map_tie_aware": t2i - 0.01}, "avg_map": (i2t + t2i) / 2}

    # the best average is epoch 6, although I2T alone peaks at epoch 9
    history = [entry(3, 0.60, 0.58), entry(6, 0.70, 0.72), entry(9, 0.74, 0.62), entry(12, 0.69, 0.70)]
    fig = plots.map_history_figure(history, chance=0.3, title="runs/x: 64 bits, noise mixed:0.5")
    ax = fig.get_axes()[0]
    assert ax.get_title() == "runs/x: 64 bits, noise mixed:0.5"
    best = [l for l in ax.get_lines() if l.get_label().startswith("best (epoch 6)")]
    assert len(best) == 1 and list(best[0].get_xdata()) == [6] and best[0].get_ydata()[0] == pytest.approx(0.71)
    vertical = [l for l in ax.get_lines() if list(l.get_xdata()) == [6, 6]]
    assert len(vertical) == 1 and vertical[0].get_linestyle() == ":"
    assert any(t.get_text().startswith("best (epoch 6)") for t in ax.get_legend().get_texts())
    plots.plot_map_history(history, tmp_path / "map.png", 0.3)  # the old call still works
    plots.plot_map_history(history, tmp_path / "map2.png", 0.3, title="t")
    assert (tmp_path / "map.png").stat().st_size > 0 and (tmp_path / "map2.png").stat().st_size > 0


def test_the_lead_of_a_row_is_set_against_the_seed_spread(tmp_path):
    """Three seeds per row: SCBCH's lead on NACD (2 points, sd 0.5) is beyond the seed spread; its
    lead on RSHNL at 32 bits (0.3 points, sd 1) is within it (Welch's t-test)."""
    for seed, jitter in enumerate((-0.005, 0.0, 0.005)):
        fake_summary(tmp_path, "SCBCH", "mirflickr25k", 0.5, 64, seed, 0.80, 0.78 + jitter)
        fake_summary(tmp_path, "NACD", "mirflickr25k", 0.5, 64, seed, 0.78, 0.76 + jitter)
        fake_summary(tmp_path, "SCBCH", "mirflickr25k", 0.5, 32, seed, 0.80, 0.773 + 2 * jitter)
        fake_summary(tmp_path, "RSHNL", "mirflickr25k", 0.5, 32, seed, 0.80, 0.77 - 2 * jitter)
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    p64 = ttest_ind([0.775, 0.78, 0.785], [0.755, 0.76, 0.765], equal_var=False).pvalue
    assert f"- 0.5 / 64 bit, final: SCBCH leads NACD by +2.0, beyond the seed spread (Welch's t-test p = {p64:.3f}, " \
           "3 and 3 seeds)" in text
    assert "- 0.5 / 32 bit, final: SCBCH leads RSHNL by +0.3, within the seed spread" in text
    assert p64 < 0.05


def test_runs_with_a_validation_split_report_the_selected_epoch(tmp_path):
    for seed, chosen in ((0, 0.77), (1, 0.79)):
        fake_summary(tmp_path, "RSHNL", "mirflickr25k", 0.5, 64, seed, 0.80, 0.72, spec="replace:0.5")
        path = tmp_path / f"RSHNL-mirflickr25k-replace:0.5-64-{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["selected"] = {**summary["final"], "avg_map": chosen, "avg_map_tie_aware": chosen - 0.01}
        path.write_text(json.dumps(summary))
    fake_summary(tmp_path, "SCBCH", "mirflickr25k", 0.5, 64, 0, 0.81, 0.80, spec="replace:0.5")  # no validation split
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    sd = 100 * np.std([0.77, 0.79], ddof=1)
    assert "### mirflickr25k, replace noise: best / final / selected mAP" in text
    assert f"| RSHNL | 80.0 ± 0.0 / 72.0 ± 0.0 / 78.0 ± {sd:.1f} (2 seeds) |" in text
    assert "| SCBCH | 81.0 / 80.0 / - |" in text
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "report.csv"))}
    assert float(rows["RSHNL"]["selected_avg"]) == pytest.approx(0.78) and rows["SCBCH"]["selected_avg"] == ""


@pytest.mark.parametrize("requeue, preempting, expected", [(True, False, 1), (False, True, 1), (False, False, 0)])
def test_an_array_task_requeues_itself_only_when_the_stop_asks_for_it(tmp_path, monkeypatch, requeue, preempting,
                                                                      expected):
    """An array task's trainer stopped by SIGUSR1 (the time-limit warning) requeues the task, and so
    does one stopped by the SIGTERM of a preemption; stopped by scancel's SIGTERM it does not."""
    import scbch_dist.train
    from scbch_dist.errors import Preempted
    from scbch_dist.experiments import slurm

    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\nruns_dir: {tmp_path / 'runs'}\ndatasets: [default]\nbits: [16]\nnoise: [0.5]\n")
    calls = []
    monkeypatch.setattr(slurm, "requeue", lambda env, why="": calls.append(env))
    monkeypatch.setattr(slurm, "preempted", lambda env: preempting)

    def stopped(argv):
        raise Preempted("stopped", requeue=requeue)

    monkeypatch.setattr(scbch_dist.train, "main", stopped)
    with pytest.raises(Preempted):
        sweep.main([str(grid), "--task", "0"])
    assert len(calls) == expected


def test_the_launch_script_prints_one_line_for_a_missing_config(tmp_path):
    """``python launch/sweep.py`` as the README runs it: a grid naming a missing config is one line."""
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\ndatasets: [nowhere]\nbits: [16]\nnoise: [0.5]\n")
    out = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), str(grid), "--dry-run"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"python launch/sweep.py: error: {grid}: config file(s) not found: "
                                               "configs/nowhere.yaml (run from the repository root)"]


def test_runs_that_repeat_a_seed_count_as_one_seed(tmp_path, capsys):
    """Six runs of seed 0 (a resumed copy, re-runs) and one of seed 1: two seeds, not seven; the
    repeats are averaged into seed 0's value, the spread and the seed count are over the two seeds,
    and report says which runs repeat (before: '(7 seeds)' and an sd of repeats feeding Welch's test)."""
    finals = [0.80, 0.81, 0.80, 0.81, 0.80, 0.82]
    for i, final in enumerate(finals):
        fake_summary(tmp_path, "SCBCH", "flickr", 0.5, 64, 0, final + 0.01, final, folder=f"seed0-{i}")
    fake_summary(tmp_path, "SCBCH", "flickr", 0.5, 64, 1, 0.71, 0.70, folder="seed1")
    report.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert "6 runs of seed 0" in err and "are repeats of one seed: averaged as one, never counted as seeds" in err
    seed0 = sum(finals) / len(finals)
    with open(tmp_path / "report.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["seeds"], row["runs"]) == ("2", "7")
    assert float(row["final_avg"]) == pytest.approx((seed0 + 0.70) / 2)
    assert float(row["final_avg_sd"]) == pytest.approx(float(np.std([seed0, 0.70], ddof=1)))
    assert "(2 seeds; 7 runs)" in (tmp_path / "report.md").read_text()

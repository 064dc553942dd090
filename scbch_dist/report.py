"""Collect run summaries into the paper's tables and precision-recall figures.

    python -m scbch_dist.report RUNS_DIR [--out DIR] [--which best|final] [--pr-bits 64] [--pr-noise 0.8]

Tables, one per dataset and noise model (mixed, redundant, replace, file, none) and tie policy: rows
are methods (``run.method``), columns noise rate x code length, as Tables 1-2 of the SCBCH paper.
Each cell is "best / final": the average of I2T and T2I mAP x 100 at each run's best evaluated epoch
(the paper's protocol) and at its last (mean +- sd over seeds when there are several); the last
column is the method's cost, training seconds per epoch (steps and refreshes, no evaluation).
Writes report.md, report.csv (one row per method x dataset x noise x bits, both protocols and both
tie policies) and pr_<dataset>.png (I2T and T2I, over Hamming radius and over top-k, one curve per
method; ``--which`` picks the best or the final evaluation's curves).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from scbch_dist import cli, plots
from scbch_dist.errors import ScbchError
from scbch_dist.data.noise import parse_noise
from scbch_dist.io import atomic_write_text

MODELS = ("mixed", "redundant", "replace", "file", "none")  # table order


def collect(runs_dir: Path) -> list[dict]:
    """One record per summary.json below ``runs_dir``."""
    records = []
    for path in sorted(Path(runs_dir).rglob("summary.json")):
        s = json.loads(path.read_text())
        if not s.get("final") or "run" not in s:
            continue
        run = s["run"]
        spec = run["noise"].get("spec")
        noise = parse_noise(spec) if spec else None  # summaries before the noise models: mixed, by rate
        timings = s.get("timings_s", {})
        per_epoch = timings.get("per_epoch", (timings.get("train", 0.0) + timings.get("refresh", 0.0))
                                / max(int(run.get("epochs", 1)), 1)) if timings else None
        records.append({"path": str(path.parent), "method": run.get("method") or "SCBCH", "dataset": run["dataset"],
                        "noise_model": noise.kind if noise else "mixed",
                        "noise": noise.rate if noise else float(run["noise"].get("rate", 0.0)),
                        "bits": int(run["bits"]), "seed": run.get("seed", 0), "best": s["best"], "final": s["final"],
                        "seconds_per_epoch": per_epoch})
    return records


def _group(records: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["method"], r["noise_model"], r["noise"], r["bits"])].append(r)
    return groups


def _cell(values: list[float]) -> str:
    mean = 100 * float(np.mean(values))
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)):.1f}"


def markdown(records: list[dict]) -> str:
    groups = _group(records)
    out = io.StringIO()
    for dataset in sorted({r["dataset"] for r in records}):
        for model in [m for m in MODELS if any(r["dataset"] == dataset and r["noise_model"] == m for r in records)]:
            rows = [r for r in records if r["dataset"] == dataset and r["noise_model"] == model]
            columns = sorted({(r["noise"], r["bits"]) for r in rows})
            methods = sorted({r["method"] for r in rows})
            for key, title in (("avg_map", "ties by database order"), ("avg_map_tie_aware", "tie-aware")):
                out.write(f"### {dataset}, {model} noise: best / final mAP, average of I2T and T2I x 100 ({title})\n\n")
                out.write("| method | " + " | ".join(f"{n:g} / {b} bit" for n, b in columns) + " | s / epoch |\n")
                out.write("| --- |" + " ---: |" * (len(columns) + 1) + "\n")
                for method in methods:
                    cells = []
                    for noise, bits in columns:
                        runs = groups.get((dataset, method, model, noise, bits), [])
                        cells.append(f"{_cell([r['best'][key] for r in runs])} / {_cell([r['final'][key] for r in runs])}"
                                     if runs else "")
                    cost = [r["seconds_per_epoch"] for r in rows if r["method"] == method and r["seconds_per_epoch"]]
                    cells.append(f"{np.mean(cost):.1f}" if cost else "")
                    out.write(f"| {method} | " + " | ".join(cells) + " |\n")
                out.write("\n")
    return out.getvalue()


def csv_rows(records: list[dict]) -> list[dict]:
    rows = []
    for (dataset, method, model, noise, bits), runs in sorted(_group(records).items()):
        cost = [r["seconds_per_epoch"] for r in runs if r["seconds_per_epoch"]]
        row = {"dataset": dataset, "method": method, "noise_model": model, "noise": noise, "bits": bits,
               "seeds": len(runs), "seconds_per_epoch": float(np.mean(cost)) if cost else ""}
        for which in ("best", "final"):
            for tie, suffix in (("map", ""), ("map_tie_aware", "_tie_aware")):
                for d in ("i2t", "t2i"):
                    row[f"{which}_{d}{suffix}"] = float(np.mean([r[which][d][tie] for r in runs]))
                avg = [r[which][f"avg_{tie}"] for r in runs]
                row[f"{which}_avg{suffix}"] = float(np.mean(avg))
                row[f"{which}_avg{suffix}_sd"] = float(np.std(avg, ddof=1)) if len(avg) > 1 else 0.0
        rows.append(row)
    return rows


def pr_figures(records: list[dict], out: Path, which: str, bits: int, noise: float) -> list[Path]:
    """One figure per dataset: the setting (noise model, rate, bits) asked for, or else the one
    with the most methods; one curve per method."""
    written = []
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset and "curves" in r[which]]
        if not rows:
            continue
        settings = defaultdict(set)
        for r in rows:
            settings[(r["noise_model"], r["noise"], r["bits"])].add(r["method"])
        asked = [k for k in settings if k[2] == bits and abs(k[1] - noise) < 1e-9]
        model, rate, b = max(asked or settings, key=lambda k: (len(settings[k]), k[0] == "mixed", k))
        chosen = [r for r in rows if (r["noise_model"], r["noise"], r["bits"]) == (model, rate, b)]
        per_method = {}
        for r in sorted(chosen, key=lambda r: r["seed"]):
            per_method.setdefault(r["method"], r[which]["curves"])
        path = out / f"pr_{dataset}.png"
        plots.plot_pr(per_method, path, title=f"{dataset}: {b} bits, {model} noise {rate:g} ({which})")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--out", type=Path, help="output folder (default: RUNS_DIR)")
    p.add_argument("--which", choices=["best", "final"], default="best", help="the evaluation the PR figures show")
    p.add_argument("--pr-bits", type=int, default=64)
    p.add_argument("--pr-noise", type=float, default=0.8)
    args = p.parse_args(argv)
    records = collect(args.runs_dir)
    if not records:
        raise ScbchError(f"{args.runs_dir}: no summary.json with results under it")
    out = args.out or args.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(records)
    atomic_write_text(out / "report.md", text)
    rows = csv_rows(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "report.csv", buf.getvalue())
    figures = pr_figures(records, out, args.which, args.pr_bits, args.pr_noise)
    sys.stdout.write(text)
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'} and {len(figures)} PR figure(s) from "
          f"{len(records)} runs", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.report")

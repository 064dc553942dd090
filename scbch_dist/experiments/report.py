"""Collect run summaries into the paper's tables and precision-recall figures.

    python -m scbch_dist.experiments.report RUNS_DIR [--out DIR] [--which best|final] [--pr-bits 64] [--pr-noise 0.8]

Tables, one per dataset and noise model (mixed, redundant, replace, file, none) and tie policy: rows
are methods (``run.method``), columns noise rate x code length, as Tables 1-2 of the SCBCH paper.
Runs average as seeds only when their resolved configs (config.yaml beside summary.json) agree on
everything but the seed, the columns and the keys in NO_EFFECT_KEYS; configs that differ otherwise
share no cell: each gets its own row, labelled with the keys that differ (``SCBCH [scbch.margin=0.3]``,
or ``SCBCH #1`` with a footnote when more than two differ), and a line on stderr names them.
Each cell is "best / final": the average of I2T and T2I mAP x 100 at each run's best evaluated epoch
(the paper's protocol) and at its last (mean +- sd over seeds when there are several, and their
number), and
"/ selected" at the epoch its validation rows select where runs hold out some (eval.validation), and
"/ refit" where runs were trained again on every row for that many epochs (eval.refit); the last
column is the method's cost, training seconds per epoch (steps and refreshes, no evaluation). Under
each table, for every column where the two leading rows both hold 2 or more seeds: the leader's
lead in final mAP and whether it exceeds the seed spread (Welch's t-test at p < 0.05).
Writes report.md, report.csv (one row per method x variant x dataset x noise x bits, both protocols
and both tie policies) and pr_<dataset>.png (I2T and T2I, over Hamming radius and over top-k, one curve per
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
from scbch_dist.config import flatten, read_run_config
from scbch_dist.run import RunFolder
from scbch_dist.errors import ScbchError
from scbch_dist.data.noise import parse_noise
from scbch_dist.atomic import atomic_write_text

CHOSEN = ("selected", "refit")  # the figures of runs that held rows out (eval.validation, eval.refit)
MODELS = ("mixed", "redundant", "replace", "file", "none")  # table order

# Config keys that cannot change a run's results: output settings (run.*, the row label run.method
# included: it is the row already), the preflight read of the shards, loader processes and the
# encoding batch. Runs whose configs differ only in these and in train.seed are seeds of one config.
# A key ending in "." stands for its whole section.
NO_EFFECT_KEYS = ("run.", "data.verify", "data.workers", "data.retries", "data.timeout", "data.cache", "data.cache_gb",
                  "eval.batch_size", "eval.refit")
SEED_KEY = "train.seed"
COLUMN_KEYS = ("model.bits", "data.noise")  # a table's columns (and the noise model its table), not variants
MAX_LABEL_KEYS = 2  # a row label names up to this many differing keys; beyond, #i and a footnote


def collect(runs_dir: Path) -> list[dict]:
    """One record per summary.json below ``runs_dir``."""
    records = []
    for path in sorted(Path(runs_dir).rglob(RunFolder.SUMMARY)):
        folder = RunFolder(path.parent)
        if folder.path.name == RunFolder.REFIT and RunFolder(folder.path.parent).finished:
            continue  # a run's refit: its figure is the run's "refit"
        # a summary changed since its run wrote it is refused, naming it (or one whose digest was removed)
        s = folder.read_summary()
        if not s.get("final") or "run" not in s:
            continue
        run = s["run"]
        spec = run["noise"].get("spec")
        noise = parse_noise(spec) if spec else None  # summaries before the noise models: mixed, by rate
        timings = s.get("timings_s", {})
        per_epoch = timings.get("per_epoch", (timings.get("train", 0.0) + timings.get("refresh", 0.0))
                                / max(int(run.get("epochs", 1)), 1)) if timings else None
        # a summary of a method without a label, before it took the method's name, has method ""; one
        # from before the methods has no method at all: SCBCH
        method = run.get("method") or run.get("method_name") or "SCBCH"
        records.append({"path": str(path.parent), "method": method, "dataset": run["dataset"],
                        "noise_model": noise.kind if noise else "mixed",
                        "noise": noise.rate if noise else float(run["noise"].get("rate", 0.0)),
                        "bits": int(run["bits"]), "seed": run.get("seed", 0), "best": s["best"], "final": s["final"],
                        "selected": s.get("selected"), "refit": s.get("refit"),
                        "seconds_per_epoch": per_epoch, "config": _run_config(path.parent / "config.yaml"),
                        "variant": "", "variant_rank": 0})
    return records


def _run_config(path: Path) -> dict | None:
    """The run's resolved config as ``{"model.bits": 64, ...}``; None for a summary without one."""
    if not path.is_file():
        return None
    return flatten(read_run_config(path))  # digest checked; an earlier version's layout migrated


def _is_variant_key(key: str) -> bool:
    return key != SEED_KEY and key not in COLUMN_KEYS and not any(
        key == k or (k.endswith(".") and key.startswith(k)) for k in NO_EFFECT_KEYS)


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _config_group(config: dict | None) -> tuple | None:
    """What runs must share to be seeds of one config; None: no config.yaml (grouped as before)."""
    if config is None:
        return None
    return tuple(sorted((k, _value(v)) for k, v in config.items() if _is_variant_key(k)))


def split_variants(records: list[dict]) -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Give each config within a table row (dataset, method, noise model) its own row: sets each
    record's "variant" ("" when its row holds one config; "key=value, ..." for up to
    MAX_LABEL_KEYS differing keys, else "#i") and "variant_rank". Returns the footnotes per table
    (dataset, noise model) and one warning line per split row."""
    rows = defaultdict(list)
    for r in records:
        rows[(r["dataset"], r["method"], r["noise_model"])].append(r)
    notes, warnings = defaultdict(list), []
    for (dataset, method, model), runs in sorted(rows.items()):
        groups = defaultdict(list)  # in the order of the runs' folders: stable numbering
        for r in sorted(runs, key=lambda r: r["path"]):
            groups[_config_group(r["config"])].append(r)
        if len(groups) == 1:
            continue
        configs = [g[0]["config"] for key, g in groups.items() if key is not None]
        missing = "(unset)"
        differ = sorted(k for k in set().union(*configs) if _is_variant_key(k)
                        and len({_value(c.get(k, missing)) for c in configs}) > 1)
        number = 0
        for rank, (key, group) in enumerate(groups.items()):
            described = "" if key is None else ", ".join(
                f"{k}={_value(group[0]['config'].get(k, missing))}" for k in differ)
            if key is None:
                variant = "no config.yaml"
            elif len(differ) <= MAX_LABEL_KEYS:
                variant = described
            else:
                number += 1
                variant = f"#{number}"
                notes[(dataset, model)].append(f"{method} #{number}: {described}")
            for r in group:
                r["variant"], r["variant_rank"] = variant, rank
        named = "; ".join(g[0]["path"] + (f" (+{len(g) - 1} more)" if len(g) > 1 else "") for g in groups.values())
        what = [", ".join(differ[:12]) + (f" and {len(differ) - 12} more" if len(differ) > 12 else "")] * bool(differ)
        what += ["whether a config.yaml is there"] * (None in groups)
        warnings.append(f"report: {dataset}, {method}, {model} noise: runs of {len(groups)} different configs "
                        f"({named}) are kept apart as rows; they differ in {'; and in '.join(what)}")
    return notes, warnings


def row_label(r: dict) -> str:
    """The table row of a record: its method, and its variant when the method's row is split."""
    v = r["variant"]
    return f"{r['method']} {v}" if v.startswith("#") else f"{r['method']} [{v}]" if v else r["method"]


def _group(records: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["method"], r["variant_rank"], r["variant"], r["noise_model"], r["noise"],
                r["bits"])].append(r)
    return groups


def per_seed(runs: list[dict], value) -> list[float]:
    """``value(run)`` once per seed: runs of one seed (a resumed copy, a re-run, the same config on
    another process count) are repeats of one draw, not more seeds; their mean stands for it, so
    they never narrow a spread or feed a test as seeds. In the order of the seeds."""
    by_seed = defaultdict(list)
    for r in runs:
        by_seed[r["seed"]].append(float(value(r)))
    return [float(np.mean(v)) for _, v in sorted(by_seed.items(), key=lambda item: str(item[0]))]


def repeat_warnings(records: list[dict]) -> list[str]:
    """One line per cell whose runs repeat a seed: which runs, and that they count as one seed."""
    lines = []
    for (dataset, method, _, variant, model, noise, bits), runs in sorted(_group(records).items()):
        by_seed = defaultdict(list)
        for r in runs:
            by_seed[r["seed"]].append(r["path"])
        for seed, paths in sorted(by_seed.items(), key=lambda item: str(item[0])):
            if len(paths) > 1:
                lines.append(f"report: {dataset}, {row_label({'method': method, 'variant': variant})}, {model} {noise:g} / "
                             f"{bits} bit: {len(paths)} runs of seed {seed} ({'; '.join(sorted(paths))}) are repeats of "
                             "one seed: averaged as one, never counted as seeds")
    return lines


def _count(runs: list[dict]) -> str:
    """'' for one run; ' (3 seeds)'; ' (1 seed; 6 runs)' when seeds repeat."""
    seeds = len({r["seed"] for r in runs})
    if len(runs) == 1:
        return ""
    return f" ({seeds} seed{'s' * (seeds > 1)}" + (f"; {len(runs)} runs)" if len(runs) > seeds else ")")


def _cell(values: list[float]) -> str:
    mean = 100 * float(np.mean(values))
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)):.1f}"


SIGNIFICANCE = 0.05  # Welch's t-test level at which a difference of two rows exceeds their seed spread


def compare_rows(leader: list[float], runner_up: list[float]) -> str | None:
    """Whether the leader's final mAP over seeds differs from the runner-up's by more than the seed
    spread explains: Welch's t-test (unequal variances), both rows with at least 2 seeds; None
    otherwise."""
    if len(leader) < 2 or len(runner_up) < 2:
        return None
    from scipy.stats import ttest_ind

    diff = 100 * (float(np.mean(leader)) - float(np.mean(runner_up)))
    if np.std(leader) == 0 and np.std(runner_up) == 0:  # no spread at all: t is undefined
        return f"+{diff:.1f}, {'beyond' if diff else 'within'} the seed spread (no spread)"
    p = float(ttest_ind(leader, runner_up, equal_var=False).pvalue)
    verdict = "beyond" if p < SIGNIFICANCE else "within"
    return f"+{diff:.1f}, {verdict} the seed spread (Welch's t-test p = {p:.3f}, {len(leader)} and {len(runner_up)} seeds)"


def markdown(records: list[dict], notes: dict[tuple[str, str], list[str]] | None = None) -> str:
    """The tables; ``notes`` (from split_variants) go under the table of their dataset and noise model."""
    groups = _group(records)
    out = io.StringIO()
    for dataset in sorted({r["dataset"] for r in records}):
        for model in [m for m in MODELS if any(r["dataset"] == dataset and r["noise_model"] == m for r in records)]:
            rows = [r for r in records if r["dataset"] == dataset and r["noise_model"] == model]
            columns = sorted({(r["noise"], r["bits"]) for r in rows})
            table_rows = sorted({(r["method"], r["variant_rank"], r["variant"]) for r in rows})
            # further figures where runs held rows out: the epoch they select, and its refit on every row
            extra = [w for w in CHOSEN if any(r[w] for r in rows)]
            for key, title in (("avg_map", "ties by database order"), ("avg_map_tie_aware", "tie-aware")):
                what = " / ".join(["best", "final", *extra])
                out.write(f"### {dataset}, {model} noise: {what} mAP, average of I2T and T2I x 100 ({title})\n\n")
                out.write("| method | " + " | ".join(f"{n:g} / {b} bit" for n, b in columns) + " | s / epoch |\n")
                out.write("| --- |" + " ---: |" * (len(columns) + 1) + "\n")
                for method, rank, variant in table_rows:
                    cells = []
                    for noise, bits in columns:
                        runs = groups.get((dataset, method, rank, variant, model, noise, bits), [])
                        if not runs:  # this row has no run in this column
                            cells.append("")
                            continue
                        cell = (f"{_cell(per_seed(runs, lambda r: r['best'][key]))} / "
                                f"{_cell(per_seed(runs, lambda r: r['final'][key]))}")
                        for w in extra:
                            chosen = all(r[w] for r in runs)
                            cell += f" / {_cell(per_seed(runs, lambda r: r[w][key]))}" if chosen else " / -"
                        cell += _count(runs)
                        cells.append(cell)
                    cost = [r["seconds_per_epoch"] for r in rows
                            if (r["method"], r["variant"]) == (method, variant) and r["seconds_per_epoch"]]
                    cells.append(f"{np.mean(cost):.1f}" if cost else "")
                    label = row_label({"method": method, "variant": variant})
                    out.write(f"| {label} | " + " | ".join(cells) + " |\n")
                for note in (notes or {}).get((dataset, model), []):
                    out.write(f"\n- {note}")
                out.write("\n\n" if (notes or {}).get((dataset, model)) else "\n")
                out.write(_leaders(groups, dataset, model, columns, table_rows, key))
    return out.getvalue()


def _leaders(groups: dict, dataset: str, model: str, columns: list, table_rows: list, key: str) -> str:
    """Per column where two rows hold several seeds: the leading row by mean final mAP, its lead on
    the runner-up and whether the seeds' spread explains it (compare_rows)."""
    lines = []
    for noise, bits in columns:
        finals = []
        for method, rank, variant in table_rows:
            runs = groups.get((dataset, method, rank, variant, model, noise, bits), [])
            if runs:
                finals.append((per_seed(runs, lambda r: r["final"][key]), row_label({"method": method, "variant": variant})))
        finals.sort(key=lambda f: -float(np.mean(f[0])))
        verdict = compare_rows(finals[0][0], finals[1][0]) if len(finals) > 1 else None
        if verdict:
            lines.append(f"- {noise:g} / {bits} bit, final: {finals[0][1]} leads {finals[1][1]} by {verdict}\n")
    return "".join(lines) + ("\n" if lines else "")


def csv_rows(records: list[dict]) -> list[dict]:
    rows = []
    for (dataset, method, _, variant, model, noise, bits), runs in sorted(_group(records).items()):
        cost = [r["seconds_per_epoch"] for r in runs if r["seconds_per_epoch"]]
        row = {"dataset": dataset, "method": method, "variant": variant, "noise_model": model, "noise": noise,
               "bits": bits, "seeds": len({r["seed"] for r in runs}), "runs": len(runs),
               "seconds_per_epoch": float(np.mean(cost)) if cost else ""}
        for which in ("best", "final", *CHOSEN):
            if which in CHOSEN and not all(r[which] for r in runs):
                continue
            for tie, suffix in (("map", ""), ("map_tie_aware", "_tie_aware")):
                for d in ("i2t", "t2i"):
                    row[f"{which}_{d}{suffix}"] = float(np.mean(per_seed(runs, lambda r: r[which][d][tie])))
                avg = per_seed(runs, lambda r: r[which][f"avg_{tie}"])
                row[f"{which}_avg{suffix}"] = float(np.mean(avg))
                row[f"{which}_avg{suffix}_sd"] = float(np.std(avg, ddof=1)) if len(avg) > 1 else 0.0
        rows.append(row)
    return rows


def pr_figures(records: list[dict], out: Path, which: str, bits: int, noise: float) -> list[Path]:
    """One figure per dataset: the setting (noise model, rate, bits) asked for, or else the one
    with the most rows; one curve per table row (method, variant)."""
    written = []
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset and "curves" in r[which]]
        if not rows:
            continue
        settings = defaultdict(set)
        for r in rows:
            settings[(r["noise_model"], r["noise"], r["bits"])].add(row_label(r))
        asked = [k for k in settings if k[2] == bits and abs(k[1] - noise) < 1e-9]
        model, rate, b = max(asked or settings, key=lambda k: (len(settings[k]), k[0] == "mixed", k))
        chosen = [r for r in rows if (r["noise_model"], r["noise"], r["bits"]) == (model, rate, b)]
        per_method = {}  # one curve per table row (method and variant), its lowest seed's
        for r in sorted(chosen, key=lambda r: (r["method"], r["variant_rank"], r["seed"])):
            per_method.setdefault(row_label(r), r[which]["curves"])
        path = out / f"pr_{dataset}.png"
        plots.plot_pr(per_method, path, title=f"{dataset}: {b} bits, {model} noise {rate:g} ({which})")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.experiments.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--out", type=Path, help="output folder (default: RUNS_DIR)")
    p.add_argument("--which", choices=["best", "final"], default="best", help="the evaluation the PR figures show")
    p.add_argument("--pr-bits", type=int, default=64)
    p.add_argument("--pr-noise", type=float, default=0.8)
    args = p.parse_args(argv)
    records = collect(args.runs_dir)
    if not records:
        raise ScbchError(f"{args.runs_dir}: no {RunFolder.SUMMARY} with results under it")
    notes, warnings = split_variants(records)
    for line in [*warnings, *repeat_warnings(records)]:
        print(line, file=sys.stderr)
    out = args.out or args.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(records, notes)
    atomic_write_text(out / "report.md", text)
    rows = csv_rows(records)
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))  # "selected_*" only where runs held rows out
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "report.csv", buf.getvalue())
    figures = pr_figures(records, out, args.which, args.pr_bits, args.pr_noise)
    sys.stdout.write(text)
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'} and {len(figures)} PR figure(s) from "
          f"{len(records)} runs", file=sys.stderr)


def console() -> None:
    """The ``scbch-report`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-report")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.experiments.report")
